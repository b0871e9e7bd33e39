"""network.preset ([13] point 2): LyCORIS' layer presets on our targets for the LyCORIS kinds
(locon, loha, lokr), the same layers LyCORIS' own network picks, written back as network_args
preset=..., refused where it would say something else than it trains, and read by import-kohya."""

from __future__ import annotations

import json

import pytest
import torch

from atelier.cli import main
from atelier.config.network_kinds import PRESETS
from atelier.config.network_spec import NetworkSpec, kohya_network_args
from atelier.config.schema import NetworkConfig
from atelier.errors import ConfigError
from atelier.models.architectures import build_text_encoder, build_unet
from atelier.network.factory import create_network
from atelier.network.targets import PRESET_SELECTIONS
from tests.test_config import compose_config
from tests.test_trainer import make_cfg
from tests.test_network_types import text_model_root
from tests.test_tools_import import composed


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")


def preset_config(preset: str, kind: str = "locon") -> NetworkConfig:
    return NetworkConfig(module=kind, dim=2, alpha=1.0, preset=preset, conv_dim=2 if PRESETS[preset].conv else None,
                         train_unet_only=not PRESETS[preset].text_encoder)  # fmt: skip


def our_names(preset: str, parts, kind: str = "locon") -> set[str]:
    unet, text_encoder = parts
    te = text_encoder if PRESETS[preset].text_encoder else None
    return set(create_network(NetworkSpec.from_config(preset_config(preset, kind)), unet, te).loras)


def lycoris_names(preset: str, parts) -> set[str]:
    """The modules lycoris.kohya.create_network makes with this preset (its conv_dim is our conv_dim), less
    LyCORIS' single layers outside the blocks (conv_in, conv_out, time_embedding), which are not our targets
    (and on a diffusers UNet make LyCORIS assert: time_embedding is a TimestepEmbedding block too)."""
    from lycoris import kohya

    unet, text_encoder = parts
    extra = {"conv_dim": 2} if PRESETS[preset].conv else {}
    builtin = kohya.PRESET[preset]
    blocks = [m for m in builtin["unet_target_module"] if m != "TimestepEmbedding"]
    # A preset is class state in LyCORIS: put it back for the other tests' LyCORIS networks.
    kept = {k: v for k, v in vars(kohya.LycorisNetworkKohya).items() if k.isupper()}
    kohya.PRESET[preset] = {**builtin, "unet_target_module": blocks, "unet_target_name": []}
    try:
        network = kohya.create_network(1.0, 2, 1.0, None, text_model_root(text_encoder), unet, algo="locon",
                                       preset=preset, **extra)  # fmt: skip
    finally:
        kohya.PRESET[preset] = builtin
        for key, value in kept.items():
            setattr(kohya.LycorisNetworkKohya, key, value)
    return {m.lora_name for m in [*network.unet_loras, *network.text_encoder_loras]}


def test_every_preset_has_a_layer_selection():
    assert set(PRESETS) == set(PRESET_SELECTIONS)


# LyCORIS' attn-only names sd-scripts' CrossAttention class (diffusers calls it Attention), so its
# own network finds no UNet layer of a diffusers model: attn-only is checked by name below.
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "attn-only"])
def test_a_preset_selects_the_layers_lycoris_selects(preset, parts):
    theirs = lycoris_names(preset, parts)
    if not PRESETS[preset].text_encoder:
        theirs = {name for name in theirs if name.startswith("lora_unet_")}
    assert our_names(preset, parts) == theirs


