"""Run dirs and sweep dirs belong to one config and one writer ([14] points 1-3), tried as a
hostile user would: real train.py processes, real files, every byte of what was there checked."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.outputs.guard import differing_keys
from atelier.outputs.lock import DirLockedError, lock_dir, unlock_dir
from tests.helpers import REPO_ROOT, TRAIN, run_train

SMOKE = ("debug=smoke",)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file below `directory` (hidden ones included) and its content's digest."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    return proc.stderr


# ------------------------------------------------------------------ point 1: names
@pytest.mark.parametrize(
    "override, problem",
    [("output.output_name=/tmp/atelier-precious/precious", "separator"), ("output.output_name=../x", "separator"),
     ("output.output_name=sub/dir/name", "separator"), ("output.output_name=''", "empty"),
     ("output.output_name=.hidden", "starts with '.'"), ("project=../../x", "separator"), ("project=..", "starts with '.'"),
     ("project=a\\\\b", "separator"), ("output.output_name=..", "starts with '.'")],
)  # fmt: skip
def test_names_that_are_paths_fail_before_anything_is_written(tmp_path, override, problem):
    precious = Path("/tmp/atelier-precious/precious.safetensors")
    precious.parent.mkdir(exist_ok=True)
    precious.write_bytes(b"the user's own LoRA")
    outputs = tmp_path / "outputs"
    proc = run_train(*SMOKE, override, f"hydra.run.dir={outputs}/run", cwd=tmp_path)
    key = override.split("=")[0]
    refused(proc, key, problem, "it is a name, not a path")
    assert not outputs.exists()  # not even .hydra/
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()
    assert precious.read_bytes() == b"the user's own LoRA"


def test_a_sweep_with_a_path_among_its_names_writes_nothing(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_train("-m", *SMOKE, "output.output_name=ok,../escape", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    refused(proc, "output.output_name='../escape'", "separator")
    assert not sweep_dir.exists() and not (tmp_path / "escape.safetensors").exists()


# ------------------------------------------------------------------ point 2: ownership
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_train(*SMOKE, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_finished_run_dir_refuses_another_config_and_keeps_every_file(finished_run):
    before = snapshot(finished_run)
    proc = run_train(*SMOKE, "optimizer.learning_rate=2e-4", "network.dim=4", f"hydra.run.dir={finished_run}")
    refused(proc, str(finished_run), "another config", "network.dim", "optimizer.learning_rate", "overwrite=true")
    assert snapshot(finished_run) == before


def test_a_finished_run_dir_refuses_the_same_config_unless_resume(finished_run):
    before = snapshot(finished_run)
    refused(run_train(*SMOKE, f"hydra.run.dir={finished_run}"), "finished run", "resume=true", "overwrite=true")
    assert snapshot(finished_run) == before
    kept = run_train(*SMOKE, "resume=true", f"hydra.run.dir={finished_run}")
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert "nothing to train" in kept.stdout + kept.stderr
    # Only the records of this command changed (.hydra/overrides.yaml, a line in train.log,
    # the lock's holder); the results did not.
    records = (".hydra/", "train.log", ".atelier.lock")
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if not k.startswith(records)} == \
        {k: v for k, v in before.items() if not k.startswith(records)}


def test_overwrite_moves_the_old_results_aside(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(*SMOKE, f"hydra.run.dir={run_dir}").returncode == 0
    before = snapshot(run_dir)
    proc = run_train(*SMOKE, "optimizer.learning_rate=3e-4", "overwrite=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (aside,) = run_dir.glob("replaced-*")
    moved = snapshot(aside)
    assert {k: v for k, v in before.items() if k != ".atelier.lock"} == moved  # every old file, unchanged
    assert "learning_rate: 0.0003" in (run_dir / "config.yaml").read_text()
    assert "learning_rate: 0.0001" in (aside / "config.yaml").read_text()


def test_a_folder_of_the_users_is_never_written(tmp_path):
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "notes.txt").write_text("precious\n")
    before = snapshot(folder)
    for extra in ((), ("overwrite=true",), ("resume=true",)):
        refused(run_train(*SMOKE, *extra, f"hydra.run.dir={folder}"), str(folder), "did not write")
        assert snapshot(folder) == before


def test_an_unfinished_run_of_the_same_config_continues(tmp_path):
    """A run stopped before its end (here: a state file and no summary) is continued, as a
    requeued SLURM job must be; another config is refused there too."""
    run_dir = tmp_path / "run"
    assert run_train(*SMOKE, "training.max_train_steps=1", f"hydra.run.dir={run_dir}").returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    refused(run_train(*SMOKE, "training.max_train_steps=2", f"hydra.run.dir={run_dir}"), "training.max_train_steps")
    proc = run_train(*SMOKE, "training.max_train_steps=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_differing_keys_names_nested_keys_and_leaves_bookkeeping_out():
    old = {"resume": False, "optimizer": {"learning_rate": 1e-4, "type": "AdamW"}, "network": {"dim": 8}}
    new = {"resume": True, "overwrite": True, "optimizer": {"learning_rate": 2e-4, "type": "AdamW"}, "network": {"dim": 8},
           "extra": {"key": 1}}  # fmt: skip
    assert differing_keys(old, new) == ["extra.key", "optimizer.learning_rate"]
    assert differing_keys(old, old) == []


# ------------------------------------------------------------------ point 2: sweeps
def sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_train("-m", *SMOKE, "network.dim=2,4", *overrides, f"hydra.sweep.dir={sweep_dir}")


def test_a_finished_sweep_dir_is_refused_and_a_changed_resume_runs_new_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    assert sweep(sweep_dir).returncode == 0
    multirun = (sweep_dir / "multirun.yaml").read_text()
    jobs = {name: snapshot(sweep_dir / name) for name in ("network.dim=2", "network.dim=4")}

    refused(sweep(sweep_dir), "already holds a sweep", "resume=true", "overwrite=true")
    # Same values, resume=true: everything is skipped, nothing rewritten.
    proc = sweep(sweep_dir, "resume=true")
    assert proc.returncode == 0 and "0 completed, 2 skipped" in proc.stdout, proc.stdout[-2000:]
    # Another learning rate with resume=true: the old jobs are never relabelled; the new
    # config runs as new jobs beside them.
    proc = sweep(sweep_dir, "optimizer.learning_rate=3e-4", "resume=true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 completed, 0 skipped" in proc.stdout
    for name, files in jobs.items():
        # The report redraws its own images (report_*) in every job dir; the results stay as they were.
        results = {k: v for k, v in snapshot(sweep_dir / name).items() if not k.startswith("report_")}
        assert results == {k: v for k, v in files.items() if not k.startswith("report_")}
        assert "learning_rate: 0.0001" in (sweep_dir / name / "config.yaml").read_text()
        assert "learning_rate: 0.0003" in (sweep_dir / f"{name}@2" / "config.yaml").read_text()
        new_job = sweep_dir / f"{name}@2"
        assert (new_job / json.loads((new_job / "summary.json").read_text())["output_file"]).is_file()
    assert (sweep_dir / "multirun.yaml").read_text() == multirun  # still describes the first jobs
    (resumed,) = sweep_dir.glob("multirun-resumed-*.yaml")
    assert "optimizer.learning_rate=3e-4" in resumed.read_text()


# ------------------------------------------------------------------ point 3: one writer
def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from atelier.outputs.lock import lock_dir;"
         "lock_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(run_dir)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_dir)
        started = time.time()
        proc = run_train(*SMOKE, f"hydra.run.dir={run_dir}")
        refused(proc, str(run_dir), f"pid {holder.pid}", "host")
        assert time.time() - started < 60
        assert snapshot(run_dir) == before  # no .hydra/, no config.yaml from the refused run
        with pytest.raises(DirLockedError, match=f"pid {holder.pid}"):
            lock_dir(run_dir)
    finally:
        holder.kill()
        holder.wait()
    # The OS released the dead holder's lock: a new writer takes it.
    lock_dir(run_dir)
    unlock_dir(run_dir)


def test_a_killed_launcher_takes_its_training_children_with_it(tmp_path):
    """kill -9 of a local_gpus sweep: its job (own session) gets SIGTERM from the kernel,
    saves its state and stops; a resume then finishes it."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(TRAIN), "-m", "hydra/launcher=local_gpus", "hydra.launcher.cpu_slots=1",
               "hydra.launcher.gpus=null", "network.dim=4,8", "training.max_train_epochs=6", "output.save_every_n_epochs=null",
               "sampling.sample_every_n_epochs=null", "sampling.limit=1", "sampling.steps=1", f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = sweep_dir / "network.dim=4"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (job / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert (job / "metrics.jsonl").is_file(), "the job never started training"
        child_pid = json.loads((job / ".atelier.lock").read_text())["pid"]
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    deadline = time.time() + 120
    while time.time() < deadline and _alive(child_pid):
        time.sleep(0.2)
    assert not _alive(child_pid), "the training child outlived its launcher"
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert (job / "training_state.pt").is_file()
    assert not (sweep_dir / "network.dim=8" / "summary.json").exists()  # queued: never started
    proc = subprocess.run([*command[:-1], "resume=true", command[-1]],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("network.dim=4", "network.dim=8"):
        assert json.loads((sweep_dir / name / "summary.json").read_text())["status"] == "completed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
