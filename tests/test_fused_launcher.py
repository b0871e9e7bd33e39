"""hydra/launcher=fused: a sweep's groupable jobs trained in one pass, each in its own run dir.

The sweep runs as a user runs it (train.py -m in a subprocess); its three jobs come from a
config group the test writes (`+case=...`), so exactly two can share a pass and one
cannot. The fused worker's stop and resume are tested on the worker process itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.fused.grouping import plan_groups
from atelier.fused.trainer import run_fused
from atelier.network.lora_file import load_lora
from atelier.outputs.run_dir import write_resolved_config
from tests.helpers import REPO_ROOT, TRAIN, final_lora, final_loras, logged_steps, run_train, sigterm_after_steps
from tests.test_fused import COMMON, LANES, assert_same_weights
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (fixture)

SGD = ["optimizer=sgd_nesterov", "training.max_grad_norm=0"]
# A case sets keys the command line does not (the command line would win).
CASES = {
    # Two lanes of one group: other dim, lr and seed; the second diverges to NaN at step 2.
    "lane_ok": {"network": {"dim": 4, "alpha": 2, "train_unet_only": True}, "optimizer": {"learning_rate": 1e-2}},
    "lane_nan": {"network": {"dim": 2, "alpha": 1, "train_unet_only": True}, "optimizer": {"learning_rate": 1e12},
                 "training": {"seed": 7}},
    # Trains the text encoder too: cannot be a lane, runs alone.
    "alone": {"network": {"dim": 4, "train_unet_only": False}, "optimizer": {"learning_rate": 1e-2}},
}
RUN_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "command.sh", "config.yaml",
             "env.json", "metrics.jsonl", "summary.json", "train.log", "stdout.log", "stderr.log", "lr_schedule.png",
             "<lora>.safetensors", "sample_grid.png", "samples/samples.json"}  # fmt: skip


def write_cases(root: Path) -> Path:
    conf = root / "conf"
    (conf / "case").mkdir(parents=True)
    for name, values in CASES.items():
        text = "# @package _global_\n" + json.dumps(values)  # JSON is YAML
        (conf / "case" / f"{name}.yaml").write_text(text)
    return conf


def files_of(run_dir: Path) -> set[str]:
    """The run dir's files, event and sample file names (time-stamped) as placeholders."""
    names = set()
    for path in run_dir.rglob("*"):
        if path.is_file():
            name = path.relative_to(run_dir).as_posix()
            if name.startswith("tensorboard/"):
                name = "tensorboard/<events>"
            elif name.startswith("samples/") and name.endswith(".png"):
                name = "samples/<image>.png"
            elif path in final_loras(run_dir):  # named by the job's swept values
                name = "<lora>.safetensors"
            names.add(name)
    return names


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_sweep")
    conf = write_cases(root)
    sweep_dir = root / "sweep"
    proc = run_train(
        "-m", "--config-dir", str(conf), "hydra/launcher=fused", "hydra.launcher.gpus=[0,1]", "debug=smoke", "training.max_train_steps=3",
        *SGD, "+case=lane_ok,lane_nan,alone", f"hydra.sweep.dir={sweep_dir}",
        timeout=600,
    )  # fmt: skip
    return proc, sweep_dir, root


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_groupable_jobs_share_a_pass_and_the_others_run_alone(sweep):
    proc, sweep_dir, _ = sweep
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # one job failed (NaN): the sweep says so
    assert "fused group 0: case=lane_ok, case=lane_nan" in out
    assert "case=alone runs alone: network.train_unet_only must be true" in out
    lane_ok, lane_nan, alone = (summary_of(sweep_dir / f"case={name}") for name in CASES)
    runs = ["case=lane_ok", "case=lane_nan"]
    assert lane_ok["fused"] == {"lane": 0, "lanes": 2, "runs": runs}
    assert lane_nan["fused"] == {"lane": 1, "lanes": 2, "runs": runs}
    assert "fused" not in alone
    assert (lane_ok["status"], lane_nan["status"], alone["status"]) == ("completed", "failed", "completed")
    # One process per GPU of the list: the group on the first, the job alone on the second.
    devices = [json.loads((sweep_dir / f"case={name}" / "env.json").read_text())["CUDA_VISIBLE_DEVICES"]
               for name in CASES]  # fmt: skip
    assert devices == ["0", "0", "1"]
    # The group's process output is each lane's stdout/stderr.log.
    group_log = sweep_dir / "fused_groups" / "0" / "stderr.log"
    assert (sweep_dir / "case=lane_ok" / "stderr.log").resolve() == group_log.resolve()


