"""Sweep reports: compare the jobs of a Hydra multirun in one page.

- `collect`: read a sweep folder into `RunRecord`s (status, losses, samples, swept values).
- `table`: runs.csv / runs.json and the best run.
- `plots`: loss_curves.png.
- `grids`: one samples grid per prompt (runs x epochs).
- `page`: report.html.
- `write`: `write_report(sweep_dir)`, all of the above.
- `cli`: `atelier report <sweep_dir>`.

Nothing is imported here, so `atelier --help` stays fast (plots need matplotlib).
"""
