"""Block-wise ranks, alphas and learning-rate weights ([13] point 2, network args): network.block_dims /
block_alphas / conv_block_dims / conv_block_alphas and down/mid/up_lr_weight / block_lr_zero_threshold,
with sd-scripts networks.lora's blocks (get_block_index), parsing (get_block_lr_weight) and param
groups (prepare_optimizer_params: one per UNet block, lr times its weight; weight 0: no modules)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from atelier.config.block_weights import block_lr_weights
from atelier.families.sd import SD_BLOCKS, SDXL_BLOCKS
from atelier.errors import ConfigError
from atelier.loop.build import param_groups
from atelier.models.architectures import build_text_encoder, build_unet
from atelier.network.blocks import block_index
from atelier.network.factory import build_network
from atelier.network.lora_file import load_lora
from atelier.network.targets import UNET_PREFIX, iter_targets
from tests.test_tools_import import assert_round_trip, dataset, export_run, import_to  # noqa: F401  (fixture)
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged, train  # noqa: F401  (fixture)


def _list(values) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def _ldm_block(ldm_path: str) -> int:
    """sd-scripts' block of a module by its LDM (original SD) path: IN<k> = input_blocks.k,
    MID = 12, OUT<k> = 13 + k: the SD1/SD2 layout the 25 block values follow."""
    kind, index = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", ldm_path).groups()
    return {"input_blocks": int(index), "middle_block": 12, "output_blocks": 13 + int(index)}[kind]


def test_sd15_blocks_are_the_ldm_blocks_sd_scripts_counts():
    """Every module of a real SD1.5 UNet (diffusers names, as sd-scripts writes SD1 files) is in the
    block its LDM path says: down block i's j-th layer IN(1+3i+j), its downsampler IN(3+3i), ..."""
    from atelier.models.ldm_convert import unet_module_path_mapper

    with torch.device("meta"):
        unet = build_unet("sd15")
    to_ldm = unet_module_path_mapper(unet)
    paths = {f"{UNET_PREFIX}_{path.replace('.', '_')}": path for path, _ in unet.named_modules()}
    names = [t.lora_name for t in iter_targets(unet, None, conv=True)]
    assert len(names) > 192
    assert all(block_index(n) == _ldm_block(to_ldm(paths[n])) for n in names)
    assert {block_index(n) for n in names} == set(range(1, 25))  # IN00 is conv_in: no module
    attention_blocks = {block_index(t.lora_name) for t in iter_targets(unet, None)}
    assert attention_blocks == {1, 2, 4, 5, 7, 8, 12, 16, 17, 18, 19, 20, 21, 22, 23, 24}
    assert block_index("lora_unet_down_blocks_2_downsamplers_0_conv") == 9
    assert block_index("lora_unet_up_blocks_0_upsamplers_0_conv") == 15
    assert block_index("lora_unet_mid_block_attentions_0_proj_in") == 12
    assert block_index("lora_te_text_model_encoder_layers_0_mlp_fc1") is None


