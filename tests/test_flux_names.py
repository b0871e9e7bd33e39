"""[10] point 4: the kohya module set of a FLUX.1 LoRA, on diffusers' FluxTransformer2DModel.

The expected names are counted from sd-scripts' own rules, independently of
atelier.network.flux_names: networks/lora_flux.py adapts every nn.Linear child of each
DoubleStreamBlock and SingleStreamBlock of library/flux_models.py (listed below from that file)
and names it lora_unet_<its module path with '_'>. The model is FLUX.1's real architecture,
built on the meta device (no weights, no memory).
"""

from __future__ import annotations

import pytest
import torch

from atelier.models.flux_architectures import build_flux_transformer
from atelier.network.flux_names import flux_targets, flux_targets_of, fused_out_features

# library/flux_models.py: DoubleStreamBlock's Linear children (img_mod = Modulation(.lin), img_attn =
# SelfAttention(.qkv, .proj), img_mlp = Sequential(Linear, GELU, Linear); txt_* alike), in module order,
# and SingleStreamBlock's (linear1, linear2, modulation.lin). Their (in, out) sizes at hidden 3072, mlp 12288.
H, MLP = 3072, 12288
BFL_DOUBLE = {"img_mod.lin": (H, 6 * H), "img_attn.qkv": (H, 3 * H), "img_attn.proj": (H, H), "img_mlp.0": (H, MLP),
              "img_mlp.2": (MLP, H), "txt_mod.lin": (H, 6 * H), "txt_attn.qkv": (H, 3 * H), "txt_attn.proj": (H, H),
              "txt_mlp.0": (H, MLP), "txt_mlp.2": (MLP, H)}  # fmt: skip
BFL_SINGLE = {"linear1": (H, 3 * H + MLP), "linear2": (H + MLP, H), "modulation.lin": (H, 3 * H)}


def sd_scripts_modules(train_blocks: str = "all") -> dict[str, tuple[int, int]]:
    """name -> (in, out) of sd-scripts' default FLUX.1 LoRA modules (19 double, 38 single blocks)."""
    found = {}
    if train_blocks in ("all", "double"):
        found |= {f"lora_unet.double_blocks.{i}.{path}".replace(".", "_"): shape
                  for i in range(19) for path, shape in BFL_DOUBLE.items()}  # fmt: skip
    if train_blocks in ("all", "single"):
        found |= {f"lora_unet.single_blocks.{i}.{path}".replace(".", "_"): shape
                  for i in range(38) for path, shape in BFL_SINGLE.items()}  # fmt: skip
    return found


@pytest.fixture(scope="module")
def flux1_dev() -> torch.nn.Module:
    with torch.device("meta"):
        return build_flux_transformer("dev")


@pytest.mark.parametrize("train_blocks", ["all", "double", "single"])
def test_the_default_lora_of_flux1_has_sd_scripts_modules_names_and_shapes(flux1_dev, train_blocks):
    targets = flux_targets_of(flux1_dev, train_blocks)
    expected = sd_scripts_modules(train_blocks)
    assert [t.name for t in targets] == list(expected)  # sd-scripts' order too
    assert len(targets) == {"all": 304, "double": 190, "single": 114}[train_blocks]
    modules = dict(flux1_dev.named_modules())
    for target in targets:
        in_features = {modules[path].in_features for path in target.modules}
        assert (in_features.pop(), sum(fused_out_features(flux1_dev, target))) == expected[target.name], target


def test_every_linear_of_the_blocks_is_adapted_once_and_nothing_else(flux1_dev):
    adapted = [path for target in flux_targets_of(flux1_dev) for path in target.modules]
    linears = [name for name, module in flux1_dev.named_modules() if isinstance(module, torch.nn.Linear)
               and name.startswith(("transformer_blocks.", "single_transformer_blocks."))]  # fmt: skip
    assert sorted(adapted) == sorted(linears) and len(set(adapted)) == len(adapted)


def test_schnell_has_the_same_module_set(flux1_dev):
    with torch.device("meta"):
        schnell = build_flux_transformer("schnell")
    assert flux_targets_of(schnell) == flux_targets_of(flux1_dev)


def test_a_model_that_is_not_flux_is_refused_naming_the_module():
    not_flux = torch.nn.Module()
    not_flux.transformer_blocks = torch.nn.ModuleList([torch.nn.Module()])
    not_flux.single_transformer_blocks = torch.nn.ModuleList()
    with pytest.raises(ValueError, match=r"lora_unet_double_blocks_0_img_mod_lin: .* no Linear transformer_blocks.0.norm1"):
        flux_targets_of(not_flux)
    with pytest.raises(ValueError, match="train_blocks must be one of all, single, double"):
        flux_targets(1, 1, "both")


def _kohya_lora(model: torch.nn.Module, targets, rank: int = 4, alpha: float = 2.0):
    """A random kohya state dict for `targets`, and each adapted module's update as a function
    of an input (up @ down @ x * alpha / rank, the fused rows split per module)."""
    generator = torch.Generator().manual_seed(0)
    modules = dict(model.named_modules())
    state, updates = {}, {}
    for target in targets:
        rows = fused_out_features(model, target)
        down = torch.randn(rank, modules[target.modules[0]].in_features, generator=generator, dtype=torch.float64)
        up = torch.randn(sum(rows), rank, generator=generator, dtype=torch.float64)
        state |= {f"{target.name}.lora_down.weight": down, f"{target.name}.lora_up.weight": up,
                  f"{target.name}.alpha": torch.tensor(alpha, dtype=torch.float64)}  # fmt: skip
        for path, part in zip(target.modules, up.split(rows)):
            updates[path] = lambda x, part=part, down=down: part @ (down @ x) * (alpha / rank)
    return state, updates


def _assert_diffusers_reads(state: dict, updates: dict) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    got = {key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in converted if key.endswith("lora_A.weight")}
    assert got == set(updates)
    for path, update in updates.items():
        a, b = converted[f"transformer.{path}.lora_A.weight"], converted[f"transformer.{path}.lora_B.weight"]
        probe = torch.randn(a.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(b @ (a @ probe), update(probe))  # diffusers moves alpha / rank into A and B


def test_diffusers_kohya_converter_puts_each_module_on_the_modules_we_adapt(flux1_dev):
    """diffusers' reader of kohya FLUX LoRAs gives each diffusers module we adapt the update of
    its kohya module (its rows of a fused one). Its single-block linear1 split is hard-coded to
    FLUX.1's sizes (3072 x 3 + 12288), so linear1 is checked on FLUX.1 itself, the rest on a tiny
    transformer (and a tiny model's linear1 cannot be loaded by diffusers: [10] must keep that in mind)."""
    from diffusers import FluxTransformer2DModel

    tiny = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 6, 6))  # fmt: skip
    _assert_diffusers_reads(*_kohya_lora(tiny, [t for t in flux_targets_of(tiny) if not t.name.endswith("linear1")]))
    linear1 = [t for t in flux_targets_of(flux1_dev) if t.name == "lora_unet_single_blocks_7_linear1"]
    _assert_diffusers_reads(*_kohya_lora(flux1_dev, linear1))
