"""[13] training.initial_epoch / initial_step / skip_until_initial_step (sd-scripts' options of
those names, as train_network.py reads them): where a run starts counting its epochs and steps,
and with skip_until_initial_step the data it trains from there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atelier.conditioning.training_data import TrainingData
from atelier.errors import ConfigError
from atelier.loop.run import run_training
from atelier.network.lora_file import load_lora
from tests.test_dataset_pipeline import make_images
from tests.test_trainer import (  # noqa: F401  (fixture)
    fresh_accelerate_state,
    interrupt_after_epoch,
    make_cfg,
    steps_logged,
    train,
)

# No epoch checkpoints unless asked; a constant schedule.
SHORT = ["network.train_unet_only=true", "scheduler=constant", "output.save_every_n_epochs=null", "sampling.limit=0"]


@pytest.fixture
def eight_images(tmp_path: Path) -> list[str]:
    """8 images, batch 2: 4 batches an epoch; flips and shuffled captions make each epoch's draws differ."""
    captions = [f"a cube {i}, red, small, shiny" for i in range(8)]
    root = make_images(tmp_path / "data", "1_cube", [(32, 32)] * 8, captions=captions)
    return [f"dataset.train_data_dir={root}", "dataset.resolution=32", "training.train_batch_size=2",
            "dataset.flip_aug=true", "dataset.shuffle_caption=true"]  # fmt: skip


@pytest.fixture
def batches(monkeypatch) -> list[tuple]:
    """Each batch a run trains (its images, flips, captions, noise seed), in order."""
    seen: list[tuple] = []
    monkeypatch.setattr(TrainingData, "load", recording_load(seen))
    return seen


def recording_load(seen: list[tuple]):
    load = TrainingData.load

    def recording(self, epoch_batches):
        for batch in load(self, epoch_batches):
            seen.append((tuple(batch.indices), tuple(batch.flips), tuple(batch.captions), batch.noise_seed))
            yield batch

    return recording


def saved(run_dir: Path) -> dict[str, tuple[str, str]]:
    """Each LoRA file -> (ss_epoch, ss_steps)."""
    found = {}
    for path in sorted(run_dir.glob("*.safetensors")):
        meta = load_lora(path)[1]
        found[path.name] = (meta["ss_epoch"], meta["ss_steps"])
    return found


def test_initial_epoch_numbers_the_epochs_and_trains_the_rest_whole(tmp_path, eight_images):
    # 3 epochs of 4 steps; from epoch 2: epochs 2 and 3, whole, steps counted from 0 (sd-scripts'
    # epoch_to_start; its loop runs out of epochs before max_train_steps).
    run_dir, summary = train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3",
                             "training.initial_epoch=2", "output.save_every_n_epochs=1")  # fmt: skip
    assert saved(run_dir) == {"demo-000002.safetensors": ("2", "4"), "demo.safetensors": ("3", "8")}
    logged = steps_logged(run_dir)
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert [r["epoch"] for r in logged] == [2] * 4 + [3] * 4


def test_initial_step_without_skipping_starts_at_its_epoch(tmp_path, eight_images):
    # Step 6 falls in epoch 2 (steps 4-7): the run trains epochs 2 and 3 whole, as initial_epoch=2.
    run_dir, _ = train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", "training.initial_step=6")
    assert saved(run_dir) == {"demo.safetensors": ("3", "8")}
    # A start inside the first epoch changes nothing (epoch_to_start 0).
    other, _ = train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", "training.initial_step=3",
                     name="inside")  # fmt: skip
    assert saved(other) == {"demo.safetensors": ("3", "12")}


def test_skip_until_initial_step_trains_what_an_unbroken_run_trains_from_there(tmp_path, eight_images, batches):
    train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", name="unbroken")
    unbroken = list(batches)
    assert len(unbroken) == 12
    batches.clear()
    run_dir, _ = train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", "training.initial_step=6",
                       "training.skip_until_initial_step=true", "output.save_every_n_epochs=1", name="skipped")  # fmt: skip
    # Steps 7..12 on batches 6..11 of the unbroken run: the same images, flips, captions and noise.
    assert batches == unbroken[6:]
    assert saved(run_dir) == {"demo-000002.safetensors": ("2", "8"), "demo.safetensors": ("3", "12")}
    logged = steps_logged(run_dir)
    assert [(r["step"], r["epoch"]) for r in logged] == [(7, 2), (8, 2), (9, 3), (10, 3), (11, 3), (12, 3)]


