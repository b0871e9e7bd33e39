"""`atelier import-kohya` ([13] point 3): an sd-scripts config / dataset TOML, a kohya_ss GUI
JSON or a saved command line becomes an experiment config that trains the same thing.

The round trip is the proof: a run's config, exported by export-kohya and imported back,
composes to the same value for every key both sides know (the few keys one side writes
another way are listed in EQUIVALENT, each with its reason).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import atelier.config
from atelier.cli import main
from atelier.outputs.run_dir import write_resolved_config
from atelier.tools.export_kohya import build_export, command_line, flatten, load_run_config
from atelier.tools.kohya_options import OPTIONS_BY_KEY
from tests.helpers import REPO_ROOT


def composed(*overrides: str) -> dict:
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Folders as sd-scripts' DreamBooth layout names them (the export lists one subset each)."""
    root = tmp_path / "data"
    for folder in ("train/10_mychar woman", "train/3_mychar smiling", "reg/1_woman"):
        (root / folder).mkdir(parents=True)
    return root


def export_run(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_resolved_config(run_dir, _compose_for_run(*overrides))
    assert main(["export-kohya", str(run_dir)]) == 0
    return load_run_config(run_dir), run_dir


def _compose_for_run(*overrides: str):
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def import_to(tmp_path: Path, source: Path, *flags: str) -> dict:
    out = tmp_path / "conf" / "experiment" / "imported.yaml"
    assert main(["import-kohya", str(source), "--out", str(out), "--force", *flags]) == 0
    return composed(f"hydra.searchpath=[file://{out.parent.parent}]", "experiment=imported")


def equivalent(key: str, original: dict, value) -> bool:
    """EXPORTED keys one side spells another way, and why they train the same."""
    flat = flatten(original)
    if key == "training.max_train_epochs" and flat["training.max_train_steps"] is not None:
        return True  # steps win here; export-kohya gives sd-scripts only --max_train_steps
    if key in ("scheduler.warmup_ratio", "scheduler.decay_ratio") and flat[key.replace("ratio", "steps")]:
        return True  # a step count wins over a ratio; sd-scripts takes one --lr_warmup_steps / --lr_decay_steps
    if key == "optimizer.text_encoder_lr" and flat[key] is None:
        return value == flat["optimizer.learning_rate"]  # null means the learning rate
    if key.startswith("dataset.validat") and not flat["dataset.validation_split"]:
        return True  # exported only when validation is on (older sd-scripts do not know them)
    if key == "output.logging_dir" and flat[key] is None:
        return str(value).endswith("/sd-scripts/logs")  # our run dir's logs: the export gives sd-scripts a folder
    return False


def assert_round_trip(original: dict, imported: dict, skip: tuple[str, ...] = ()) -> None:
    got = flatten(imported)
    differ = {}
    for key, value in flatten(original).items():
        option = OPTIONS_BY_KEY.get(key)
        if option is None or not option.flag or option.place in ("covered", "prompts") or key in skip:
            continue
        if got.get(key) != value and not equivalent(key, original, got.get(key)):
            differ[key] = (value, got.get(key))
    assert not differ, f"(exported, imported back): {differ}"


RICH = [
    "network=lokr", "network.dim=8", "network.alpha=2", "network.factor=4", "network.rank_dropout=0.1",
    "optimizer=prodigy", "+optimizer.args.eps=1e-6", "optimizer.text_encoder_lr=0.5", "scheduler=cosine",
    "scheduler.warmup_steps=7", "training.max_train_steps=50", "training.min_snr_gamma=5",
    "training.noise_offset=0.05", "training.gradient_checkpointing=true", "training.seed=7",
    "training.train_batch_size=3", "training.clip_skip=2", "dataset.enable_bucket=true", "dataset.shuffle_caption=true",
    "dataset.keep_tokens=1", "dataset.caption_dropout_rate=0.1", "dataset.flip_aug=true", "output.save_every_n_epochs=2",
    "output.save_precision=fp16", "output.training_comment=hello", "sampling.sample_every_n_epochs=3",
    "dataset.weighted_captions=true",
]  # fmt: skip


# LyCORIS' network_args: DoRA (network=lora with it is LyCORIS' algo=lora, which imports as locon).
LYCORIS = ["network=locon", "network.dora_wd=true", "network.conv_dim=4", "network.use_tucker=true",
           "network.preset=unet-convblock-only", "network.train_unet_only=true"]


@pytest.mark.parametrize("overrides", [[], RICH, ["model=tiny_sdxl", "optimizer.text_encoder_2_lr=2e-5"], LYCORIS],
                         ids=["defaults", "rich", "sdxl", "lycoris"])  # fmt: skip
def test_export_then_import_gives_back_the_same_config(tmp_path, dataset, overrides):
    original, run_dir = export_run(tmp_path, f"dataset.train_data_dir={dataset / 'train'}",
                                   f"dataset.reg_data_dir={dataset / 'reg'}", *overrides)  # fmt: skip
    sdxl = ["--sdxl"] if "model=tiny_sdxl" in overrides else []  # a config TOML does not say which script it is for
    imported = import_to(tmp_path, run_dir / "kohya_config.toml", *sdxl)
    # The built-in tiny model becomes its folder (sd-scripts takes a path); accelerate's options
    # are on the command line, not in the TOML (the next test).
    assert_round_trip(original, imported, skip=("model.path", "training.cpu", "training.num_processes"))
    assert imported["model"]["path"] and Path(imported["model"]["path"]).name.startswith("tiny-")
    assert imported["model"]["builtin"] is None
    assert imported["dataset"]["train_data_dir"] == str(dataset / "train")
    assert imported["dataset"]["reg_data_dir"] == str(dataset / "reg")


def test_the_printed_command_line_imports_with_its_accelerate_options(tmp_path, dataset):
    original, run_dir = export_run(tmp_path, f"dataset.train_data_dir={dataset / 'train'}", *RICH,
                                   "training.cpu=true", "training.num_processes=2", "training.mixed_precision=bf16")  # fmt: skip
    export = build_export(original, run_dir)
    command = tmp_path / "train.sh"
    command.write_text("#!/bin/sh\n# my run\n" + command_line(export) + "\n")
    imported = import_to(tmp_path, command)
    assert_round_trip(original, imported, skip=("model.path",))
    assert imported["training"]["cpu"] is True and imported["training"]["num_processes"] == 2


def test_a_dataset_toml_alone_gives_the_dataset(tmp_path, dataset):
    _, run_dir = export_run(tmp_path, f"dataset.train_data_dir={dataset / 'train'}", "dataset.keep_tokens=2",
                            "dataset.enable_bucket=true")  # fmt: skip
    imported = import_to(tmp_path, run_dir / "kohya_dataset.toml")
    assert imported["dataset"]["train_data_dir"] == str(dataset / "train")
    assert imported["dataset"]["keep_tokens"] == 2 and imported["dataset"]["enable_bucket"] is True


GUI = {
    "LoRA_type": "LyCORIS/LoHa", "LyCORIS_preset": "full", "pretrained_model_name_or_path": "/models/sdxl.safetensors",
    "sdxl": True, "sdxl_no_half_vae": True, "network_dim": 16, "network_alpha": 8, "conv_dim": 4, "conv_alpha": 2,
    "learning_rate": 0.0005, "text_encoder_lr": 0.0001, "unet_lr": 0.0005, "optimizer": "AdamW8bit",
    "optimizer_args": "weight_decay=0.05 betas=0.9,0.99", "lr_scheduler": "cosine", "lr_warmup": 10,
    "epoch": 12, "max_train_epochs": "0", "max_train_steps": "0", "train_batch_size": 2, "max_resolution": "1024,1024",
    "seed": "", "keep_tokens": "1", "clip_skip": "2", "mixed_precision": "bf16", "xformers": "sdpa",
    "noise_offset_type": "Original", "noise_offset": 0.05, "min_snr_gamma": 0, "save_every_n_epochs": 4,
    "cache_latents": True, "color_aug": False, "block_dims": "", "additional_parameters": "--huggingface_repo_id me/x",
    "num_cpu_threads_per_process": 2, "train_data_dir": "", "output_name": "mychar",
}  # fmt: skip


def test_a_kohya_ss_gui_json_imports_as_the_gui_would_launch_it(tmp_path, dataset, capsys):
    source = tmp_path / "SDXL - LoHa.json"
    source.write_text(json.dumps({**GUI, "train_data_dir": str(dataset / "train")}))
    cfg = import_to(tmp_path, source)
    printed = capsys.readouterr().out
    assert cfg["model"]["version"] == "sdxl" and cfg["model"]["path"] == "/models/sdxl.safetensors"
    assert (cfg["network"]["module"], cfg["network"]["dim"], cfg["network"]["alpha"]) == ("loha", 16, 8.0)
    assert (cfg["network"]["conv_dim"], cfg["network"]["conv_alpha"]) == (4, 2.0)
    assert cfg["optimizer"]["type"] == "AdamW8bit" and cfg["optimizer"]["args"] == {"weight_decay": 0.05, "betas": [0.9, 0.99]}
    assert cfg["scheduler"]["type"] == "cosine" and cfg["scheduler"]["warmup_ratio"] == 0.1  # the GUI's percent
    assert cfg["training"]["max_train_epochs"] == 12 and cfg["training"]["max_train_steps"] is None
    assert cfg["training"]["attention"] == "sdpa" and cfg["training"]["clip_skip"] == 2
    assert cfg["training"]["min_snr_gamma"] is None  # the GUI's 0 is "off"
    assert cfg["dataset"]["resolution"] == 1024 and cfg["dataset"]["keep_tokens"] == 1
    assert cfg["output"]["output_name"] == "mychar" and cfg["output"]["save_every_n_epochs"] == 4
    # additional_parameters are read as the command line they are; what has no key is listed, not dropped
    assert "huggingface_repo_id=me/x: Hugging Face upload" in printed
    header = (tmp_path / "conf" / "experiment" / "imported.yaml").read_text()
    assert "huggingface_repo_id=me/x" in header


def test_options_with_no_atelier_key_are_listed_by_name(tmp_path, capsys):
    source = tmp_path / "config.toml"
    source.write_text('pretrained_model_name_or_path = "/models/sd15.safetensors"\ntrain_data_dir = "/data/x"\n'
                      'network_module = "networks.lora"\nnetwork_dim = 4\nfused_backward_pass = true\nmy_own_flag = 3\n'
                      '[more]\nnetwork_args = ["conv_dim=4", "exclude_patterns=x", "preset=unet-only"]\n')  # fmt: skip
    out = tmp_path / "conf" / "experiment" / "x.yaml"
    assert main(["import-kohya", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fused_backward_pass=True: the optimizer step inside the backward" in printed
    assert "my_own_flag=3: not an option of sd-scripts' train_network.py" in printed
    assert "network_args=exclude_patterns=x: not an option network.module=lora takes here" in printed
    assert "network_args=preset=unet-only" in printed
    text = out.read_text()
    assert "#   fused_backward_pass=True" in text and "conv_dim: 4" in text
    assert "warning" not in printed  # what was imported makes a valid config (paths are checked when it trains)


def test_a_value_atelier_refuses_is_said_before_training(tmp_path, capsys):
    source = tmp_path / "config.toml"
    source.write_text('pretrained_model_name_or_path = "/m/sd15"\ntrain_data_dir = "/data/x"\nnetwork_dim = 0\n')
    assert main(["import-kohya", str(source), "--out", str(tmp_path / "conf" / "experiment" / "x.yaml")]) == 0
    assert "warning: the config does not check yet: 'network.dim' must be at least 1" in capsys.readouterr().out


@pytest.mark.parametrize(("content", "name", "message"), [
    ("x = [", "bad.toml", "is not valid TOML"),
    ('{"network_dim": 4}', "gui.json", "is not a kohya_ss LoRA config"),
    ("python train.py --network_dim 4", "cmd.sh", "no train_network.py"),
    ("accelerate launch train_network.py --network_dim 4 8", "cmd.sh", "--network_dim takes one value, got 2"),
    ("accelerate launch train_network.py --learning_rate fast", "cmd.sh", "--learning_rate needs a number"),
    ("accelerate launch sd3_train_network.py --network_dim 4", "cmd.sh",
     "sd3_train_network.py trains no model family Atelier knows; Atelier reads runs of train_network.py, "
     "sdxl_train_network.py, flux_train_network.py"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n[[datasets]]\n", "d.toml", "2 [[datasets]]"),
    ('dataset_config = "missing.toml"\n', "c.toml", "dataset_config=missing.toml: no such file"),
])  # fmt: skip
def test_bad_sources_name_the_file_and_the_problem(tmp_path, capsys, content, name, message):
    source = tmp_path / name
    source.write_text(content)
    assert main(["import-kohya", str(source), "--out", str(tmp_path / "conf" / "experiment" / "x.yaml")]) != 0
    assert message in capsys.readouterr().err


def test_it_never_overwrites_and_wants_an_experiment_folder(tmp_path, capsys):
    source = tmp_path / "c.toml"
    source.write_text("network_dim = 4\n")
    out = tmp_path / "conf" / "experiment" / "x.yaml"
    out.parent.mkdir(parents=True)
    out.write_text("mine\n")
    assert main(["import-kohya", str(source), "--out", str(out)]) != 0
    assert out.read_text() == "mine\n" and "--force" in capsys.readouterr().err
    assert main(["import-kohya", str(source), "--out", str(tmp_path / "x.yaml")]) != 0
    assert "<folder>/experiment/<name>.yaml" in capsys.readouterr().err


FLUX_RUN = ["model=flux1", "model.path=/models/flux1-dev.safetensors", "model.ae=/models/ae.safetensors",
            "model.clip_l=/models/clip_l.safetensors", "model.t5xxl=/models/t5xxl_fp16.safetensors",
            "network.dim=16", "network.train_blocks=single", "training.timestep_sampling=shift",
            "training.discrete_flow_shift=3.1582", "training.model_prediction_type=raw", "training.guidance_scale=1.0",
            "training.apply_t5_attn_mask=true", "training.t5xxl_max_token_length=256", "training.max_train_steps=50"]


def test_a_flux_run_exports_to_flux_train_network_and_imports_back(tmp_path, dataset):
    """export-kohya writes sd-scripts' flux_train_network.py command (networks.lora_flux, its FLUX
    options); import-kohya reads it back into the same config."""
    original, run_dir = export_run(tmp_path, f"dataset.train_data_dir={dataset / 'train'}", *FLUX_RUN)
    export = build_export(original, run_dir)
    line = command_line(export)
    assert "flux_train_network.py" in line and "--network_module networks.lora_flux" in line
    assert "--timestep_sampling shift" in line and "--apply_t5_attn_mask" in line and "train_blocks=single" in line
    command = tmp_path / "train.sh"
    command.write_text(line + "\n")
    imported = import_to(tmp_path, command)
    assert_round_trip(original, imported, skip=("model.path",))
    assert imported["model"]["version"] == "flux1" and imported["network"]["train_blocks"] == "single"
    # The config TOML does not name its script: --flux says it, as --sdxl does.
    from_toml = import_to(tmp_path, run_dir / "kohya_config.toml", "--flux")
    assert_round_trip(original, from_toml, skip=("model.path",))
    # An SD run's export carries none of FLUX's options.
    sd, sd_dir = export_run(tmp_path / "sd", f"dataset.train_data_dir={dataset / 'train'}") if (tmp_path / "sd").mkdir() \
        is None else (None, None)
    assert "--timestep_sampling" not in command_line(build_export(sd, sd_dir))
