"""`atelier export-kohya`: a run's config as sd-scripts' command line and TOML files."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import atelier.config
from atelier.cli import main
from atelier.outputs.run_dir import write_resolved_config
from atelier.tools.export_kohya import OPTIONS, OPTIONS_BY_KEY, flatten
from tests.helpers import REPO_ROOT

OVERRIDES = [
    "optimizer=adamw8bit",
    "scheduler=cosine_with_restarts",
    "network.dim=16",
    "network.alpha=8",
    "optimizer.learning_rate=3e-4",
    "optimizer.text_encoder_lr=5e-5",
    "training.max_train_epochs=7",
    "training.train_batch_size=3",
    "training.seed=123",
    "training.gradient_checkpointing=true",
    "training.noise_offset=0.05",
    "dataset.resolution=96",
    "dataset.enable_bucket=true",
    "dataset.flip_aug=true",
    "output.output_name=cubes",
    "output.save_precision=fp16",
    "sampling.sample_every_n_epochs=2",
    "sampling.prompts=[\"atelier cube, red --n blurry --d 5\"]",
]


def make_run(tmp_path: Path, *overrides: str) -> Path:
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_resolved_config(run_dir, cfg)
    return run_dir


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def test_export_kohya_names_the_same_hyperparameters(tmp_path: Path, demo_dataset_dir: Path, tiny_model_path: Path, capsys) -> None:
    run_dir = make_run(tmp_path, *OVERRIDES)
    assert cli("export-kohya", run_dir) == 0
    printed = capsys.readouterr().out

    config = tomllib.loads((run_dir / "kohya_config.toml").read_text())
    expected = {
        "pretrained_model_name_or_path": str(tiny_model_path),
        "network_module": "networks.lora",
        "network_dim": 16,
        "network_alpha": 8.0,
        "learning_rate": 3e-4,
        "text_encoder_lr": 5e-5,
        "optimizer_type": "AdamW8bit",
        "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.999"],
        "lr_scheduler": "cosine_with_restarts",
        "lr_scheduler_num_cycles": 3,
        "max_train_epochs": 7,
        "train_batch_size": 3,
        "seed": 123,
        "gradient_checkpointing": True,
        "noise_offset": 0.05,
        "mixed_precision": "no",
        "output_name": "cubes",
        "save_precision": "fp16",
        "save_model_as": "safetensors",
        "sample_every_n_epochs": 2,
        "sample_sampler": "ddim",
        "sample_prompts": str(run_dir / "kohya_prompts.txt"),
        "dataset_config": str(run_dir / "kohya_dataset.toml"),
    }
    assert {k: config.get(k) for k in expected} == expected
    assert "train_data_dir" not in config and "unet_lr" not in config and "max_train_steps" not in config
    assert config["output_dir"] == str(run_dir / "sd-scripts")

    dataset = tomllib.loads((run_dir / "kohya_dataset.toml").read_text())
    general = dataset["general"]
    assert general["resolution"] == 96  # a number in the dataset config, a string for --resolution
    assert (general["batch_size"], general["enable_bucket"], general["flip_aug"], general["caption_extension"]) == (3, True, True, ".txt")
    subsets = {Path(s["image_dir"]).name: s for s in dataset["datasets"][0]["subsets"]}
    assert subsets["4_atelier orb"] == {"image_dir": str(demo_dataset_dir.resolve() / "4_atelier orb"), "num_repeats": 4, "class_tokens": "atelier orb"}
    assert subsets["6_atelier cube"]["num_repeats"] == 6
    # only keys sd-scripts' dataset config schema accepts in [general] (library/config_util.py's
    # *_ASCENDABLE_SCHEMA; alpha_mask is in DB_SUBSET_ASCENDABLE_SCHEMA)
    allowed = {"batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso", "min_bucket_reso",
               "resolution", "network_multiplier", "color_aug", "face_crop_aug_range", "flip_aug", "num_repeats",
               "random_crop", "shuffle_caption", "keep_tokens", "keep_tokens_separator", "secondary_separator",
               "enable_wildcard", "token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix",
               "caption_extension", "class_tokens", "cache_info", "caption_dropout_every_n_epochs",
               "caption_dropout_rate", "caption_tag_dropout_rate",
               "alpha_mask"}  # fmt: skip
    assert set(general) <= allowed

    prompts = (run_dir / "kohya_prompts.txt").read_text().splitlines()
    assert prompts == ["atelier cube, red --w 96 --h 96 --s 20 --l 7 --d 5 --n blurry"]

    command = printed.split("\n\n")[0].replace("\\\n", " ")
    argv = shlex.split(command.split("\n", 1)[1])
    assert argv[:2] == ["accelerate", "launch"] and "train_network.py" in argv
    flags = {a: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True for i, a in enumerate(argv) if a.startswith("--")}
    assert flags["--network_dim"] == "16" and flags["--network_alpha"] == "8.0" and flags["--learning_rate"] == "0.0003"
    assert flags["--train_data_dir"] == str(demo_dataset_dir.resolve()) and flags["--resolution"] == "96"
    assert flags["--enable_bucket"] is True and flags["--gradient_checkpointing"] is True and "--flip_aug" in flags
    assert "--shuffle_caption" not in flags and "--v2" not in flags  # false switches are left out
    assert "--validate_every_n_epochs" not in flags and "--lr_warmup_steps" not in flags  # validation off, no warmup
    assert "--optimizer_args weight_decay=0.01 betas=0.9,0.999" in command
    assert "no sd-scripts equivalent" in printed and "model.config" in printed and "dataset.latent_cache_dir" in printed


def test_export_kohya_sd2_v_warmup_ratio_and_cpu(tmp_path: Path, capsys) -> None:
    model = tmp_path / "sd21.safetensors"
    data = tmp_path / "data"  # no N_name folders (yet): no dataset config, its options go to the main one
    data.mkdir()
    run_dir = make_run(tmp_path, "model=sd2_v", f"model.path={model}", "scheduler=cosine",
                       "scheduler.warmup_ratio=0.1", "training.cpu=true", "training.max_train_steps=50",
                       "dataset=folder", f"dataset.train_data_dir={data}", "dataset.validation_split=0.2")  # fmt: skip
    assert cli("export-kohya", run_dir, "--out", tmp_path / "kohya") == 0
    printed = capsys.readouterr().out
    config = tomllib.loads((tmp_path / "kohya" / "kohya_config.toml").read_text())
    assert config["pretrained_model_name_or_path"] == str(model) and config["v2"] and config["v_parameterization"]
    assert config["lr_warmup_steps"] == 0.1 and config["max_train_steps"] == 50
    assert "accelerate launch --num_cpu_threads_per_process 1 --cpu --mixed_precision no train_network.py" in printed
    assert not (run_dir / "kohya_config.toml").exists() and not (tmp_path / "kohya" / "kohya_dataset.toml").exists()
    assert config["train_data_dir"] == str(data) and config["resolution"] == "768" and "dataset_config" not in config
    assert config["validation_split"] == 0.2 and config["validate_every_n_epochs"] == 1
    assert "kohya_dataset.toml not written" in printed


def test_export_kohya_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    run_dir = make_run(tmp_path)
    (run_dir / "kohya_config.toml").write_text("mine")
    assert cli("export-kohya", run_dir) == 2
    assert "--force" in capsys.readouterr().err
    assert (run_dir / "kohya_config.toml").read_text() == "mine" and not (run_dir / "kohya_dataset.toml").exists()
    assert cli("export-kohya", run_dir, "--force") == 0
    assert tomllib.loads((run_dir / "kohya_config.toml").read_text())["network_dim"] == 8


def test_export_kohya_errors(tmp_path: Path, capsys) -> None:
    assert cli("export-kohya", tmp_path) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_every_config_key_is_in_the_mapping_table(tmp_path: Path) -> None:
    """A new config key must be mapped, or listed with the reason it has no sd-scripts option."""
    run_dir = make_run(tmp_path, "dataset.reg_data_dir=/data/reg", "dataset.validation_split=0.1")
    keys = set(flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
    assert keys - set(OPTIONS_BY_KEY) <= {"model.allow_pickle"}
    assert len(OPTIONS_BY_KEY) == len(OPTIONS)
    assert all(o.flag or o.note for o in OPTIONS)


def test_export_kohya_gives_sd_scripts_the_same_length(tmp_path: Path, capsys) -> None:
    """Steps win here when set; sd-scripts lets --max_train_epochs override --max_train_steps
    (train_network.py: max_train_steps = max_train_epochs * steps per epoch), so a smoke run
    (2 steps, the default 10 epochs) exports only its steps ([13] point 5)."""
    run_dir = make_run(tmp_path, "debug=smoke")
    assert cli("export-kohya", run_dir) == 0
    printed = capsys.readouterr().out
    config = tomllib.loads((run_dir / "kohya_config.toml").read_text())
    assert config["max_train_steps"] == 2 and "max_train_epochs" not in config
    assert "--max_train_steps 2" in printed and "--max_train_epochs" not in printed

    (tmp_path / "epochs").mkdir()
    epochs = make_run(tmp_path / "epochs", "training.max_train_epochs=3")  # steps unset: the epochs give the length
    assert cli("export-kohya", epochs) == 0
    config = tomllib.loads((epochs / "kohya_config.toml").read_text())
    assert config["max_train_epochs"] == 3 and "max_train_steps" not in config


def test_export_kohya_writes_each_familys_own_sample_cfg_scale(tmp_path: Path) -> None:
    """A prompt without --l samples with the family's scale (FLUX.1: 1.0, no CFG; SD: 7), or with
    sampling.cfg_scale when set: the exported prompt file says which, so sd-scripts samples alike."""
    prompt = 'sampling.prompts=["a cube"]'
    cases = [(("model=tiny_flux",), "--l 1 "), (("model=tiny_flux", "sampling.cfg_scale=7.0"), "--l 7 "),
             (("model=tiny",), "--l 7 "), (("model=tiny", "sampling.cfg_scale=4.5"), "--l 4.5 ")]
    for i, (overrides, scale) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        run_dir = make_run(tmp_path / str(i), *overrides, prompt)
        assert cli("export-kohya", run_dir) == 0
        assert scale in (run_dir / "kohya_prompts.txt").read_text(), overrides