def test_a_nan_lane_fails_alone_and_the_sweep_reports_why(sweep):
    proc, sweep_dir, _ = sweep
    lane_ok, lane_nan = summary_of(sweep_dir / "case=lane_ok"), summary_of(sweep_dir / "case=lane_nan")
    assert "NonFiniteLossError" in lane_nan["reason"] and "step 2" in lane_nan["reason"]
    assert lane_nan["steps"] == 1 and not final_loras(sweep_dir / "case=lane_nan")
    assert lane_ok["steps"] == 3 and lane_ok["final_loss"] == lane_ok["final_loss"]  # finite, not NaN
    assert "sweep finished: 2 completed, 0 skipped (already done), 1 failed" in proc.stdout
    runs = json.loads((sweep_dir / "runs.json").read_text())
    assert [(r["case"], r["status"]) for r in runs] == [("lane_ok", "completed"), ("lane_nan", "failed"),
                                                         ("alone", "completed")]  # fmt: skip
    assert "NonFiniteLossError" in runs[1]["reason"]
    assert (sweep_dir / "report.html").is_file()


def test_a_fused_run_dir_holds_what_a_run_alone_does(sweep):
    _, sweep_dir, _ = sweep
    fused, alone = sweep_dir / "case=lane_ok", sweep_dir / "case=alone"
    assert RUN_FILES <= files_of(alone)
    assert files_of(fused) == files_of(alone)
    assert list((fused / "samples").glob("*.png"))
    overrides = (fused / ".hydra" / "overrides.yaml").read_text()
    assert "+case=lane_ok" in overrides and "hydra/launcher" not in overrides
    resolved = (fused / "config.yaml").read_text()
    assert "dim: 4" in resolved and "learning_rate: 0.01" in resolved
    # Each lane's log has the shared lines and its own, not the other lane's.
    log0, log1 = ((sweep_dir / f"case={name}" / "train.log").read_text() for name in ("lane_ok", "lane_nan"))
    assert "training 2 runs in one fused pass" in log0 and "training 2 runs in one fused pass" in log1
    assert "lane 0 (case=lane_ok) completed: 3 steps" in log0 and "lane 1" not in log0
    assert "lane 1 (case=lane_nan) failed" in log1 and "lane 0" not in log1
    # The lanes share one dataset and VAE: the first encodes the latents, the second reads them.
    assert "encoded=11" in log0 and "memory_hits=11, disk_hits=0, encoded=0" in log1


def test_a_fused_lane_replays_alone_to_the_same_weights(sweep, tmp_path):
    _, sweep_dir, _ = sweep
    fused = sweep_dir / "case=lane_ok"
    replay = tmp_path / "replay"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(fused / "command.sh"), f"hydra.run.dir={replay}"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused" not in summary_of(replay)
    gap = assert_same_weights(load_lora(final_lora(fused))[0], load_lora(final_lora(replay))[0])
    assert gap < 1e-8, gap  # SGD: linear in the gradient, equal to rounding


def cfg_list(lanes: list[list[str]]):
    return [make_cfg(*COMMON, *o) for o in lanes]


def test_plan_groups_packs_evenly_and_says_why_a_job_runs_alone():
    fusable = cfg_list([LANES[i % 3] for i in range(5)])
    other_batch = make_cfg(*COMMON, "training.train_batch_size=1")
    not_a_lane = make_cfg("training.max_train_steps=3")
    plan = plan_groups([*fusable, other_batch, None, not_a_lane], max_adapters=2)
    assert plan.groups == [[0, 1], [2, 3]]
    assert "max_adapters=2 left it without a partner" in plan.alone[4]
    assert "no other job" in plan.alone[5]
    assert plan.alone[6] == "its config is invalid"
    assert "train_unet_only must be true" in plan.alone[7]
    assert plan_groups(fusable, max_adapters=8).groups == [[0, 1, 2, 3, 4]]
    assert plan_groups(fusable, max_adapters=3).groups == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="max_adapters must be at least 1"):
        plan_groups(fusable, max_adapters=0)


