"""The report's Search section, read from a real Optuna study built with Optuna's ask/tell in a
sweep folder whose run dirs are written by hand (no training): trials and their states, the
best configuration as a command line, the optimisation history, parameter importances, and
the trial columns of runs.csv / runs.json. A sweep without study.db has none of it."""

from __future__ import annotations

import csv
import html
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from PIL import Image

from atelier.outputs.summary import write_summary
from atelier.report.collect import collect_sweep
from atelier.report.live import sweep_is_over
from atelier.report.write import write_report
from atelier.search.space import override_value
from atelier.search.study import open_study, storage
from atelier.outputs.sweep_plan import PlannedJob, SweepPlan, write_plan
from tests.helpers import REPO_ROOT

LR, DIM = "optimizer.learning_rate", "network.dim"
# "project=my lora" needs shell quoting in the command line.
FIXED = ["hparams_search=lr_dim", "training.max_train_epochs=3", "project=my lora"]
DISTRIBUTIONS = {LR: FloatDistribution(1e-5, 1e-2, log=True), DIM: CategoricalDistribution((4, 8, 16))}
OBJECTIVE = "best_validation_loss"
# number: (learning rate, dim, how it ends, objective / last validation loss / reason)
TRIALS = {
    0: (1e-4, 4, "complete", 0.9),
    1: (1e-3, 8, "complete", 0.5),
    2: (3e-3, 16, "pruned", 0.95),
    3: (2e-5, 4, "failed", "CUDA out of memory at step 3"),
    4: (5e-4, 8, "complete", 0.7),
}
BEST_COMMAND = ("python train.py hparams_search=lr_dim training.max_train_epochs=3 'project=my lora' "
                "optimizer.learning_rate=0.001 network.dim=8")
RUN_STATUS = {"complete": "completed", "pruned": "pruned", "failed": "failed"}


def _job_dir(sweep: Path, name: str, overrides: list[str], summary: dict) -> None:
    """A run dir as a finished job leaves it, for the report: its overrides and summary.json."""
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    write_summary(sweep / name, {"steps": 30, "epochs": 3, **summary})


def _summary(state: str, outcome: float | str) -> dict:
    if state == "complete":
        return {"status": "completed", OBJECTIVE: outcome, "final_loss": outcome + 0.1}
    if state == "pruned":
        return {"status": "pruned", "reason": f"pruned by its search trial at step 12 ({outcome})"}
    return {"status": "failed", "reason": outcome}


@pytest.fixture
def search_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "search"
    sweep.mkdir()
    study = open_study(sweep, storage(sweep), "minimize", attrs={
        "kind": "search", "objective": OBJECTIVE, "direction": "minimize", "fixed": FIXED,
        "space": {key: repr(d) for key, d in DISTRIBUTIONS.items()}})
    jobs = []
    for number, (lr, dim, state, outcome) in TRIALS.items():
        study.enqueue_trial({LR: lr, DIM: dim})
        trial = study.ask(DISTRIBUTIONS)
        assert trial.number == number and trial.params == {LR: lr, DIM: dim}
        name = f"trial-{number:03d}"
        values = [f"{LR}={override_value(lr)}", f"{DIM}={dim}"]
        trial.set_user_attr("name", name)
        trial.set_user_attr("overrides", values)
        if state == "complete":
            trial.report(outcome + 0.05, 12)
            study.tell(trial, outcome)
        elif state == "pruned":
            trial.report(outcome, 12)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("reason", outcome)
            study.tell(trial, state=TrialState.FAIL)
        _job_dir(sweep, name, [*FIXED, *values, f"trial={number}"], _summary(state, outcome))
        jobs.append(PlannedJob(name, [*FIXED, *values], f"${{project}}_{name}"))
    write_plan(sweep, SweepPlan(jobs, [LR, DIM], {"hparams_search": "lr_dim"}, state="finished"))
    return sweep


def _section(html: str) -> str:
    match = re.search(r'<section id="search">.*?</section>', html, re.S)
    assert match, "no Search section"
    return match.group(0)


def _csv(sweep: Path) -> dict[str, dict[str, str]]:
    with open(sweep / "runs.csv", newline="", encoding="utf-8") as fh:
        return {row["job"]: row for row in csv.DictReader(fh)}


def test_search_section_lists_each_trial_with_its_state(search_sweep: Path) -> None:
    section = _section(write_report(search_sweep).read_text(encoding="utf-8"))
    states = dict(re.findall(r'data-trial="(\d+)">.*?<span class="badge (\w+)">', section))
    assert states == {"0": "complete", "1": "complete", "2": "pruned", "3": "failed", "4": "complete"}
    assert "5 trials (3 complete, 1 pruned, 1 failed)" in section
    assert "CUDA out of memory at step 3" in section  # the failed trial's reason
    assert "step 12: 0.95" in section  # what the pruned trial last reported
    assert re.search(r'<tr class="trial-complete is-best" data-trial="1">', section)


def test_best_trial_is_a_ready_command_line(search_sweep: Path) -> None:
    section = _section(write_report(search_sweep).read_text(encoding="utf-8"))
    command = re.search(r'<pre class="command"><code>(.*?)</code></pre>', section, re.S)
    assert command, section
    assert html.unescape(command.group(1)) == BEST_COMMAND
    assert shlex.split(BEST_COMMAND)[4] == "project=my lora"  # one argument for the shell