def test_sdxl_blocks_follow_sd_scripts_23():
    with torch.device("meta"):
        unet = build_unet("sdxl")
    names = [t.lora_name for t in iter_targets(unet, None, conv=True)]
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for n in names)  # fmt: skip
    for name in names:
        kind, k = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name).groups()
        assert block_index(name) == {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[kind] + int(k)
    # input_blocks_0 (conv_in, block 1) has no module; 0 and 22 (embeddings, out) neither.
    assert {block_index(n) for n in names} == set(range(2, 22))
    attention_blocks = {block_index(t.lora_name) for t in iter_targets(unet, None)}
    assert attention_blocks == {5, 6, 8, 9, 11, 13, 14, 15, 16, 17, 18}
    assert block_index("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == 5
    assert block_index("lora_unet_output_blocks_2_2_conv") == 15
    assert SD_BLOCKS.count == 25 and SDXL_BLOCKS.count == 23


def _weights(*overrides: str, sdxl: bool = False) -> list[float]:
    cfg = make_cfg(*(["model=tiny_sdxl"] if sdxl else []), *overrides)
    return block_lr_weights(cfg.network, SDXL_BLOCKS if sdxl else SD_BLOCKS)


def test_lr_weights_parse_as_sd_scripts():
    sine = [math.sin(math.pi * i / 11 / 2) for i in range(12)]
    got = _weights("network.down_lr_weight=sine")
    assert got == pytest.approx(sine + [1.0] * 13)
    # +number shifts a preset; mid as sd-scripts' comma text; a short up list is filled with 1.0.
    got = _weights("network.down_lr_weight='cosine+0.5'", "network.mid_lr_weight='0.25'", "network.up_lr_weight=[0,2]")
    assert got == pytest.approx([s + 0.5 for s in reversed(sine)] + [0.25] + [0, 2] + [1.0] * 10)
    # Not above the threshold: 0 (the threshold is for the given parts only).
    got = _weights("network.up_lr_weight='linear'", "network.block_lr_zero_threshold=0.5")
    assert got == pytest.approx([1.0] * 13 + [0.0] * 6 + [i / 11 for i in range(6, 12)])
    # SDXL: 9 input and output blocks, 3 middle ones, and 1.0 for the embedding and output blocks.
    got = _weights("network.down_lr_weight='1,,0.5'", "network.mid_lr_weight=0", sdxl=True)
    assert got == pytest.approx([1.0, 1.0, 0.0, 0.5] + [1.0] * 6 + [0.0, 1.0, 1.0] + [1.0] * 10)
    assert len(got) == 23
    assert _weights("network.up_lr_weight='zeros+0.2'", sdxl=True)[13:22] == pytest.approx([0.2] * 9)


@pytest.mark.parametrize("overrides, message", [
    (["network.block_dims=[4,4,4]"], r"network.block_dims has 3 values; SD1/SD2 has 25 blocks .*give 25"),
    (["model=tiny_sdxl", f"network.block_dims={_list([4] * 25)}"], r"network.block_dims has 25 .*SDXL has 23"),
    ([f"network.block_dims={_list([4] * 25)}", f"network.conv_block_dims={_list([2] * 23)}"],
     r"network.conv_block_dims has 23 values"),
    (["network.down_lr_weight=sinus"], r"network.down_lr_weight='sinus' is not a list .* cosine, sine, linear"),
    (["network.up_lr_weight='sine+x'"], r"network.up_lr_weight='sine\+x': the part after \+ must be a number"),
    (["network.up_lr_weight=0.5"], r"network.up_lr_weight=0.5: one number is not a list"),
    (["model=tiny_sdxl", f"network.down_lr_weight={_list([1] * 12)}"],
     r"network.down_lr_weight has 12 values; this model has 9"),
    (["network.mid_lr_weight=[1,abc]"], r"network.mid_lr_weight"),
    ([f"network.block_dims={_list([4] * 24 + [-1])}"], r"network.block_dims=.* whole ranks of 0 or more"),
    ([f"network.block_alphas={_list([1] * 25)}"], r"network.block_alphas is read only with network.block_dims"),
    ([f"network.block_dims={_list([4] * 25)}", f"network.conv_block_alphas={_list([1] * 25)}"],
     r"network.conv_block_alphas needs network.conv_block_dims"),
    (["network.block_lr_zero_threshold=0.1"], r"network.block_lr_zero_threshold=0.1 applies to the block lr weights"),
    (["network=loha", "network.mid_lr_weight=0.5"], r"network.mid_lr_weight=0.5 does not apply to network.module=loha"),
    (["network=dylora", f"network.block_dims={_list([4] * 25)}"], r"network.block_dims=.* does not apply to .*dylora"),
])  # fmt: skip
def test_bad_block_options_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(*overrides)


def test_block_dims_give_those_ranks_in_the_file(tmp_path):
    """tiny-sd15's modules are in blocks 1 (down 0), 3 (its downsampler), 4 (down 1), 12 (mid), 13-15
    (up 0 and its upsampler) and 16-17 (up 1); each takes its block's rank and alpha."""
    dims, alphas, conv_dims = [4] * 25, [1.0] * 25, [2] * 25
    dims[1], dims[12], dims[16] = 2, 0, 3
    alphas[17] = 3.0
    conv_dims[4], conv_dims[15] = 0, 1
    run_dir, _ = train(tmp_path, "training.max_train_steps=1", "network.dim=8", f"network.block_dims={_list(dims)}",
                       f"network.block_alphas={_list(alphas)}",
                       f"network.conv_block_dims={_list(conv_dims)}")  # fmt: skip
    state, meta = load_lora(run_dir / "demo.safetensors")

    def rank(name: str) -> int | None:
        down = state.get(f"lora_unet_{name}.lora_down.weight")
        return None if down is None else down.shape[0]

    assert rank("down_blocks_0_attentions_0_proj_in") == 2
    assert rank("down_blocks_0_resnets_0_conv1") == 2  # the conv dim of block 1
    assert rank("down_blocks_1_resnets_0_conv1") is None and rank("down_blocks_1_resnets_0_time_emb_proj") == 4
    assert not any(k.startswith("lora_unet_mid_block_attentions") for k in state)  # block 12's dim is 0 ...
    assert rank("mid_block_resnets_0_conv1") == 2 and rank("mid_block_resnets_0_time_emb_proj") is None  # ... conv's 2
    assert rank("up_blocks_0_upsamplers_0_conv") == 1
    assert rank("up_blocks_1_attentions_0_proj_in") == 3
    assert rank("up_blocks_1_attentions_1_proj_in") == 4
    assert float(state["lora_unet_up_blocks_1_attentions_1_proj_in.alpha"]) == 3.0
    assert float(state["lora_unet_up_blocks_1_attentions_0_proj_in.alpha"]) == 1.0
    assert {v.shape[0] for k, v in state.items() if k.startswith("lora_te_") and k.endswith("lora_down.weight")} == {8}
    args = json.loads(meta["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims))
    assert args["block_alphas"] == ",".join(map(str, alphas))
    assert args["conv_block_dims"] == ",".join(map(str, conv_dims)) and "conv_block_alphas" not in args


LR_WEIGHTS = ["network.down_lr_weight=[1,0.5]", "network.mid_lr_weight=0",
              "network.up_lr_weight=[1,1,1,2,0.2]", "network.block_lr_zero_threshold=0.3"]  # fmt: skip


def test_lr_weights_make_one_group_per_block_and_drop_zero_blocks():
    cfg = make_cfg(*LR_WEIGHTS, "optimizer.learning_rate=1e-3", "optimizer.text_encoder_lr=1e-4",
                   "network.loraplus_unet_lr_ratio=4")  # fmt: skip
    torch.manual_seed(0)
    unet, te = build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")
    network = build_network(cfg.network, unet, te)
    # Blocks 12 (mid: 0) and 17 (up 1's second layer: 0.2, not above 0.3) have no modules at all.
    assert {block_index(n) for n in network.loras if n.startswith(UNET_PREFIX)} == {1, 16}
    groups = param_groups(cfg, network)
    assert [(name, up, pytest.approx(lr)) for name, _, up, lr in groups] == [
        ("unet_block1", False, 5e-4), ("unet_block1_plus", True, 2e-3),
        ("unet_block16", False, 2e-3), ("unet_block16_plus", True, 8e-3), ("text_encoder", None, 1e-4)]  # fmt: skip
    # Every parameter is in exactly one group.
    chosen = [id(p) for _, modules, up, _ in groups for p in network.parameters_of(modules, up)]
    assert sorted(chosen) == sorted(id(p) for p in network.parameters())
    with pytest.raises(ValueError, match="pass it"):
        param_groups(cfg)


def test_a_run_with_lr_weights_keeps_each_blocks_share_through_the_schedule(tmp_path):
    run_dir, _ = train(tmp_path, *LR_WEIGHTS, "training.max_train_steps=4", "optimizer.learning_rate=1e-3",
                       "scheduler=cosine", "scheduler.warmup_steps=2")  # fmt: skip
    state, meta = load_lora(run_dir / "demo.safetensors")
    assert not any(k.startswith(("lora_unet_mid_block", "lora_unet_up_blocks_1_attentions_1")) for k in state)
    assert any(k.startswith("lora_unet_up_blocks_1_attentions_0") for k in state)
    steps = steps_logged(run_dir)
    assert len(steps) == 4 and len({s["lr/text_encoder"] for s in steps}) > 1  # the schedule moves
    for s in steps:
        assert "lr/unet" not in s and "lr/unet_block12" not in s
        assert s["lr/unet_block1"] == pytest.approx(0.5 * s["lr/text_encoder"])
        assert s["lr/unet_block16"] == pytest.approx(2 * s["lr/text_encoder"])
    args = json.loads(meta["ss_network_args"])
    assert (args["down_lr_weight"], args["mid_lr_weight"]) == ("1.0,0.5", "0.0")
    assert (args["up_lr_weight"], args["block_lr_zero_threshold"]) == ("1.0,1.0,1.0,2.0,0.2", "0.3")
    assert "block_dims" not in args
    assert (run_dir / "lr_schedule.png").is_file()


@pytest.mark.parametrize("overrides", [
    [f"network.block_dims={_list([4] * 12 + [0] + [8] * 12)}", f"network.block_alphas={_list([2.0] * 25)}",
     "network.conv_dim=4", "network.conv_alpha=1.0", f"network.conv_block_dims={_list([2] * 25)}",
     f"network.conv_block_alphas={_list([1.0] * 25)}",
     "network.down_lr_weight='sine+0.5'", "network.mid_lr_weight=0.5", "network.up_lr_weight=[1.0,0.5,0.0]",
     "network.block_lr_zero_threshold=0.1"],
    ["model=tiny_sdxl", f"network.block_dims={_list([4] * 23)}", "network.down_lr_weight=reverse_linear",
     "network.mid_lr_weight=[1.0,0.0,1.0]"],
], ids=["sd1", "sdxl"])  # fmt: skip
def test_export_kohya_then_import_kohya_gives_them_back(tmp_path, dataset, overrides):  # noqa: F811
    original, run_dir = export_run(tmp_path, f"dataset.train_data_dir={dataset / 'train'}", *overrides)
    toml = (run_dir / "kohya_config.toml").read_text()
    assert "block_dims=4,4,4,4,4,4,4,4,4,4,4,4" in toml
    sdxl = ["--sdxl"] if "model=tiny_sdxl" in overrides else []
    imported = import_to(tmp_path, run_dir / "kohya_config.toml", *sdxl)
    assert_round_trip(original, imported, skip=("model.path", "training.cpu", "training.num_processes"))
    assert imported["network"]["block_dims"] == original["network"]["block_dims"]
