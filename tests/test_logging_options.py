"""output.log_with / logging_dir / log_prefix / log_tracker_name / wandb_run_name (sd-scripts'
logging options): the trackers write what metrics.jsonl holds, where sd-scripts would, one
tracker run per run (sweep jobs, fused lanes). wandb runs offline (WANDB_MODE=offline) and its
.wandb file is read back."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from atelier.errors import UserError
from atelier.fused.trainer import run_fused
from atelier.loop.trackers import PLACE_FILE, log_place
from tests.helpers import run_train
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged, train  # noqa: F401  (fixture)

SHORT = ["training.max_train_steps=3", "network.train_unet_only=true"]


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: wandb's ":W&B" header, then a LevelDB-style log
    (32 KiB blocks; each chunk: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_run(folder: Path) -> dict[str, Any]:
    """The one offline run under `folder`/wandb: its project, name, config and history rows by step."""
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    run: dict[str, Any] = {"history": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(project=record.run.project, name=record.run.display_name,
                       config={item.key or "/".join(item.nested_key): json.loads(item.value_json)
                               for item in record.run.config.update})
        elif kind == "history":
            # a key holding "/" ("loss/step") comes as its parts in nested_key
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"][row["_step"]] = row
    return run


def assert_holds_the_metrics(run: dict[str, Any], run_dir: Path) -> None:
    logged = steps_logged(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for record in logged:
        row = run["history"][record["step"]]
        assert row["loss/step"] == pytest.approx(record["loss/step"]) and row["lr/unet"] == record["lr/unet"]
        assert row["epoch"] == record["epoch"]


def test_default_is_tensorboard_in_the_run_dir_and_nothing_else(tmp_path):
    run_dir, _ = train(tmp_path, *SHORT)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run_dir / "wandb").exists() and not (run_dir / PLACE_FILE).exists()


def test_wandb_offline_run_holds_the_logged_metrics(tmp_path, wandb_offline):
    run_dir, _ = train(tmp_path, *SHORT, "network.dim=4", "output.log_with=all")
    run = wandb_run(run_dir)
    assert run["project"] == "network_train" and run["name"] == "demo"  # sd-scripts' tracker name; output_name
    assert run["config"]["network"]["dim"] == 4  # the resolved config, to compare a sweep's runs
    assert_holds_the_metrics(run, run_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # all = both
    place = json.loads((run_dir / PLACE_FILE).read_text())
    assert place["wandb_id"] and place["wandb_id"] in str(next((run_dir / "wandb").glob("offline-run-*")))


def test_logging_dir_holds_a_folder_per_run_as_sd_scripts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    run_dir, _ = train(tmp_path, *SHORT, f"output.logging_dir={logs}", "output.log_prefix=mine-",
                       "output.log_tracker_name=chars")  # fmt: skip
    (folder,) = logs.iterdir()
    assert re.fullmatch(r"mine-\d{14}_demo", folder.name), folder.name
    events = EventAccumulator(str(folder / "chars"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/step")] == [1, 2, 3]
    assert not (run_dir / "tensorboard").exists()
    # A resumed run goes on in the same folder (its TensorBoard writer purges the steps after its state).
    cfg = make_cfg(*SHORT, f"output.logging_dir={logs}", "output.log_prefix=mine-", "output.log_tracker_name=chars")
    assert log_place(cfg, run_dir, resumed=True).folder == str(folder)


def test_fused_lanes_log_each_to_their_own_wandb_run(tmp_path, wandb_offline):
    lanes = [["network.dim=4", "output.output_name=lane-a"], ["network.dim=2", "output.output_name=lane-b"]]
    cfgs = [make_cfg(*SHORT, "output.log_with=wandb", *lane) for lane in lanes]
    dirs = [tmp_path / f"lane{i}" for i in range(2)]
    run_fused(cfgs, dirs)
    runs = [wandb_run(d) for d in dirs]
    assert [r["name"] for r in runs] == ["lane-a", "lane-b"]
    assert [r["config"]["network"]["dim"] for r in runs] == [4, 2]
    for run, run_dir in zip(runs, dirs):
        assert_holds_the_metrics(run, run_dir)  # its own lane's numbers, not the other's
        assert not (run_dir / "tensorboard").exists()  # wandb only
    assert runs[0]["history"][3]["loss/step"] != runs[1]["history"][3]["loss/step"]


def test_only_the_main_process_of_a_data_parallel_run_logs(tmp_path, wandb_offline):
    from types import SimpleNamespace

    from atelier.loop.adapter import Adapter
    from atelier.loop.metrics import NullMetrics

    cfg = make_cfg("output.log_with=all", f"output.logging_dir={tmp_path / 'logs'}")
    adapter = Adapter(cfg, tmp_path / "run")
    adapter.parallel = SimpleNamespace(is_main=False)  # rank 1 of 2
    adapter.open_metrics(resumed=False)
    assert isinstance(adapter.metrics, NullMetrics) and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_each_job_of_a_sweep_is_its_own_wandb_run(tmp_path, wandb_offline):
    proc = run_train("-m", "network.dim=2,4", "debug=smoke", "output.log_with=wandb", "output.log_tracker_name=study",
                     cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "demo" / "sweep").iterdir()
    runs = {job.name: wandb_run(job) for job in sweep.iterdir() if (job / "wandb").is_dir()}
    assert set(runs) == {"network.dim=2", "network.dim=4"}
    assert {r["project"] for r in runs.values()} == {"study"}
    assert {r["name"] for r in runs.values()} == {"demo_dim-2", "demo_dim-4"}  # named after the job's values
    assert all(r["history"] for r in runs.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["output.log_with=comet"], r"output.log_with='comet' is not a tracker: pass one of tensorboard, wandb, all"),
        (["output.log_prefix=x-"], r"output.log_prefix='x-' does nothing here: .* output.logging_dir"),
        (["output.log_tracker_name=t"], r"output.log_tracker_name='t' does nothing here"),
        (["output.wandb_run_name=r"], r"output.wandb_run_name='r' does nothing here: .*log_with=wandb"),
        (["output.logging_dir=/tmp/l", "output.log_tracker_name=a/b"], r"output.log_tracker_name='a/b' holds a path"),
    ],
)
def test_a_logging_value_that_cannot_work_fails_before_training_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        make_cfg(*overrides)


def exported_args(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    from atelier.outputs.run_dir import write_resolved_config
    from atelier.tools.export_kohya import build_export, load_run_config
    from tests.test_options import compose_config

    run_dir = tmp_path / "run"
    write_resolved_config(run_dir, compose_config(*overrides))
    return build_export(load_run_config(run_dir), tmp_path / "export").args


def test_export_kohya_gives_the_logging_options(tmp_path):
    default = exported_args(tmp_path)
    assert default["logging_dir"] == str(tmp_path / "export" / "sd-scripts" / "logs")  # as before: TensorBoard
    assert not {"log_with", "log_prefix", "log_tracker_name", "wandb_run_name"} & set(default)
    args = exported_args(tmp_path, "output.log_with=wandb", f"output.logging_dir={tmp_path / 'logs'}",
                         "output.log_prefix=mine-", "output.log_tracker_name=chars")  # fmt: skip
    assert args["logging_dir"] == str(tmp_path / "logs")  # the run's own folder, not the export's
    assert (args["log_with"], args["log_prefix"], args["log_tracker_name"]) == ("wandb", "mine-", "chars")
    assert args["wandb_run_name"] == "demo"  # our default name, spelled out for sd-scripts


# --- output.log_tracker_config (sd-scripts' --log_tracker_config) ------------------------


def test_tracker_config_arguments_reach_wandb_and_tensorboard(tmp_path, wandb_offline):
    from atelier.loop.trackers import TensorBoardTracker, open_trackers

    toml = tmp_path / "trackers.toml"
    toml.write_text('[wandb]\nnotes = "first try"\ntags = ["style", "v1"]\n\n[tensorboard]\nfilename_suffix = ".mine"\n')
    run_dir, _ = train(tmp_path, *SHORT, "output.log_with=all", f"output.log_tracker_config={toml}")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*.mine"))  # SummaryWriter got it
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    record = next(r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run")
    assert record.notes == "first try" and list(record.tags) == ["style", "v1"]
    assert_holds_the_metrics(wandb_run(run_dir), run_dir)
    # Without the file, the writer's files keep their plain names.
    cfg = make_cfg(*SHORT)
    (tracker,) = open_trackers(cfg, tmp_path / "plain", None)
    assert isinstance(tracker, TensorBoardTracker)
    tracker.close()
    assert not list((tmp_path / "plain" / "tensorboard").glob("*.mine"))


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (None, [], r"output.log_tracker_config=.*missing.toml: no such file"),
        ("[wandb\n", ["output.log_with=wandb"], r"not a readable TOML file"),
        ("[comet]\nx = 1\n", [], r"\[comet\] is not a tracker's table"),
        ("[wandb]\nname = 'x'\n", ["output.log_with=wandb"], r"\[wandb\] name is set by output.wandb_run_name"),
        ("[tensorboard]\nlog_dir = 'x'\n", [], r"\[tensorboard\] log_dir is set by output.logging_dir"),
        ("[wandb]\nnotez = 'x'\n", ["output.log_with=wandb"], r"\[wandb\] notez: not an argument of wandb.init"),
        ("[tensorboard]\nflush = 1\n", [], r"\[tensorboard\] flush: not an argument of .*SummaryWriter .*flush_secs"),
        ("[wandb]\nnotes = 'x'\n", [], r"its \[wandb\] table does nothing here: set output.log_with=wandb"),
    ],
)
def test_a_tracker_config_that_cannot_work_fails_naming_the_file_and_key(tmp_path, text, overrides, message):
    path = tmp_path / ("missing.toml" if text is None else "trackers.toml")
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message):
        make_cfg(*overrides, f"output.log_tracker_config={path}")


def test_export_kohya_gives_the_tracker_config(tmp_path):
    toml = tmp_path / "trackers.toml"
    toml.write_text("[tensorboard]\nflush_secs = 30\n")
    assert exported_args(tmp_path, f"output.log_tracker_config={toml}")["log_tracker_config"] == str(toml.resolve())
