"""[13] dataset.max_validation_steps (sd-scripts' --max_validation_steps): the validation loss
over the first n batches of held-out images only, as train_network.py measures
min(max_validation_steps, len(val_dataloader)) batches, each at every validation timestep."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from atelier.config.schema import TrainingConfig
from atelier.objective.steps import DiffusionObjective

from atelier.errors import DatasetError
from atelier.loop.trainer import Trainer
from atelier.loop.validation import Validator, first_batches
from atelier.network.lora_file import load_lora
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)

A, B = (4, 4, 4), (4, 4, 6)
SHAPES = [A, B, A, A, B, A, B, A]  # A: images 0 2 3 5 7, B: images 1 4 6


def test_the_first_batches_are_of_one_size_each_in_size_order():
    # Batches of 2: [0, 2] [3, 5] [7] (size A), then [1, 4] [6] (size B).
    assert first_batches(SHAPES, 2, None) == set(range(8))
    assert first_batches(SHAPES, 2, 1) == {0, 2}
    assert first_batches(SHAPES, 2, 3) == {0, 2, 3, 5, 7}
    assert first_batches(SHAPES, 2, 4) == {0, 2, 3, 5, 7, 1, 4}
    assert first_batches(SHAPES, 2, 99) == set(range(8))


class ZeroUNet(torch.nn.Module):
    def forward(self, noisy, timesteps, hidden):
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def validator(max_batches: int | None) -> Validator:
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(SHAPES)]
    captions = [f"image {i}" for i in range(len(SHAPES))]
    objective = DiffusionObjective(TrainingConfig(), DDPMScheduler(num_train_timesteps=1000))
    return Validator(latents, captions, objective, seed=5, batch_size=2,
                     max_batches=max_batches)  # fmt: skip


def loss(v: Validator) -> float:
    encode = lambda captions: torch.zeros(len(captions), 1, 8)  # noqa: E731
    return v.loss(ZeroUNet(), encode, contextlib.nullcontext, torch.device("cpu"))


def test_the_capped_loss_is_the_full_one_over_the_kept_images():
    full, capped = validator(None), validator(4)
    assert full.num_images == 8 and capped.num_images == 7
    # A zero prediction's eps loss is the noise's mean square: per (image, timestep) row.
    rows = [(caption, noise.pow(2).mean().item()) for chunk in full.chunks
            for caption, noise in zip(chunk.captions, chunk.noise)]  # fmt: skip
    kept = [value for caption, value in rows if caption != "image 6"]
    assert loss(capped) == pytest.approx(sum(kept) / len(kept), rel=1e-6)
    assert loss(full) == pytest.approx(sum(v for _, v in rows) / len(rows), rel=1e-6)
    # The kept images keep their noise: the cap takes problems out, it does not draw new ones.
    kept_noise = {(c, t.item()): n for chunk in full.chunks for c, t, n in zip(chunk.captions, chunk.timesteps,
                                                                              chunk.noise)}  # fmt: skip
    for chunk in capped.chunks:
        for c, t, n in zip(chunk.captions, chunk.timesteps, chunk.noise):
            assert torch.equal(n, kept_noise[(c, t.item())])


def test_a_run_validates_on_its_first_batches_and_writes_the_key(tmp_path):
    args = ["dataset.validation_split=0.5", "training.max_train_steps=2", "training.train_batch_size=2",
            "sampling.limit=0", "dataset.resolution=32"]  # fmt: skip
    run_dir = tmp_path / "capped"
    run_dir.mkdir()
    trainer = Trainer(make_cfg(*args, "dataset.max_validation_steps=1"), run_dir)
    result = trainer.train()
    assert len(trainer.data.validation_items) == 5 and trainer.validator.num_images == 2
    assert result.validation_loss is not None
    assert load_lora(run_dir / "demo.safetensors")[1]["ss_max_validation_steps"] == "1"
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    full = Trainer(make_cfg(*args), full_dir)
    assert full.train().validation_loss != result.validation_loss and full.validator.num_images == 5
    assert "ss_max_validation_steps" not in load_lora(full_dir / "demo.safetensors")[1]  # off: not written


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.validation_split=0.2", "dataset.max_validation_steps=0"], "dataset.max_validation_steps must be at least 1"),
    (["dataset.max_validation_steps=2"], "dataset.max_validation_steps=2 caps the validation batches, and "
                                         "dataset.validation_split is 0"),
])  # fmt: skip
def test_values_that_measure_nothing_are_refused(overrides, message):
    with pytest.raises(DatasetError, match=message):
        make_cfg(*overrides)
