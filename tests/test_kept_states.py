"""Training states kept to train on from later, and training from them (sd-scripts'
--save_state_on_train_end, --save_last_n_epochs_state / --save_last_n_steps_state, --resume):
output.save_state_on_train_end, output.save_last_n_*_state and training.resume_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atelier.errors import UserError
from atelier.loop.state import STATE_FILE, ResumeError
from atelier.network.lora_file import load_lora
from atelier.outputs.rotation import fallen_out
from tests.test_dataset_pipeline import make_images
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged, train  # noqa: F401  (fixture)

# 4 images, batch 2: 2 steps an epoch. A constant schedule: its lr does not depend on the run's length.
SHORT = ["network.train_unet_only=true", "scheduler=constant", "output.save_every_n_epochs=null"]


@pytest.fixture
def four_images(tmp_path: Path) -> list[str]:
    root = make_images(tmp_path / "data", "1_cube", [(64, 64)] * 4, captions=[f"a cube {i}" for i in range(4)])
    return [f"dataset.train_data_dir={root}", "dataset.resolution=64", "training.train_batch_size=2"]


def kept(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("*-state.pt"))


def test_the_last_n_epoch_states_are_kept(tmp_path, four_images):
    run_dir, _ = train(tmp_path, *SHORT, *four_images, "training.max_train_epochs=4",
                       "output.save_last_n_epochs_state=2")  # fmt: skip
    # States are saved at the ends of epochs 1-3 (the 4th ends the run); the last 2 are kept.
    assert kept(run_dir) == ["demo-000002-state.pt", "demo-000003-state.pt"]
    assert not (run_dir / STATE_FILE).exists()  # the continuing state goes with a finished run, as before
    state = torch.load(run_dir / "demo-000003-state.pt", weights_only=True)
    assert (state["epoch"], state["steps"]) == (3, 6)


def test_the_states_of_the_last_n_steps_are_kept(tmp_path, four_images):
    run_dir, _ = train(tmp_path, *SHORT, *four_images, "training.max_train_steps=7",
                       "output.save_state_every_n_steps=2", "output.save_last_n_steps_state=3")  # fmt: skip
    # Saved at steps 2, 4, 6; at step 6 those older than step 3 fell out.
    assert kept(run_dir) == ["demo-step00000004-state.pt", "demo-step00000006-state.pt"]


def test_no_state_is_kept_by_default(tmp_path, four_images):
    run_dir, _ = train(tmp_path, *SHORT, *four_images, "training.max_train_steps=3")
    assert kept(run_dir) == [] and not (run_dir / STATE_FILE).exists()


def test_a_run_resumed_from_the_final_state_equals_one_trained_that_long(tmp_path, four_images):
    first, _ = train(tmp_path, *SHORT, *four_images, "training.max_train_steps=3",
                     "output.save_state_on_train_end=true", name="first")  # fmt: skip
    assert kept(first) == ["demo-state.pt"]
    state = first / "demo-state.pt"
    assert torch.load(state, weights_only=True)["steps"] == 3

    more, _ = train(tmp_path, *SHORT, *four_images, "training.max_train_steps=7", f"training.resume_from={state}",
                    name="more")  # fmt: skip
    straight, _ = train(tmp_path, *SHORT, *four_images, "training.max_train_steps=7", name="straight")
    assert [r["step"] for r in steps_logged(more)] == [4, 5, 6, 7]  # it went on from step 3
    a, b = load_lora(more / "demo.safetensors")[0], load_lora(straight / "demo.safetensors")[0]
    # Same weights, optimizer moments, RNGs and data position: the same steps, bit for bit.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((more / "summary.json").read_text())
    assert summary["steps"] == 7
    assert state.is_file()  # the state it started from is left as it was


def test_resume_from_refuses_what_cannot_go_on(tmp_path, four_images):
    with pytest.raises(UserError, match=r"training.resume_from=.*nothing.pt: no such file"):
        make_cfg(f"training.resume_from={tmp_path / 'nothing.pt'}")
    first, _ = train(tmp_path, *SHORT, *four_images, "training.max_train_steps=3",
                     "output.save_state_on_train_end=true", name="first")  # fmt: skip
    state = first / "demo-state.pt"
    with pytest.raises(ResumeError, match=r"the state is at step 3 and this run ends at step 3: raise "):
        train(tmp_path, *SHORT, *four_images, "training.max_train_steps=3", f"training.resume_from={state}",
              name="same")  # fmt: skip
    with pytest.raises(ResumeError, match=r"training.resume_from=.*demo-state.pt: the state does not fit this "
                                          r"run's network or optimizer .*network.dim"):  # fmt: skip
        train(tmp_path, *SHORT, *four_images, "training.max_train_steps=5", "network.dim=4",
              f"training.resume_from={state}", name="other-dim")  # fmt: skip
    damaged = tmp_path / "damaged-state.pt"
    damaged.write_bytes(state.read_bytes()[:100])
    with pytest.raises(UserError, match=r"damaged-state.pt cannot be read .*Give another state file in "
                                        r"training.resume_from"):  # fmt: skip
        train(tmp_path, *SHORT, *four_images, "training.max_train_steps=5", f"training.resume_from={damaged}",
              name="damaged")  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["output.save_last_n_epochs_state=2", "output.save_state=false"],
         r"output.save_last_n_epochs_state keeps the states saved every output.save_state_every_n_epochs"),
        (["output.save_last_n_steps_state=2"],
         r"output.save_last_n_steps_state .* set output.save_state_every_n_steps"),
        (["output.save_last_n_epochs_state=0"], r"output.save_last_n_epochs_state must be at least 1"),
    ],
)  # fmt: skip
def test_a_kept_state_option_that_would_do_nothing_is_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        make_cfg(*overrides)


def test_only_the_names_of_kept_files_fall_out():
    names = ["demo-000001-state.pt", "demo-000010-state.pt", "demo-000002-state.pt", "demo-state.pt",
             "demo-step00000003-state.pt", "demo-step00000009-state.pt", "other-000001-state.pt",
             "demo-000003.safetensors", "demo-000001-state.pt.bak"]  # fmt: skip
    paths = [Path("/run") / n for n in names]
    old = fallen_out(paths, "demo", "-state.pt", last_n_epochs=2, last_n_steps=5, step=10)
    # Epochs by number (10 is the newest), steps older than 10 - 5; the final state, another
    # output name, a checkpoint and a user's copy are never among them.
    assert sorted(p.name for p in old) == ["demo-000001-state.pt", "demo-step00000003-state.pt"]


def test_export_kohya_gives_the_state_options(tmp_path):
    from tests.test_logging_options import exported_args

    args = exported_args(tmp_path, "output.save_last_n_epochs_state=3", "output.save_state_on_train_end=true")
    assert (args["save_last_n_epochs_state"], args["save_state_on_train_end"], args["save_state"]) == (3, True, True)
    assert "save_state" not in exported_args(tmp_path / "plain")
