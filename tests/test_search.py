"""Searches through train.py as a user runs them (real Hydra, real Optuna, real training on
the tiny model): `python train.py -m hparams_search=lr_dim`, its resume, a grid with
early stopping, and a search whose trials train fused."""

from __future__ import annotations

import json
import signal
import sys

import pytest
from optuna.trial import TrialState

from atelier.search.study import load_study
from tests.helpers import TRAIN, final_lora, run_train, sigterm_after_steps

pytestmark = pytest.mark.slow

# Fast enough for CPU: 3 epochs of 12 steps; reports at steps 12 and 24 (36 is the result).
# n_warmup_steps=13: the pruner decides at step 24 only, where the demo's trials are far apart.
FAST = ["training.max_train_epochs=3", "sampling.sample_every_n_epochs=null", "sampling.limit=1",
        "sampling.steps=1", "hydra.sweeper.pruner.n_warmup_steps=13"]  # fmt: skip
STATE_OF = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def check_trials_agree_with_their_runs(sweep_dir, study) -> None:
    """Each trial's state is its run's status; a pruned run fell behind the median of the
    finished runs at its last report (what the median pruner promises) and kept its LoRA."""
    for trial in study.trials:
        run_dir = sweep_dir / trial.user_attrs["name"]
        assert summary(run_dir)["status"] == STATE_OF[trial.state], trial.number
        if trial.state == TrialState.COMPLETE:
            assert trial.value == summary(run_dir)["best_validation_loss"]
            assert final_lora(run_dir).name == f"demo_{run_dir.name}.safetensors"
        if trial.state == TrialState.PRUNED:
            step, value = max(trial.intermediate_values.items())
            before = [t for t in study.trials if t.state == TrialState.COMPLETE and t.number < trial.number]
            others = sorted(t.intermediate_values[step] for t in before)
            median = others[len(others) // 2] if len(others) % 2 else sum(others[len(others) // 2 - 1 :][:2]) / 2
            assert value > median
            assert (run_dir / f"demo_{run_dir.name}-pruned.safetensors").is_file()
            assert not (run_dir / "training_state.pt").exists()


def test_the_demo_search_prunes_resumes_and_reports(tmp_path):
    sweep = tmp_path / "search"
    args = ["-m", "hparams_search=lr_dim", "hydra.sweeper.search.n_trials=4", *FAST, f"hydra.sweep.dir={sweep}"]
    proc = run_train(*args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load_study(sweep)
    # TPE's first trials are drawn at random from seed 0: trial 2's learning rate (1.6e-5)
    # leaves its loss far above the others at step 24.
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                               TrialState.COMPLETE]  # fmt: skip
    check_trials_agree_with_their_runs(sweep, study)
    assert "sweep finished: 3 completed, 0 skipped (already done), 0 failed, 1 pruned" in proc.stdout
    best = study.best_trial
    assert f"best: trial-{best.number:03d} best_validation_loss=" in proc.stdout
    assert f"optimizer.learning_rate={best.params['optimizer.learning_rate']!r}" in proc.stdout
    # Each trial is a sweep job: its replay, its plan entry.
    plan = json.loads((sweep / "sweep.json").read_text())
    assert [j["name"] for j in plan["jobs"]] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert plan["swept_keys"] == ["optimizer.learning_rate", "network.dim", "network.alpha"]
    command = (sweep / "trial-001" / "command.sh").read_text()
    assert "network.dim=" in command and "trial=" not in command
    # The report's Search section: every trial's state, the best config as a command line.
    page = (sweep / "report.html").read_text()
    assert "<h2>Search</h2>" in page and page.count("pruned") >= 1
    assert f"optimizer.learning_rate={best.params['optimizer.learning_rate']!r}" in page
    assert (sweep / "search_history.png").is_file()
    rows = {r["job"]: r for r in json.loads((sweep / "runs.json").read_text())}
    for trial in study.trials:
        row = rows[trial.user_attrs["name"]]
        assert row["trial"] == trial.number and row["trial_state"] == {"completed": "complete"}.get(
            STATE_OF[trial.state], STATE_OF[trial.state])
        assert row["objective"] == (trial.value if trial.state == TrialState.COMPLETE else None)

    # resume=true with one more trial: the four are kept, one new trial is drawn (not a repeat).
    proc = run_train(*args[:2], "hydra.sweeper.search.n_trials=5", *args[3:], "resume=true", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 skipped (already done)" in proc.stdout
    study = load_study(sweep)
    assert len(study.trials) == 5 and study.trials[4].params not in [t.params for t in study.trials[:4]]
    check_trials_agree_with_their_runs(sweep, study)


def test_an_interrupted_trial_continues_from_its_state(tmp_path):
    sweep = tmp_path / "search"
    args = [sys.executable, str(TRAIN), "-m", "hparams_search=lr_dim", "hydra.sweeper.search.n_trials=1", *FAST,
            "output.save_state_every_n_steps=5", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    code, out = sigterm_after_steps(args, sweep / "trial-000", 14, sig=signal.SIGINT)
    assert code == 130, out[-3000:]  # as a grid stopped by Ctrl-C
    assert summary(sweep / "trial-000")["status"] == "interrupted"
    assert (sweep / "trial-000" / "training_state.pt").is_file()
    assert load_study(sweep).trials[0].state == TrialState.RUNNING

    proc = run_train(*args[2:], "resume=true", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from training_state.pt: step" in proc.stdout + proc.stderr
    study = load_study(sweep)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert summary(sweep / "trial-000")["steps"] == 36


def test_a_grid_with_pruning_stops_the_run_that_falls_behind(tmp_path):
    """Each job in a process of its own (hydra/launcher=local_gpus, one CPU slot): a pruned
    run exits at once, its slot takes the next job, and the launcher says "pruned"."""
    sweep = tmp_path / "grid"
    args = ["-m", "optimizer.learning_rate=4e-3,1e-7", "dataset.validation_split=0.25", "hydra.sweeper.prune=true",
            "hydra.sweeper.pruner.n_startup_trials=1", "hydra/launcher=local_gpus", "hydra.launcher.gpus=null",
            "hydra.launcher.cpu_slots=1", *FAST, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = run_train(*args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 completed, 0 skipped (already done), 0 failed, 1 pruned" in proc.stdout
    study = load_study(sweep)
    assert study.user_attrs["kind"] == "grid"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    names = ["optimizer.learning_rate=0.004", "optimizer.learning_rate=1e-07"]  # as Hydra writes the values
    assert [t.user_attrs["name"] for t in study.trials] == names
    pruned = sweep / names[1]
    # 23 batches an epoch: pruned at its first report after the warm-up, the first epoch's end.
    assert summary(pruned)["status"] == "pruned" and summary(pruned)["steps"] == 23
    # A pruned job is over: a resumed grid trains neither again.
    proc = run_train(*args, "resume=true", timeout=600)
    assert proc.returncode == 0 and "0 completed, 2 skipped (already done)" in proc.stdout


def test_a_search_trains_its_trials_fused(tmp_path):
    sweep = tmp_path / "fused"
    proc = run_train("-m", "hparams_search=lr_dim", "hydra/launcher=fused", "network.train_unet_only=true",
                     "hydra.sweeper.search.n_trials=2",
                     "hydra.sweeper.search.n_jobs=2", *FAST, f"hydra.sweep.dir={sweep}", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fused group 0: trial-000, trial-001" in proc.stdout + proc.stderr
    study = load_study(sweep)
    for trial in study.trials:
        run = summary(sweep / trial.user_attrs["name"])
        assert run["fused"]["lanes"] == 2
        assert trial.intermediate_values.keys() == {12, 24}  # both lanes reported from the group's process
    check_trials_agree_with_their_runs(sweep, study)


def test_a_failed_trial_is_recorded_with_its_reason_and_the_search_goes_on(tmp_path):
    sweep = tmp_path / "failing"
    proc = run_train("-m", "hparams_search=lr_dim", "hydra.sweeper.search.sampler=grid", "hydra.sweeper.search.n_trials=9",
                     "network.dim=choice(0,4)", "network.alpha=1", "optimizer.learning_rate=1e-3",
                     "training.max_train_steps=3", *FAST[1:4], f"hydra.sweep.dir={sweep}", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load_study(sweep)
    assert len(study.trials) == 2  # the grid holds 2 configs: n_trials is capped to it
    by_dim = {t.params["network.dim"]: t for t in study.trials}
    assert by_dim[4].state == TrialState.COMPLETE
    assert by_dim[0].state == TrialState.FAIL and "network.dim" in by_dim[0].user_attrs["reason"]
    assert "1 completed, 0 skipped (already done), 1 failed" in proc.stdout


def test_any_numeric_summary_key_is_the_objective_and_pruning_needs_a_minimum(tmp_path):
    sweep = tmp_path / "objective"
    common = ["-m", "hparams_search=lr_dim", "hydra.sweeper.search.n_trials=1", "training.max_train_steps=3",
              *FAST[1:4], f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = run_train(*common, "hydra.sweeper.search.objective=final_loss", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (trial,) = load_study(sweep).trials
    assert trial.value == summary(sweep / "trial-000")["final_loss"]
    proc = run_train(*common, "hydra.sweeper.search.direction=maximize", "overwrite=true", timeout=600)
    assert proc.returncode == 1
    assert "hydra.sweeper.prune=true compares the runs' validation losses" in proc.stderr
    assert not (sweep / "trial-000" / "summary.json").exists()  # moved aside by overwrite=true; nothing trained
