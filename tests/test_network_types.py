"""Every network.module trains on the tiny model, saves kohya keys and metadata, and the
saved file, loaded by another implementation, reproduces the training-time output:
diffusers' load_lora_weights for the LoRA-format kinds, LyCORIS' own loader for LoHa /
LoKr / (IA)^3 (applied as forward patches: lycoris-lora's merge_to scales LoHa twice).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from torch import nn

from atelier.loop.trainer import Trainer
from atelier.models.architectures import SD1_PIPELINE_SCHEDULER
from atelier.network.lora_file import load_lora
from atelier.sampling.generate import build_pipeline
from atelier.sampling.samplers import make_scheduler
from tests.test_kohya_compat import render
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)

TRAIN = ["training.max_train_steps=4", "optimizer.learning_rate=5e-3"]
CONV_BLOCK = "lora_unet_down_blocks_0_resnets_0_conv1"


def train(tmp_path, network: str, *extra: str):
    trainer = Trainer(make_cfg(f"network={network}", *TRAIN, *extra), tmp_path)
    result = trainer.train()
    base = trainer.base
    image = render(build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, SD1_PIPELINE_SCHEDULER))
    state, meta = load_lora(result.output_file)
    return result.output_file, image, state, meta


def fresh_pipeline(tiny_model_path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", SD1_PIPELINE_SCHEDULER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reproduces(image: np.ndarray, loaded: np.ndarray, untouched: np.ndarray) -> None:
    assert np.abs(loaded - image).max() < 1e-4
    assert np.abs(loaded - untouched).max() > 1e-2  # training changed the output


@pytest.mark.parametrize(
    "network,extra,module",
    [
        ("lora", ["network.conv_dim=4", "network.conv_alpha=2"], "networks.lora"),
        ("locon", [], "lycoris.kohya"),
        ("dylora", [], "networks.dylora"),
    ],
)
def test_lora_format_kinds_reload_in_diffusers(tmp_path, tiny_model_path, network, extra, module):
    path, trained, state, meta = train(tmp_path, network, *extra)
    # The 3x3 conv of a ResnetBlock2D: kxk down, 1x1 up, as kohya writes a C3Lier / LoCon.
    if network != "dylora":
        assert state[f"{CONV_BLOCK}.lora_down.weight"].shape == (4, 32, 3, 3)
        assert state[f"{CONV_BLOCK}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in state} == {"lora_down", "lora_up", "alpha"}
    assert meta["ss_network_module"] == module

    pipe = fresh_pipeline(tiny_model_path)
    untouched = render(pipe)
    pipe.load_lora_weights(str(path))
    reproduces(trained, render(pipe), untouched)


def text_model_root(text_encoder: nn.Module) -> nn.Module:
    """LyCORIS names text-encoder modules by their path: give it the `text_model` level
    that transformers >= 5.6 dropped (A1111 and ComfyUI keep it)."""
    root = nn.Module()
    root.text_model = text_encoder
    return root


def lycoris_apply(path, pipe: StableDiffusionPipeline):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # The default preset asserts on a duplicated name on diffusers UNets (see the notes).
    LycorisNetworkKohya.apply_preset(
        {
            "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
            "unet_target_name": [],
            "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
            "text_encoder_target_name": [],
        }
    )
    network, weights = create_network_from_weights(1.0, str(path), None, text_model_root(pipe.text_encoder), pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    return network


@pytest.mark.parametrize(
    "network,extra,tensors,args",
    [
        ("loha", [], {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
         {"algo": "loha", "preset": "full", "conv_dim": "4", "conv_alpha": "1.0"}),
        ("lokr", ["network.factor=4", "network.dim=2"], {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2", "alpha"},
         {"algo": "lokr", "preset": "full", "conv_dim": "4", "conv_alpha": "1.0", "factor": "4"}),
    ],
)  # fmt: skip
def test_lycoris_kinds_reload_in_lycoris(tmp_path, tiny_model_path, network, extra, tensors, args):
    path, trained, state, meta = train(tmp_path, network, *extra)
    names = {k.split(".", 1)[0] for k in state}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names and CONV_BLOCK in names
    assert {k.split(".", 1)[1] for k in state} <= tensors
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == args

    pipe = fresh_pipeline(tiny_model_path)
    untouched = render(pipe)
    lyco = lycoris_apply(path, pipe)
    assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len(names)
    reproduces(trained, render(pipe), untouched)


# LyCORIS' ia3 preset matches no layer of a diffusers model (it compares short names with
# re.match against full paths) and create_network_from_weights fails on (IA)^3 files in
# lycoris-lora 4.1.3, so its network class gets the same layers by glob.
IA3_PRESET = {
    "unet_target_module": [],
    "unet_target_name": ["*.to_k", "*.to_v", "*.ff.net.2"],
    "text_encoder_target_module": [],
    "text_encoder_target_name": ["*.k_proj", "*.v_proj", "*.mlp.fc2"],
    "use_fnmatch": True,
    "name_algo_map": {"*.ff.net.2": {"train_on_input": True}, "*.mlp.fc2": {"train_on_input": True}},
}


def test_ia3_reloads_in_lycoris(tmp_path, tiny_model_path):
    from lycoris.kohya import LycorisNetworkKohya

    path, trained, state, meta = train(tmp_path, "ia3", "optimizer.learning_rate=5e-2")
    assert {k.split(".", 1)[1] for k in state} == {"weight", "on_input"}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.weight" in state
    assert int(state["lora_te_text_model_encoder_layers_0_mlp_fc2.on_input"]) == 1
    assert json.loads(meta["ss_network_args"]) == {"algo": "ia3", "preset": "ia3"}

    pipe = fresh_pipeline(tiny_model_path)
    untouched = render(pipe)
    LycorisNetworkKohya.apply_preset(IA3_PRESET)
    network = LycorisNetworkKohya(text_model_root(pipe.text_encoder), pipe.unet, network_module="ia3")
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    network.load_state_dict(state, strict=True)
    reproduces(trained, render(pipe), untouched)


def test_trainer_scale_weight_norms_caps_weights_and_logs_every_step(tmp_path):
    trainer = Trainer(make_cfg("training.max_train_steps=2", "optimizer.learning_rate=5e-2", "network.scale_weight_norms=1e-4"), tmp_path)
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["max_norm/keys_scaled"] > 0 for r in logged if "loss/step" in r] == [True, True]
    scalars = trainer.scale_weight_norms()
    assert set(scalars) == {"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm"}
    assert scalars["max_norm/keys_scaled"] > 0 and scalars["max_norm/max_key_norm"] <= 1e-4 * (1 + 1e-4)
    trainer.cfg.network.scale_weight_norms = None
    assert trainer.scale_weight_norms() == {}
