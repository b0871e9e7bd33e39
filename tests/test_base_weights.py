"""model.base_weights ([13] point 2): LoRA files merged into the base before training, as
sd-scripts' --base_weights / --base_weights_multiplier merge them (train_network.py merge_to)."""

from __future__ import annotations

import pytest
import torch

from atelier.errors import ConfigError, MissingFileError
from atelier.loop.build import load_base
from atelier.network.base_merge import merge_base_weights
from atelier.network.lora_file import load_lora
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (fixture)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    """A real LoRA of the tiny model, its up weights moved away from zero by training."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    run_dir, _ = train(tmp_path_factory.mktemp("lora"), "training.max_train_steps=3", "optimizer.learning_rate=1e-2",
                       "network.conv_dim=2")  # fmt: skip
    return run_dir / "demo.safetensors"


def test_the_merged_base_is_the_base_plus_each_update_times_its_multiplier(trained_lora):
    plain = load_base(make_cfg(), CPU)
    merged = load_base(make_cfg(f"model.base_weights=[{trained_lora},{trained_lora}]",
                                "model.base_weights_multiplier=[0.5]"), CPU)  # the second file: 1.0
    state, _ = load_lora(trained_lora)
    checked = 0
    for name, layer in [*plain.unet.named_modules(prefix="lora_unet"), *plain.text_encoder.named_modules(prefix="lora_te")]:
        key = name.replace(".", "_")
        if f"{key}.lora_up.weight" not in state:
            continue
        up, down = state[f"{key}.lora_up.weight"].flatten(1), state[f"{key}.lora_down.weight"].flatten(1)
        delta = (up @ down * (float(state[f"{key}.alpha"]) / down.shape[0])).reshape(layer.weight.shape)
        other = dict([*merged.unet.named_modules(prefix="lora_unet"), *merged.text_encoder.named_modules(prefix="lora_te")])[name]
        # float32 sums in another order than the reference: a few ulps of the weights' scale
        torch.testing.assert_close(other.weight, layer.weight + 1.5 * delta, rtol=0, atol=1e-6)
        checked += 1
    assert checked > 50  # every module of the file, convs included


def test_the_kept_base_of_an_in_process_sweep_stays_pristine(trained_lora):
    from atelier.runtime import reuse

    reuse.force_reuse(True)
    try:
        before = load_base(make_cfg(), CPU).unet.conv_in.weight.clone()
        load_base(make_cfg(f"model.base_weights=[{trained_lora}]"), CPU)
        after = load_base(make_cfg(), CPU).unet.conv_in.weight
        assert torch.equal(before, after)
    finally:
        reuse.force_reuse(None)


def test_a_run_on_a_merged_base_trains(tmp_path, trained_lora):
    run_dir, summary = train(tmp_path, "training.max_train_steps=2", f"model.base_weights=[{trained_lora}]",
                             "model.base_weights_multiplier=[0.7]")  # fmt: skip
    assert summary["status"] == "completed"


def test_what_cannot_merge_is_said_before_training(tmp_path, trained_lora):
    with pytest.raises(MissingFileError, match=r"model.base_weights\[0\]=/nowhere.safetensors: no such file"):
        make_cfg("model.base_weights=[/nowhere.safetensors]")
    with pytest.raises(ConfigError, match="2 values for 1 model.base_weights files"):
        make_cfg(f"model.base_weights=[{trained_lora}]", "model.base_weights_multiplier=[1,2]")
    from safetensors.torch import save_file

    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(ConfigError, match="holds loha .LyCORIS. modules"):
        merge_base_weights(torch.nn.Linear(2, 2), [], [str(loha)], [])
