"""Sweeps through real `train.py -m` runs: job names, failures, resume, recipes."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

import atelier.config
from atelier.sweep.compose_once import composed_once
from atelier.sweep.naming import job_names, swept_keys
from tests.helpers import REPO_ROOT, run_train

JOBS = ["optimizer=adamw,network.dim=0", "optimizer=adamw,network.dim=4",
        "optimizer=prodigy,network.dim=0", "optimizer=prodigy,network.dim=4"]


def test_names_use_only_the_values_that_vary():
    jobs = [["optimizer=adamw", "network.dim=4", "debug=smoke"], ["optimizer=lion", "network.dim=4", "debug=smoke"]]
    assert swept_keys(jobs) == ["optimizer"]
    assert job_names(jobs) == ["optimizer=adamw", "optimizer=lion"]
    assert job_names([["a=x/y"], ["a=x y"]]) == ["a=x_y", "a=x_y_1"]  # filesystem-safe, unique
    assert job_names([["debug=smoke"]]) == ["job0"]


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """4 jobs, 2 of which fail at run time; run from a scratch working directory."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_train("-m", "optimizer=adamw,prodigy", "network.dim=0,4", "debug=smoke", cwd=cwd)
    sweeps = list((cwd / "outputs" / "demo" / "sweep").iterdir())
    assert len(sweeps) == 1, proc.stderr[-2000:]
    return proc, sweeps[0]


def test_job_dirs_are_named_by_swept_values(failing_sweep):
    _, sweep_dir = failing_sweep
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(JOBS)


def test_a_failing_job_does_not_stop_the_others(failing_sweep):
    proc, sweep_dir = failing_sweep
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "sweep finished: 2 completed, 0 skipped (already done), 2 failed" in out
    assert "failed      optimizer=adamw,network.dim=0    ConfigError: 'network.dim' must be at least 1, got 0" in out
    for name in JOBS:
        summary = json.loads((sweep_dir / name / "summary.json").read_text())
        assert summary["status"] == ("failed" if name.endswith("=0") else "completed")
    assert (sweep_dir / "optimizer=prodigy,network.dim=4" / "demo_optimizer-prodigy_dim-4.safetensors").is_file()


def test_report_is_written_after_failures(failing_sweep):
    _, sweep_dir = failing_sweep
    assert {"report.html", "runs.csv", "runs.json", "loss_curves.png"} <= {p.name for p in sweep_dir.iterdir()}
    rows = json.loads((sweep_dir / "runs.json").read_text())
    rows = rows["runs"] if isinstance(rows, dict) else rows
    assert len(rows) == 4
    assert sum(r["status"] == "failed" for r in rows) == 2


def test_sweep_job_command_replays_only_that_job(failing_sweep):
    _, sweep_dir = failing_sweep
    command = (sweep_dir / "optimizer=prodigy,network.dim=4" / "command.sh").read_text()
    assert "optimizer=prodigy network.dim=4 debug=smoke" in command and "-m" not in command.split()


def test_resume_skips_finished_jobs_and_reruns_the_rest(failing_sweep):
    _, sweep_dir = failing_sweep
    done = sweep_dir / "optimizer=adamw,network.dim=4" / "demo_optimizer-adamw_dim-4.safetensors"
    unfinished = sweep_dir / "optimizer=prodigy,network.dim=4"
    (unfinished / "demo_optimizer-prodigy_dim-4.safetensors").unlink()  # as if killed before its end
    before = done.stat().st_mtime_ns
    proc = run_train("-m", "optimizer=adamw,prodigy", "network.dim=0,4", "debug=smoke",
                     f"hydra.sweep.dir={sweep_dir}", "resume=true", cwd=sweep_dir.parent)
    out = proc.stdout + proc.stderr
    assert "sweep finished: 1 completed, 1 skipped (already done), 2 failed" in out
    assert done.stat().st_mtime_ns == before
    assert (unfinished / "demo_optimizer-prodigy_dim-4.safetensors").is_file()


def test_typo_in_a_sweep_fails_before_any_job(tmp_path):
    proc = run_train("-m", "network.dimm=4,8", "debug=smoke", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "Key 'dimm' not in 'NetworkConfig'" in proc.stderr
    assert not list(tmp_path.rglob("summary.json"))


def test_one_bad_value_fails_the_sweep_before_any_job(tmp_path):
    proc = run_train("-m", "optimizer=adamw,adamw_typo", "debug=smoke", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "adamw_typo" in proc.stderr
    assert not list(tmp_path.rglob("summary.json"))


class CountingLoader:
    """Stands in for Hydra's config loader: 'composes' by returning a new dict."""

    def __init__(self):
        self.composed = []

    def load_sweep_config(self, master_config, sweep_overrides):
        self.composed.append(list(sweep_overrides))
        return {"overrides": list(sweep_overrides)}


def test_the_launcher_gets_the_configs_the_check_composed():
    loader, master = CountingLoader(), object()
    batch = [["a=1"], ["a=2"]]
    with composed_once(loader) as configs:
        configs.check(master, batch)
        assert loader.composed == batch
        first = loader.load_sweep_config(master, ["a=1"])
        assert loader.load_sweep_config(master, ["a=2"]) == {"overrides": ["a=2"]}
        assert loader.composed == batch  # nothing composed again
        assert loader.load_sweep_config(master, ["a=1"]) is not first  # each kept config is handed out once
        assert loader.composed == [*batch, ["a=1"]]
    assert "load_sweep_config" not in vars(loader)  # Hydra's own method again
    loader.load_sweep_config(master, ["a=1"])
    assert len(loader.composed) == 4


RECIPES = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


def test_at_least_three_recipes():
    assert {"demo", "character", "style"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_sweep_axes(recipe):
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={recipe}", "model.path=/m", "dataset.train_data_dir=/d"],
                      return_hydra_config=True)
    assert cfg.recipe == recipe
    assert len(cfg.hydra.sweeper.params) >= 2
    assert cfg.hydra.sweeper._target_.endswith("AtelierSweeper")
    assert cfg.hydra.sweep.dir.startswith(f"outputs/{cfg.project}/{recipe}/")


def test_demo_recipe_runs_as_a_smoke_sweep(tmp_path):
    proc = run_train("-m", "experiment=demo", "debug=smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "outputs" / "demo" / "demo").iterdir()
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == sorted(f"optimizer={o},network.dim={d}" for o in ("adamw", "prodigy") for d in (4, 8))
    # Each LoRA file is named by its swept values, so all four can share one LoRA folder.
    assert all((sweep_dir / f"optimizer={o},network.dim={d}" / f"demo_optimizer-{o}_dim-{d}.safetensors").is_file()
               for o in ("adamw", "prodigy") for d in (4, 8))