def test_skipping_with_gradient_accumulation_counts_steps_of_two_batches(tmp_path, eight_images, batches):
    accum = ["training.gradient_accumulation_steps=2", "training.max_train_epochs=3"]  # 2 steps an epoch
    train(tmp_path, *SHORT, *eight_images, *accum, name="unbroken")
    unbroken = list(batches)
    batches.clear()
    # Step 3 is epoch 2's second step: its batches are the 7th and 8th of the run.
    run_dir, _ = train(tmp_path, *SHORT, *eight_images, *accum, "training.initial_step=3",
                       "training.skip_until_initial_step=true", name="skipped")  # fmt: skip
    assert batches == unbroken[6:]
    assert [(r["step"], r["epoch"]) for r in steps_logged(run_dir)] == [(4, 2), (5, 3), (6, 3)]
    assert saved(run_dir) == {"demo.safetensors": ("3", "6")}


def test_initial_epoch_with_skipping_starts_at_its_first_step(tmp_path, eight_images, batches):
    train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", name="unbroken")
    unbroken = list(batches)
    batches.clear()
    train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", "training.initial_epoch=3",
          "training.skip_until_initial_step=true", name="skipped")  # fmt: skip
    assert batches == unbroken[8:]


def test_a_start_past_the_run_is_refused(tmp_path, eight_images):
    # sd-scripts asserts max_train_steps > initial step.
    with pytest.raises(ConfigError, match=r"training.initial_step=12 starts the run at step 12, and it ends at "
                                          r"step 12 \(3 epochs of 4 steps\)"):
        train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", "training.initial_step=12")
    with pytest.raises(ConfigError, match=r"training.initial_epoch=4 starts the run at step 12"):
        train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=3", "training.initial_epoch=4",
              name="epoch")  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), [
    (["training.initial_epoch=0"], "'training.initial_epoch' must be at least 1, got 0"),
    (["training.initial_step=-1"], "'training.initial_step' must be at least 0, got -1"),
    (["training.initial_epoch=2", "training.initial_step=3"], "both say where the run starts"),
    (["training.skip_until_initial_step=true"], "skips to training.initial_step or initial_epoch, and neither is set"),
])  # fmt: skip
def test_values_that_say_no_start_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(*overrides)


def test_with_resume_from_the_states_step_count_is_not_used(tmp_path, eight_images, caplog):
    first, _ = train(tmp_path, *SHORT, *eight_images, "training.max_train_steps=2",
                     "output.save_state_on_train_end=true", name="first")  # fmt: skip
    state = f"training.resume_from={first / 'demo-state.pt'}"
    # sd-scripts: "steps from the state is ignored because initial_step is specified".
    counted, _ = train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=1", state, "training.initial_epoch=1",
                       name="counted")  # fmt: skip
    assert [r["step"] for r in steps_logged(counted)] == [1, 2, 3, 4]
    assert "the step count and data position of training.resume_from's state are not used" in caplog.text
    # Without it the run goes on from the state's step.
    resumed, _ = train(tmp_path, *SHORT, *eight_images, "training.max_train_epochs=1", state, name="resumed")
    assert [r["step"] for r in steps_logged(resumed)] == [3, 4]


@pytest.mark.parametrize("start", [["training.initial_step=6", "training.skip_until_initial_step=true"],
                                   ["training.initial_epoch=2"]])  # fmt: skip
def test_a_started_run_stopped_and_started_again_ends_as_one_not_stopped(tmp_path, monkeypatch, eight_images, start,
                                                                         batches):
    args = [*SHORT, *eight_images, "training.max_train_epochs=3", *start]
    straight, _ = train(tmp_path, *args, name="straight")
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_training(make_cfg(*args), run_dir)
    monkeypatch.undo()
    monkeypatch.setattr(TrainingData, "load", recording_load(batches))  # undo() took the recording away
    batches.clear()
    run_training(make_cfg(*args), run_dir)  # continues from its training_state.pt, not from the start options
    assert len(batches) == 4  # epoch 3's batches only
    a, b = load_lora(straight / "demo.safetensors"), load_lora(run_dir / "demo.safetensors")
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert (a[1]["ss_epoch"], a[1]["ss_steps"]) == (b[1]["ss_epoch"], b[1]["ss_steps"])