def test_the_presets_differ_as_their_names_say(parts):
    names = {preset: our_names(preset, parts) for preset in PRESETS}
    default = set(create_network(NetworkSpec.from_config(NetworkConfig(module="locon", dim=2)), *parts).loras)
    assert names["attn-mlp"] == default
    assert names["attn-only"] and all("_attn1_" in n or "_attn2_" in n or "_self_attn_" in n for n in names["attn-only"])
    assert {n for n in names["attn-mlp"] if "_attn1_" in n or "_attn2_" in n or "_self_attn_" in n} == names["attn-only"]
    assert not any(n.startswith("lora_te_") for p in PRESETS if not PRESETS[p].text_encoder for n in names[p])
    assert names["unet-convblock-only"] == names["unet-only"] - names["unet-transformer-only"]
    assert names["full-lin"] > names["attn-mlp"] and not any(n.endswith(("_conv1", "_conv2")) for n in names["full-lin"])
    assert names["full"] == names["full-lin"] | names["unet-convblock-only"]
    assert names["unet-only"] == {n for n in names["full"] if n.startswith("lora_unet_")}
    # LoHa / LoKr take the same layers.
    assert our_names("attn-only", parts, "loha") == names["attn-only"]


def test_metadata_writes_the_chosen_preset():
    net = compose_config("network=loha", "network.conv_dim=null", "network.preset=attn-only").network
    assert kohya_network_args(net) == {"algo": "loha", "preset": "attn-only"}
    net = compose_config("network=lokr", "network.preset=unet-only", "network.train_unet_only=true").network
    assert kohya_network_args(net)["preset"] == "unet-only"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["network=locon", "network.preset=fancy"], "network.preset=fancy is not one of LyCORIS' presets: full, "),
        (["network=locon", "network.conv_dim=null", "network.preset=full"], "network.preset=full trains the 3x3 convs: set network.conv_dim"),
        (["network=locon", "network.conv_dim=4", "network.preset=attn-mlp"],
         "network.conv_dim=4 does nothing with network.preset=attn-mlp"),
        (["network=locon", "network.conv_dim=null", "network.preset=unet-transformer-only"],
         "network.preset=unet-transformer-only adapts no text-encoder layer: set network.train_unet_only=true"),
        (["network=lora", "network.preset=attn-only"], "network.preset=attn-only does not apply to network.module=lo"),
        (["network=ia3", "network.preset=attn-only"], "network.preset=attn-only does not apply to network.module=ia3"),
    ],
)  # fmt: skip
def test_a_preset_that_would_not_train_what_it_says_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(*overrides)


def import_args(tmp_path, *network_args: str) -> dict:
    source = tmp_path / "config.toml"
    source.write_text('pretrained_model_name_or_path = "/m/sd15"\ntrain_data_dir = "/data/x"\nnetwork_dim = 8\n'
                      'network_alpha = 4\nnetwork_module = "lycoris.kohya"\n'
                      f"network_args = {json.dumps(list(network_args))}\n")  # fmt: skip
    out = tmp_path / "conf" / "experiment" / "x.yaml"
    assert main(["import-kohya", str(source), "--out", str(out), "--force"]) == 0
    return composed(f"hydra.searchpath=[file://{out.parent.parent}]", "experiment=x")["network"]


def test_import_reads_a_preset_as_lycoris_trains_it(tmp_path, capsys):
    net = import_args(tmp_path, "algo=loha", "preset=attn-only")
    assert (net["module"], net["preset"], net["conv_dim"]) == ("loha", "attn-only", None)
    # LyCORIS gives the 3x3 convs network_dim when conv_dim is not given.
    net = import_args(tmp_path, "algo=locon", "preset=unet-only")
    assert (net["preset"], net["conv_dim"], net["conv_alpha"], net["train_unet_only"]) == ("unet-only", 8, 4.0, True)
    # LyCORIS' default for the run (full with conv_dim, attn-mlp without) stays null here.
    net = import_args(tmp_path, "algo=locon", "preset=full", "conv_dim=4")
    assert (net["preset"], net["conv_dim"]) == (None, 4)
    capsys.readouterr()
    net = import_args(tmp_path, "algo=locon", "preset=attn-mlp", "conv_dim=4")
    assert "conv_dim=4: LyCORIS' preset=attn-mlp trains no 3x3 conv" in capsys.readouterr().out
    assert net["conv_dim"] is None