def test_history_plot_is_a_png_in_the_section(search_sweep: Path) -> None:
    section = _section(write_report(search_sweep).read_text(encoding="utf-8"))
    assert '<img src="search_history.png"' in section
    with Image.open(search_sweep / "search_history.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 150
        image.verify()


def test_importances_of_the_varied_params(search_sweep: Path) -> None:
    section = _section(write_report(search_sweep).read_text(encoding="utf-8"))
    shares = dict(re.findall(r'<tr data-param="([^"]+)"><td><code>[^<]*</code></td><td class="num">([\d.]+)%', section))
    assert set(shares) == {LR, DIM}
    assert abs(sum(float(s) for s in shares.values()) - 100) < 0.5


def test_runs_files_carry_trial_state_and_objective(search_sweep: Path) -> None:
    write_report(search_sweep)
    rows = _csv(search_sweep)
    expected = {f"trial-{n:03d}": (str(n), state, str(outcome) if state == "complete" else "")
                for n, (_, _, state, outcome) in TRIALS.items()}
    assert {job: (r["trial"], r["trial_state"], r["objective"]) for job, r in rows.items()} == expected
    assert {job: r["status"] for job, r in rows.items()} == {
        f"trial-{n:03d}": RUN_STATUS[state] for n, (_, _, state, _) in TRIALS.items()}
    records = {r["job"]: r for r in json.loads((search_sweep / "runs.json").read_text(encoding="utf-8"))}
    assert records["trial-001"]["trial"] == 1 and records["trial-001"]["objective"] == 0.5
    assert records["trial-002"]["trial_state"] == "pruned" and records["trial-002"]["objective"] is None


def test_pruned_runs_are_over_and_counted(search_sweep: Path) -> None:
    html = write_report(search_sweep).read_text(encoding="utf-8")
    assert "5 jobs: 3 completed, 1 pruned, 1 failed" in html
    assert '<span class="badge pruned">pruned</span>' in html
    sweep = collect_sweep(search_sweep)
    (search_sweep / "sweep.json").unlink()  # without a plan: over when every run is
    assert sweep_is_over(collect_sweep(search_sweep)) and sweep.state == "finished"


def test_importances_say_why_they_are_missing(tmp_path: Path) -> None:
    sweep = tmp_path / "one"
    sweep.mkdir()
    study = open_study(sweep, storage(sweep), "minimize", attrs={
        "kind": "search", "objective": OBJECTIVE, "direction": "minimize", "fixed": FIXED})
    trial = study.ask(DISTRIBUTIONS)
    trial.set_user_attr("name", "trial-000")
    study.tell(trial, 0.4)
    _job_dir(sweep, "trial-000", FIXED, _summary("complete", 0.4))
    section = _section(write_report(sweep).read_text(encoding="utf-8"))
    assert "at least 2 complete trials (1 so far)" in section
    assert "data-param=" not in section


def test_grid_with_pruning_uses_its_planned_overrides(tmp_path: Path) -> None:
    sweep = tmp_path / "grid"
    sweep.mkdir()
    study = open_study(sweep, storage(sweep), "minimize",
                       attrs={"kind": "grid", "objective": OBJECTIVE, "direction": "minimize"})
    jobs = []
    for number, (dim, value) in enumerate([(4, 0.8), (8, 0.6), (16, 0.7)]):
        name, job = f"network.dim={dim}", ["debug=smoke", f"network.dim={dim}"]
        trial = study.ask()  # a grid's trials suggest nothing
        trial.set_user_attr("name", name)
        trial.set_user_attr("overrides", [*job, f"output.output_name=x_{dim}", "hydra.job.id=1"])
        study.tell(trial, value)
        _job_dir(sweep, name, [*job, f"trial={number}"], _summary("complete", value))
        jobs.append(PlannedJob(name, job))
    write_plan(sweep, SweepPlan(jobs, [DIM], {"debug": "smoke"}, state="finished"))
    section = _section(write_report(sweep).read_text(encoding="utf-8"))
    assert "<code>python train.py debug=smoke network.dim=8</code>" in section
    assert 'data-param="network.dim"' in section
    assert _csv(sweep)["network.dim=8"]["trial"] == "1"


def test_sweep_without_study_has_no_search_and_no_optuna(tmp_path: Path) -> None:
    sweep = tmp_path / "plain"
    sweep.mkdir()
    for dim, value in [(4, 0.8), (8, 0.6)]:
        _job_dir(sweep, f"network.dim={dim}", [f"network.dim={dim}"], _summary("complete", value))
    script = ("import sys; from atelier.report.write import write_report; write_report(sys.argv[1]); "
              "print('optuna' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, str(sweep)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"  # a plain grid's report does not import Optuna
    html = (sweep / "report.html").read_text(encoding="utf-8")
    assert 'id="search"' not in html and "search_history.png" not in html
    assert not (sweep / "search_history.png").exists()
    rows = _csv(sweep)
    assert all(r["trial"] == r["trial_state"] == r["objective"] == "" for r in rows.values())
    records = json.loads((sweep / "runs.json").read_text(encoding="utf-8"))
    assert all(r["trial"] is None and r["trial_state"] is None and r["objective"] is None for r in records)


def test_unreadable_study_leaves_the_rest_of_the_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sweep = tmp_path / "broken"
    sweep.mkdir()
    _job_dir(sweep, "network.dim=4", ["network.dim=4"], _summary("complete", 0.8))
    (sweep / "study.db").write_bytes(b"not a database")
    html = write_report(sweep).read_text(encoding="utf-8")
    assert 'id="search"' not in html and "network.dim=4" in html
    assert "unreadable study" in caplog.text
