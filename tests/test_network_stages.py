"""Multi-stage training on the tiny model: a linear stage, then experiment=two_stage
continuing from its LoRA on cosine (network.weights)."""

from __future__ import annotations

import pytest
import torch

from atelier.network.lora_file import load_lora
from tests.test_trainer import fresh_accelerate_state, train  # noqa: F401  (autouse fixture)

STEPS = ["training.max_train_steps=3", "training.train_batch_size=4"]


@pytest.mark.parametrize("network", ["lora", "loha"])
def test_two_stages_linear_then_cosine_from_the_first_stages_weights(tmp_path, network):
    stage1_dir, _ = train(
        tmp_path, f"network={network}", "scheduler=linear", "output.output_name=stage1", *STEPS, name="stage1"
    )
    stage1 = stage1_dir / "stage1.safetensors"
    first, first_meta = load_lora(stage1)
    assert first_meta["ss_lr_scheduler"] == "linear"

    # The recipe's network.weights names stage 1's file; a learning rate of 0 keeps
    # the weights as loaded, which shows stage 2 starts exactly from stage 1.
    common = ["experiment=two_stage", f"network={network}", f"network.weights={stage1}", *STEPS]
    frozen_dir, _ = train(tmp_path, *common, "optimizer.learning_rate=0", name="frozen")
    frozen, _ = load_lora(frozen_dir / "demo-stage2.safetensors")
    assert set(frozen) == set(first) and all(torch.equal(frozen[k], first[k]) for k in first)

    stage2_dir, summary = train(tmp_path, *common, name="stage2")
    second, meta = load_lora(stage2_dir / "demo-stage2.safetensors")
    assert summary["steps"] == 3
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_network_weights"] == str(stage1)
    assert set(second) == set(first) and any(not torch.equal(second[k], first[k]) for k in first)


def test_stage_two_without_stage_one_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's default path is relative to the working dir
    with pytest.raises(FileNotFoundError, match="network.weights=outputs/demo/stage1/stage1.safetensors: no such file"):
        train(tmp_path, "experiment=two_stage", *STEPS)
