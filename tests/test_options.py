"""sd-scripts names are data on the schema fields: every option has a doc, every sd-scripts
flag reaches `atelier export-kohya` and the README table, every ss_* key the LoRA metadata."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import atelier.config
from atelier.config.options import (
    README_BEGIN,
    README_END,
    all_options,
    groups,
    render_markdown,
    sd_scripts_name,
)
from atelier.config.schema import flag_name
from atelier.config.typed import run_config
from atelier.outputs.metadata import training_metadata
from atelier.outputs.run_dir import write_resolved_config
from atelier.tools.export_kohya import (
    OPTIONS_BY_KEY,
    Export,
    build_export,
    load_run_config,
)
from tests.helpers import REPO_ROOT

FLAGGED = [o for o in all_options() if o.flag]
WITH_SS = [o for o in all_options() if o.ss]

# Run configs that, together, give every flagged option a value sd-scripts gets.
EXPORT_RUNS = [
    [
        "model=tiny_sd2_v", "model.vae=/models/vae.safetensors",
        "network.dropout=0.1", "network.conv_dim=4", "network.conv_alpha=2", "network.rank_dropout=0.1",
        "network.module_dropout=0.1", "network.scale_weight_norms=1.0", "network.train_unet_only=true",
        "network.weights=/loras/start.safetensors",
        "+optimizer.args.eps=1e-6", "optimizer.unet_lr=1e-4", "optimizer.text_encoder_lr=5e-5",
        "scheduler=warmup_stable_decay", "scheduler.warmup_steps=10", "scheduler.min_lr_ratio=0.1",
        "scheduler.decay_steps=5", "scheduler.timescale=100", "scheduler.step_rules='1:10,0.5'",
        "dataset.reg_data_dir=/data/reg", "dataset.validation_split=0.1", "dataset.validation_seed=3",
        "dataset.validate_every_n_steps=50", "dataset.max_validation_steps=2", "output.save_every_n_steps=50", "output.save_last_n_epochs=2", "output.save_n_epoch_ratio=3",
        "output.save_last_n_steps=100",
        "dataset.caption_prefix=a", "dataset.caption_suffix=b", "dataset.keep_tokens_separator='|||'",
        "dataset.max_token_length=150", "dataset.enable_bucket=true", "dataset.bucket_no_upscale=true",
        "dataset.shuffle_caption=true", "dataset.flip_aug=true", "dataset.random_crop=true", "dataset.color_aug=true",
        "dataset.cache_latents_to_disk=true",
        "training.max_train_steps=100", "training.cpu=true", "training.num_processes=2", "training.min_snr_gamma=5",
        "training.noise_offset=0.1", "training.adaptive_noise_scale=0.01", "training.multires_noise_iterations=6",
        "training.ip_noise_gamma=0.1", "training.zero_terminal_snr=true", "training.min_timestep=10",
        "training.max_timestep=900", "training.debiased_estimation_loss=true", "training.huber_scale=2",
        "training.noise_offset_random_strength=true", "training.ip_noise_gamma_random_strength=true",
        "training.scale_v_pred_loss_like_noise_pred=true",
        "training.torch_compile=true", "training.gradient_checkpointing=true", "training.mixed_precision=bf16",
        "training.full_bf16=true", "dataset.vae_batch_size=2",
        "training.initial_step=5", "training.skip_until_initial_step=true",
        "sampling.prompts=[\"a cube\"]",
        "output.training_comment=c", "output.metadata_title=t", "output.metadata_author=a",
        "output.metadata_description=d", "output.metadata_license=l", "output.metadata_tags='x,y'",
        "output.metadata_trigger_phrase=p", "output.no_metadata=true", "output.metadata_usage_hint=h",
        "output.metadata_thumbnail='data:,x'", "output.metadata_merged_from='a, b'", "output.metadata_preprocessor=pp",
        "output.metadata_is_negative_embedding=false",
    ],
    ["network=lokr", "network.train_text_encoder_only=true", "scheduler.warmup_ratio=0.1", "network.dora_wd=true",
     "network.conv_dim=4", "network.use_tucker=true", "network.preset=full",
     "sampling.sample_every_n_epochs=null", "sampling.sample_every_n_steps=50", "sampling.sample_at_first=true",
     "training.v_pred_like_loss=0.1", "dataset.secondary_separator=';;;'", "dataset.enable_wildcard=true",
     "dataset.token_warmup_min=2", "dataset.token_warmup_step=0.5", "dataset.face_crop_aug_range=[2.0,4.0]",
     "dataset.resize_interpolation=bicubic", "dataset.weighted_captions=true"],
    ["network=dylora", "network.unit=2", "network.loraplus_lr_ratio=16", "network.loraplus_unet_lr_ratio=8",
     "network.loraplus_text_encoder_lr_ratio=4", "sampling.prompt_file={prompts_txt}", "dataset.alpha_mask=true"],
    ["training.masked_loss=true", "dataset.conditioning_data_dir=/data/masks", "training.initial_epoch=2"],
    ["model=flux1", "model.path=/models/flux1-dev.safetensors", "model.ae=/models/ae.safetensors",
     "model.clip_l=/models/clip_l.safetensors", "model.t5xxl=/models/t5xxl_fp16.safetensors",
     "network.train_blocks=single", "training.timestep_sampling=shift", "training.discrete_flow_shift=3.1582",
     "training.model_prediction_type=raw", "training.guidance_scale=1.0", "training.sigmoid_scale=1.5",
     "training.weighting_scheme=logit_normal", "training.logit_mean=0.1", "training.logit_std=1.2",
     "training.mode_scale=1.3", "training.apply_t5_attn_mask=true", "training.t5xxl_max_token_length=256",
     "training.blocks_to_swap=18"],
    ["output.log_with=all", "output.logging_dir=/logs", "output.log_prefix=mine-", "output.log_tracker_name=chars",
     "output.wandb_run_name=first", "output.log_tracker_config={tracker_toml}", "training.mixed_precision=fp16",
     "training.full_fp16=true", "training.fp8_base=true", "training.fp8_base_unet=true",
     "training.resume_from={state_pt}", "output.save_state_on_train_end=true", "output.save_last_n_epochs_state=2", "output.save_state_every_n_steps=10", "output.save_last_n_steps_state=20"],
    ["model=tiny_sdxl", "optimizer.text_encoder_2_lr=2e-5", "scheduler.class_path=StepLR", "+scheduler.args.step_size=10",
     "model.base_weights=[/loras/a.safetensors,/loras/b.safetensors]", "model.base_weights_multiplier=[0.5]"],
    [f"network.{key}=[{','.join(['2'] * 25)}]" for key in ("block_dims", "block_alphas", "conv_block_dims",
                                                            "conv_block_alphas")]
    + ["network.down_lr_weight='sine+0.5'", "network.mid_lr_weight=0.5", "network.up_lr_weight=[1.0,0.5,0.0]",
       "network.block_lr_zero_threshold=0.1"],
]


def compose_config(*overrides: str):
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def exported(flag: str, export: Export) -> bool:
    """Whether sd-scripts gets `flag` ("network_dim", "network_args conv_dim", "sample_prompts --w")."""
    name, _, inner = flag.partition(" ")
    if inner.startswith("--"):  # an option of each sample prompt line
        return name in export.args and all(f" {inner} " in line for line in export.prompts)
    if inner:  # a key=value inside a list option
        return any(item.startswith(f"{inner}=") for item in export.args.get(name, []))
    return name in export.args or name in export.dataset_general or name in export.accelerate


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> list[Export]:
    prompts_txt = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts_txt.write_text("a sphere --s 9\n")
    tracker_toml = prompts_txt.with_name("trackers.toml")
    tracker_toml.write_text("[tensorboard]\nflush_secs = 30\n")
    state_pt = prompts_txt.with_name("demo-state.pt")  # training.resume_from's file must be there
    state_pt.write_bytes(b"")
    found = []
    for n, overrides in enumerate(EXPORT_RUNS):
        run_dir = tmp_path_factory.mktemp(f"run{n}")
        paths = {"prompts_txt": prompts_txt, "tracker_toml": tracker_toml, "state_pt": state_pt}
        write_resolved_config(run_dir, compose_config(*(o.format(**paths) for o in overrides)))
        found.append(build_export(load_run_config(run_dir), run_dir))
    return found


def test_every_option_has_a_doc() -> None:
    undocumented = [o.key for o in all_options() if len(o.doc) < 10]
    assert not undocumented, f"give these fields option(..., doc=...): {undocumented}"
    assert {o.group for o in all_options()} == set(groups())


def test_the_options_with_an_sd_scripts_flag_are_many() -> None:
    # The schema carries the names; losing them (a field declared without option(flag=...)) fails here.
    assert len(FLAGGED) > 90 and len(WITH_SS) > 45
    assert {"network.dim", "optimizer.learning_rate", "dataset.resolution", "output.output_name"} <= {
        o.key for o in FLAGGED
    }


@pytest.mark.parametrize("option", FLAGGED, ids=lambda o: o.key)
def test_every_flag_reaches_export_kohya(option, exports) -> None:
    assert OPTIONS_BY_KEY[option.key].flag == flag_name(option.flag)
    assert any(exported(option.flag, export) for export in exports), (
        f"{option.key}: sd-scripts' {option.flag} is in none of the exports; give it a value in EXPORT_RUNS, "
        "or fix atelier/tools/kohya_options.py's HOW"
    )


def test_every_ss_key_is_written_by_the_metadata_writer() -> None:
    kwargs = {"base_model_name": "base", "optimizer_name": "torch.optim.adamw.AdamW", "dataset_dirs": {"1_cube": {}},
              "tag_frequency": {}, "num_train_images": 4, "num_batches_per_epoch": 2, "num_epochs": 3,
              "max_train_steps": 6, "started_at": 1.0}  # fmt: skip
    # network.weights: ss_network_weights is written only for a run that starts from a file; the
    # comment and the modelspec.* texts only when given.
    # Options added after the unchanged-outputs record are written when on (WRITTEN_WHEN_ON).
    cfg = compose_config("network.weights=/loras/start.safetensors", "training.train_batch_size=3",
                         "training.noise_offset=0.1", "training.noise_offset_random_strength=true",
                         "training.ip_noise_gamma=0.1", "training.ip_noise_gamma_random_strength=true",
                         "dataset.face_crop_aug_range=[2.0,4.0]", "dataset.resize_interpolation=area",
                         *(f"output.{name}=x" for name in ("training_comment", "metadata_author", "metadata_description",
                                                          "metadata_license", "metadata_tags",
                                                          "metadata_trigger_phrase", "metadata_usage_hint",
                                                          "metadata_merged_from", "metadata_preprocessor",
                                                          "metadata_is_negative_embedding")),
                         "output.metadata_thumbnail='data:,x'", "dataset.validation_split=0.1",
                         "dataset.max_validation_steps=2")  # fmt: skip
    meta = training_metadata(run_config(cfg), **kwargs)  # the typed config, as the trainer passes it
    # Options that need another precision than the run above (written when on, too).
    fp16 = compose_config("training.mixed_precision=fp16", "training.full_fp16=true", "training.fp8_base=true",
                          "training.fp8_base_unet=true")
    # FLUX's flow-matching keys are written for a FLUX run only.
    flux = compose_config("model=flux1", "model.path=/models/flux1-dev.safetensors")
    written = set(meta) | set(training_metadata(run_config(fp16), **kwargs)) | set(training_metadata(run_config(flux),
                                                                                                      **kwargs))
    missing = {o.key: [k for k in o.ss if k not in written] for o in WITH_SS if not set(o.ss) <= written}
    assert not missing, f"declared on the schema, not written by atelier/outputs/metadata.py: {missing}"
    assert meta["ss_batch_size_per_device"] == "3" and meta["ss_network_weights"] == "/loras/start.safetensors"
    assert meta["ss_loss_type"] == "l2" and meta["ss_mixed_precision"] == "no"


def test_every_flag_and_ss_key_is_in_the_readme_table() -> None:
    table = readme_table((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines() if line.startswith("| `")}
    for option in all_options():
        assert option.key in rows, option.key
        for name in ([sd_scripts_name(option.flag)] if option.flag else []) + list(option.ss):
            assert f"`{name}`" in rows[option.key], (option.key, name)


def test_readme_table_is_up_to_date() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_table(readme) == render_markdown(all_options()), (
        "README's option table is out of date: run .venv/bin/atelier options --readme README.md"
    )


def test_atelier_options_prints_a_group(tmp_path: Path) -> None:
    atelier_cmd = [sys.executable, "-m", "atelier.cli", "options"]
    proc = subprocess.run([*atelier_cmd, "network"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("\n\n")[[b.startswith("network.dim:") for b in proc.stdout.split("\n\n")].index(True)]
    assert block.startswith("network.dim: int = 8\n") and "--network_dim" in block and "ss_network_dim" in block
    assert "The rank" in block and "dataset." not in proc.stdout

    proc = subprocess.run([*atelier_cmd, "netwrok"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 2 and "netwrok" in proc.stderr and "network, optimizer" in proc.stderr

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- options:begin -->\nstale\n<!-- options:end -->\nrest\n")
    proc = subprocess.run([*atelier_cmd, "--readme", str(readme)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("<!-- options:end -->\nrest\n")
    assert readme_table(text) == render_markdown(all_options())


def readme_table(readme: str) -> str:
    """The generated part of README.md (between the markers)."""
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    return readme[start:end].strip("\n") + "\n"