WORKER = [sys.executable, "-m", "atelier.fused.worker"]
ACCUM = ["training.gradient_accumulation_steps=2"]


def test_a_stopped_fused_group_saves_each_lane_and_resumes_to_the_same_weights(tmp_path):
    # Lane 1 accumulates 2 batches per step: a stop inside its group lets it finish the group.
    lanes = [[*LANES[0], "training.max_train_steps=8"], [*LANES[1], *ACCUM, "training.max_train_steps=4"]]
    cfgs = cfg_list(lanes)
    expected_dirs = [tmp_path / "expected" / str(i) for i in range(2)]
    run_fused(cfgs, expected_dirs)
    dirs = [tmp_path / "run" / str(i) for i in range(2)]
    for cfg, run_dir in zip(cfgs, dirs):
        run_dir.mkdir(parents=True)
        write_resolved_config(run_dir, cfg)
    code, out = sigterm_after_steps([*WORKER, *map(str, dirs)], dirs[0], steps=3)
    assert code == 143, out[-3000:]
    for run_dir in dirs:
        summary = summary_of(run_dir)
        assert summary["status"] == "interrupted" and "stopped by SIGTERM" in summary["reason"], summary
        assert (run_dir / "training_state.pt").is_file() and not final_loras(run_dir)
    assert summary_of(dirs[0])["steps"] < 8
    proc = subprocess.run([*WORKER, *map(str, dirs)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run_dir, expected in zip(dirs, expected_dirs):
        assert summary_of(run_dir)["status"] == "completed"
        assert not (run_dir / "training_state.pt").exists()
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if "loss/step" in line]  # fmt: skip
        assert steps == list(range(1, len(steps) + 1))  # each step logged once
        # Not bitwise: a lane inside an accumulation group at the stop took one more batch,
        # so after the resume the lanes share other fused steps than in the run never
        # stopped (lane 0's last step may run alone); another batch size is another BLAS
        # kernel, a rounding gap that AdamW carries (test_fused.ATOL explains the bound).
        assert_same_weights(load_lora(final_lora(run_dir))[0], load_lora(final_lora(expected))[0])
    assert "resuming from training_state.pt" in (dirs[0] / "train.log").read_text()


def test_ctrl_c_interrupts_every_lane_and_resume_true_finishes_them(tmp_path):
    """SIGINT to a fused sweep: the group saves each lane; the same sweep with resume=true
    regroups the unfinished jobs and each lane continues to the weights of a run never stopped."""
    sweep_dir = tmp_path / "sweep"
    axes = [*SGD, "network.train_unet_only=true", "training.max_train_steps=12", "sampling.limit=1",
            "sampling.steps=1", "sampling.sample_every_n_epochs=null", "output.save_every_n_epochs=null"]  # fmt: skip
    command = [sys.executable, str(TRAIN), "-m", "hydra/launcher=fused", *axes, "network.dim=2,4",
               f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lanes = [sweep_dir / "network.dim=2", sweep_dir / "network.dim=4"]
    deadline = time.time() + 240
    while logged_steps(lanes[0]) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, out[-3000:]
    assert "2 interrupted" in out
    for lane in lanes:
        summary = summary_of(lane)
        assert summary["status"] == "interrupted" and "stopped by SIGTERM" in summary["reason"], summary
        assert (lane / "training_state.pt").is_file()
    assert logged_steps(lanes[0]) < 12

    resumed = subprocess.run([*command, "resume=true"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "fused group 0: network.dim=2, network.dim=4" in resumed.stdout + resumed.stderr
    expected_dirs = [tmp_path / "expected" / lane.name for lane in lanes]
    run_fused([make_cfg(*axes, f"network.dim={d}") for d in (2, 4)], expected_dirs)
    for lane, expected in zip(lanes, expected_dirs):
        assert summary_of(lane)["status"] == "completed" and logged_steps(lane) == 12
        gap = assert_same_weights(load_lora(final_lora(lane))[0], load_lora(final_lora(expected))[0])
        assert gap < 1e-8, (lane.name, gap)
