"""Issue [3] wired into training: buckets, caches, captions, augmentations, reg images, validation."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from atelier.errors import DatasetError
from atelier.loop.build import load_base
from atelier.loop.trainer import Trainer
from atelier.network.lora_file import load_lora
from atelier.conditioning.training_data import TrainingData
from tests.test_trainer import fresh_accelerate_state, interrupt_after_epoch, make_cfg, steps_logged, train  # noqa: F401

DEMO_SAMPLES = 56  # 6 cube images x6 repeats + 5 orb images x4
# Buckets around 64x64 for the tiny model: the 96x64 images go to 80x48, the rest to 64x64.
BUCKETS = ["dataset.enable_bucket=true", "dataset.min_bucket_reso=32", "dataset.max_bucket_reso=128",
           "dataset.bucket_reso_steps=16"]  # fmt: skip
NO_SAMPLES = "sampling.limit=0"
SMALL = "dataset.resolution=32"  # 4x fewer pixels: where the size does not matter, tests run faster


def data_for(*overrides: str, batch_size: int = 8) -> TrainingData:
    cfg = make_cfg(*overrides)
    return TrainingData(cfg.dataset, cfg.training.seed, batch_size)


def make_images(root: Path, folder: str, sizes, colour=(200, 40, 40), captions: list[str] | None = None) -> Path:
    """root/folder/img<i>.png with a left/right asymmetry (so flips and crops show)."""
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        img = Image.linear_gradient("L").resize(size).convert("RGB")
        img.paste(colour, (0, 0, max(1, size[0] // 3), size[1]))
        img.save(path / f"img{i}.png")
        if captions is not None:
            (path / f"img{i}.txt").write_text(captions[i])
    return root


@pytest.fixture(scope="module")
def vae(tiny_model_path: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_path / "vae").eval()


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.max_token_length=100", "dataset.max_token_length must be 75, 150 or 225"),
        ("dataset.keep_tokens=-1", "dataset.keep_tokens must not be negative"),
        ("dataset.caption_dropout_rate=1.5", "dataset.caption_dropout_rate must be between 0 and 1"),
        ("dataset.caption_separator=''", "dataset.caption_separator must not be empty"),
        # The tiny model's bucket bounds are 32-128 (conf/model/tiny.yaml).
        ("dataset.min_bucket_reso=2048", "dataset.max_bucket_reso (128) must not be below"),
        ("dataset.max_bucket_reso=16", "dataset.max_bucket_reso (16) must not be below dataset.min_bucket_reso"),
        ("dataset.bucket_reso_steps=0", "dataset.bucket_reso_steps must be at least 1"),
        ("dataset.prior_loss_weight=-1", "dataset.prior_loss_weight must not be negative"),
        ("dataset.validation_split=1.0", "dataset.validation_split must be at least 0 and below 1"),
        ("dataset.validate_every_n_epochs=0", "dataset.validate_every_n_epochs must be at least 1"),
        ("dataset.max_data_loader_n_workers=-1", "dataset.max_data_loader_n_workers must be at least 0"),
        ("dataset.reg_data_dir=/nonexistent/reg", "dataset.reg_data_dir does not exist"),
        ("dataset.validation_split=0.01", "dataset.validation_split=0.01 holds out no image"),
    ],
)
def test_bad_dataset_options_name_their_key(override, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data_for(override)


def test_dataset_check_reads_the_training_options():
    """`atelier dataset check` flags default to the training config's values (None: not given)
    and count the trainer's steps."""
    import argparse

    from atelier.data.check import CheckOptions, check_dataset
    from atelier.data.cli import _add_check_arguments
    from atelier.data.options import bucket_settings

    parser = argparse.ArgumentParser()
    _add_check_arguments(parser)
    args = parser.parse_args(["x"])
    for key in ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                "caption_extension"):  # fmt: skip
        assert getattr(args, key) is None, key
    data = data_for(*BUCKETS)
    cfg = make_cfg(*BUCKETS)
    report = check_dataset(cfg.dataset.train_data_dir, ".txt", CheckOptions(bucket_settings(cfg.dataset), 8))
    assert report.steps_per_epoch == data.batches_per_epoch == 8
    assert report.bucket_info == data.bucket_info


# ------------------------------------------------------------------ buckets


def test_bucketing_off_is_one_bucket_of_the_resolution():
    data = data_for()
    assert data.bucket_info["buckets"] == {"0": {"resolution": [64, 64], "count": DEMO_SAMPLES}}
    assert data.batches_per_epoch == 7


def test_buckets_set_steps_metadata_and_never_mix(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = data_for(*BUCKETS)
    counts = {tuple(b["resolution"]): b["count"] for b in data.bucket_info["buckets"].values()}
    assert counts == {(80, 48): 10, (64, 64): 46}
    assert data.batches_per_epoch == math.ceil(10 / 8) + math.ceil(46 / 8) == 8
    assert "resolution (64, 64), count: 46" in caplog.text
    for batch in data.epoch(1):
        assert len({data.assignments[i].bucket for i in batch.indices}) == 1

    run_dir, summary = train(tmp_path, *BUCKETS, "training.max_train_epochs=1", "training.train_batch_size=8",
                             NO_SAMPLES)  # fmt: skip
    assert summary["steps"] == 8 == len(steps_logged(run_dir))
    _, meta = load_lora(run_dir / "demo.safetensors")
    assert meta["ss_enable_bucket"] == "True" and meta["ss_num_batches_per_epoch"] == "8"
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("32", "128")
    info = json.loads(meta["ss_bucket_info"])
    assert sorted(b["count"] for b in info["buckets"].values()) == [10, 46]


# ------------------------------------------------------------------ latents


def test_disk_latent_cache_is_reused_and_flips_are_cached(tmp_path, vae):
    cache_dir = tmp_path / "latents"
    overrides = ("dataset.cache_latents_to_disk=true", f"dataset.latent_cache_dir={cache_dir}",
                 "dataset.flip_aug=true")  # fmt: skip
    first = data_for(*overrides)
    first.prepare(vae, torch.device("cpu"))
    assert len(first.latent_cache) == 2 * 11  # every image, flipped and not
    assert len(list(cache_dir.glob("*.safetensors"))) == 22
    second = data_for(*overrides)
    second.prepare(vae, torch.device("cpu"))
    assert second.latent_cache.stats.disk_hits == 22 and second.latent_cache.stats.encoded == 0


def test_cached_and_per_step_latents_train_the_same(tmp_path):
    args = ["training.max_train_steps=3", NO_SAMPLES]
    cached, s1 = train(tmp_path, *args, name="cached")
    per_step, s2 = train(tmp_path, *args, "dataset.cache_latents=false", name="per_step")
    a, b = load_lora(cached / "demo.safetensors")[0], load_lora(per_step / "demo.safetensors")[0]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert load_lora(per_step / "demo.safetensors")[1]["ss_cache_latents"] == "False"


@pytest.mark.parametrize("option", ["random_crop", "color_aug"])
def test_per_step_augmentations_turn_the_latent_cache_off(tmp_path, caplog, monkeypatch, option):
    from diffusers import AutoencoderKL

    encoded = []
    real_encode = AutoencoderKL.encode

    def counting(self, pixels, *a, **kw):
        encoded.append(pixels.shape[0])
        return real_encode(self, pixels, *a, **kw)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    caplog.set_level(logging.INFO)
    run_dir, summary = train(tmp_path, f"dataset.{option}=true", "training.max_train_steps=3",
                             "training.train_batch_size=4", NO_SAMPLES)  # fmt: skip
    assert f"Latent caching is disabled: {option}" in caplog.text
    assert encoded == [4, 4, 4]  # one VAE pass per step, none up front
    assert load_lora(run_dir / "demo.safetensors")[1]["ss_cache_latents"] == "False"


def test_random_crop_draws_a_new_crop_each_time(tmp_path, vae):
    from atelier.data.latents import PixelJob, StepEncoder

    root = make_images(tmp_path, "1_wide", [(96, 64)])
    path = root / "1_wide" / "img0.png"
    encoder = StepEncoder(vae, [path], torch.device("cpu"), random_crop=True, color_aug=False)
    jobs = [PixelJob((path,), ((64, 64),), (False,), (seed,)) for seed in (1, 2, 1)]
    a, b, c = encoder.encode(jobs, [[0]] * 3)
    assert torch.equal(a, c) and not torch.allclose(a, b)


def test_data_loader_workers_load_the_same_batches(tmp_path, vae):
    from atelier.data.latents import PixelJob, PixelLoader

    root = make_images(tmp_path, "1_x", [(96, 64), (80, 80), (64, 96)])
    paths = tuple(root / "1_x" / f"img{i}.png" for i in range(3))
    jobs = [PixelJob(paths, ((64, 64),) * 3, (i % 2 == 0, False, True), (i, i + 1, i + 2)) for i in range(4)]
    in_process = list(PixelLoader(random_crop=True, color_aug=True)(jobs))
    workers = PixelLoader(random_crop=True, color_aug=True, num_workers=2)
    for epoch_jobs in (jobs, jobs[::-1]):  # the worker processes serve epoch after epoch
        expected = in_process if epoch_jobs is jobs else in_process[::-1]
        assert all(torch.equal(x, y) for x, y in zip(expected, workers(epoch_jobs), strict=True))


def test_loader_workers_train_the_same_weights(tmp_path):
    args = ["dataset.random_crop=true", "dataset.color_aug=true", "dataset.flip_aug=true",
            "training.max_train_steps=2", NO_SAMPLES, SMALL]  # fmt: skip
    in_process, _ = train(tmp_path, *args, name="in_process")
    workers, _ = train(tmp_path, *args, "dataset.max_data_loader_n_workers=2", name="workers")
    a, b = load_lora(in_process / "demo.safetensors")[0], load_lora(workers / "demo.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_flip_and_colour_augmentations():
    from atelier.data.augment import color_aug, shift_hue

    img = Image.new("RGB", (8, 8), (200, 40, 40))
    shifted = shift_hue(img, 1 / 3).getpixel((0, 0))
    assert shifted[1] > shifted[0]  # red turned towards green
    changed = [color_aug(img, random.Random(seed)) for seed in range(60)]
    kinds = {im.tobytes() != img.tobytes() for im in changed}
    assert kinds == {True, False}  # applied to about a third of the draws
    assert [a.tobytes() for a in changed[:5]] == [color_aug(img, random.Random(s)).tobytes() for s in range(5)]


def test_flipped_pixels_are_mirrored(tmp_path):
    from atelier.data.augment import load_training_pixels

    root = make_images(tmp_path, "1_x", [(64, 64)])
    path = root / "1_x" / "img0.png"
    plain = load_training_pixels(path, (64, 64))
    assert torch.equal(load_training_pixels(path, (64, 64), flip=True), torch.flip(plain, dims=[-1]))


# ------------------------------------------------------------------ captions


def test_text_encoder_outputs_are_cached_when_the_text_encoder_is_frozen(tmp_path, monkeypatch):
    from transformers import CLIPTextModel

    calls = {"n": 0}
    real_forward = CLIPTextModel.forward

    def counting(self, *a, **kw):
        calls["n"] += 1
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(CLIPTextModel, "forward", counting)
    args = ["network.train_unet_only=true", "training.max_train_steps=4", NO_SAMPLES]
    cached, _ = train(tmp_path, *args, name="cached")
    assert calls["n"] == 1  # 11 distinct captions, encoded once in one batch
    calls["n"] = 0
    plain, _ = train(tmp_path, *args, "dataset.cache_text_encoder_outputs=false", name="plain")
    assert calls["n"] == 4  # once per step
    calls["n"] = 0
    train(tmp_path, *args, "dataset.shuffle_caption=true", name="shuffled")
    assert calls["n"] == 4  # captions change every step: no cache
    loss_cached = [r["loss/step"] for r in steps_logged(cached)]
    loss_plain = [r["loss/step"] for r in steps_logged(plain)]
    assert loss_cached == pytest.approx(loss_plain, rel=1e-5)


def test_caption_options_apply_per_step_from_the_seeded_rng():
    data = data_for("dataset.shuffle_caption=true", "dataset.keep_tokens=1", "dataset.caption_prefix=pre",
                    "dataset.caption_tag_dropout_rate=0.2")  # fmt: skip
    again = data_for("dataset.shuffle_caption=true", "dataset.keep_tokens=1", "dataset.caption_prefix=pre",
                     "dataset.caption_tag_dropout_rate=0.2")  # fmt: skip
    first, second = data.epoch(1), data.epoch(2)
    assert [b.captions for b in first] == [b.captions for b in again.epoch(1)]
    assert [b.captions for b in first] != [b.captions for b in second]
    for batch in first:
        for i, caption in zip(batch.indices, batch.captions):
            original = data.items[i].caption
            assert caption.startswith("pre " + original.split(",")[0])  # the kept token stays first
            assert set(caption.split(", ")[1:]) <= {t.strip() for t in original.split(",")[1:]}


def test_long_captions_are_encoded_in_chunks(tmp_path):
    from atelier.conditioning.caption_encoder import CaptionEncoder

    trainer = Trainer(make_cfg("dataset.max_token_length=150"), tmp_path)
    trainer.base = load_base(trainer.cfg, trainer.device)
    encoder = CaptionEncoder(trainer.base.tokenizer, trainer.base.text_encoder, max_token_length=150)
    assert encoder(["a " * 120, "short"]).shape[:2] == (2, 152)
    _, summary = train(tmp_path, "dataset.max_token_length=225", "training.max_train_steps=2", NO_SAMPLES)
    assert summary["status"] == "completed"


# ------------------------------------------------------------ resume


def test_resume_is_exact_with_shuffled_captions_flips_and_validation(tmp_path, monkeypatch):
    args = ["training.max_train_epochs=3", "training.train_batch_size=16", "output.save_every_n_epochs=null",
            "dataset.shuffle_caption=true", "dataset.flip_aug=true", "dataset.caption_dropout_rate=0.1",
            "dataset.validation_split=0.2", NO_SAMPLES, SMALL]  # fmt: skip
    full, full_summary = train(tmp_path, *args, name="full")
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    interrupt_after_epoch(monkeypatch, 2)
    from atelier.loop.run import run_training

    with pytest.raises(KeyboardInterrupt):
        run_training(make_cfg(*args), run_dir)
    monkeypatch.undo()
    summary = run_training(make_cfg(*args), run_dir)
    a, b = load_lora(full / "demo.safetensors")[0], load_lora(run_dir / "demo.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["validation_loss"] == full_summary["validation_loss"]
    assert summary["best_validation_loss"] == full_summary["best_validation_loss"]


def test_rng_state_round_trips_through_the_state_file(tmp_path):
    from atelier.loop.state import load_training_state, save_training_state

    data = data_for("dataset.shuffle_caption=true")
    data.epoch(1)
    save_training_state(tmp_path, {"config_fingerprint": "x", "data": data.state_dict()})
    restored = data_for("dataset.shuffle_caption=true")
    restored.load_state_dict(load_training_state(tmp_path, "x")["data"])
    assert [b.captions for b in restored.epoch(2)] == [b.captions for b in data.epoch(2)]


# ------------------------------------------------------------------ reg images


def test_reg_repeats_are_balanced_as_sd_scripts_does():
    from atelier.data.dataset import ImageItem
    from atelier.data.regularization import balance_reg_repeats

    few = [ImageItem(Path(f"r{i}.png"), "", "1_reg", 1) for i in range(3)]
    assert [item.repeats for item in balance_reg_repeats(few, 56)] == [19, 19, 18]
    many = [ImageItem(Path(f"r{i}.png"), "", "10_reg", 10) for i in range(10)]
    assert [item.repeats for item in balance_reg_repeats(many, 25)] == [10, 10, 10]  # the rest left out
    assert balance_reg_repeats(few, 0) == []


def test_loss_weights_scale_each_sample():
    from diffusers import DDPMScheduler

    from atelier.objective.losses import diffusion_loss

    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    sched, t = DDPMScheduler(), torch.tensor([10, 20])
    assert diffusion_loss(pred, target, sched, t).item() == pytest.approx(2.5)
    assert diffusion_loss(pred, target, sched, t, weights=torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one value per sample"):
        diffusion_loss(pred, target, sched, t, weights=torch.ones(3))


def reg_set(root: Path, colour) -> Path:
    return make_images(root, "1_object", [(64, 64)] * 3, colour=colour)


def test_reg_images_double_the_epoch_and_are_counted(tmp_path):
    reg = reg_set(tmp_path / "reg", (0, 0, 255))
    data = data_for(f"dataset.reg_data_dir={reg}")
    assert data.num_samples == 2 * DEMO_SAMPLES and data.batches_per_epoch == 14
    weights = data.loss_weights(data.epoch(1)[0])
    assert set(weights.tolist()) <= {1.0}  # prior_loss_weight defaults to 1
    run_dir, summary = train(tmp_path, f"dataset.reg_data_dir={reg}", "training.max_train_epochs=1",
                             "training.train_batch_size=8", NO_SAMPLES, SMALL)  # fmt: skip
    assert summary["steps"] == 14
    _, meta = load_lora(run_dir / "demo.safetensors")
    assert meta["ss_num_reg_images"] == "3" and meta["ss_num_train_images"] == str(DEMO_SAMPLES)
    assert "1_object" in json.loads(meta["ss_dataset_dirs"])


def test_prior_loss_weight_decides_how_much_reg_images_count(tmp_path):
    """With weight 0 the reg images' pixels cannot change the result; with weight 1 they do."""
    red, blue = reg_set(tmp_path / "red", (255, 0, 0)), reg_set(tmp_path / "blue", (0, 0, 255))

    def weights(reg: Path, prior: float, name: str):
        run_dir, _ = train(tmp_path, f"dataset.reg_data_dir={reg}", f"dataset.prior_loss_weight={prior}",
                           "training.max_train_steps=3", "training.train_batch_size=8", NO_SAMPLES, SMALL, name=name)  # fmt: skip
        return load_lora(run_dir / "demo.safetensors")[0]

    red0, blue0 = weights(red, 0.0, "red0"), weights(blue, 0.0, "blue0")
    assert all(torch.equal(red0[k], blue0[k]) for k in red0)
    red1, blue1 = weights(red, 1.0, "red1"), weights(blue, 1.0, "blue1")
    assert any(not torch.equal(red1[k], blue1[k]) for k in red1 if k.endswith("lora_up.weight"))
    assert any(not torch.equal(red0[k], red1[k]) for k in red0 if k.endswith("lora_up.weight"))


# ------------------------------------------------------------------ validation


def test_validation_images_are_held_out_per_folder():
    data = data_for("dataset.validation_split=0.2")
    train_paths = {item.path for item in data.items}
    val_paths = {item.path for item in data.validation_items}
    assert len(val_paths) == 2 and not train_paths & val_paths  # one per folder: 5 -> 4+1, 6 -> 5+1
    assert {item.folder_name for item in data.validation_items} == {"4_atelier orb", "6_atelier cube"}
    assert data.index.num_train_samples == 4 * 4 + 5 * 6
    assert {i.path for i in data_for("dataset.validation_split=0.2").validation_items} == val_paths
    # validation_seed, not training.seed, picks them once it is set.
    pinned = {i.path for i in data_for("dataset.validation_split=0.2", "dataset.validation_seed=3").validation_items}
    reseeded = data_for("dataset.validation_split=0.2", "dataset.validation_seed=3", "training.seed=9")
    assert {i.path for i in reseeded.validation_items} == pinned
    assert len(data_for("dataset.validation_split=0.5").validation_items) == 2 + 3  # 5 keeps 3, 6 keeps 3


def test_validation_loss_is_fixed_for_a_lora_and_logged(tmp_path):
    args = ["dataset.validation_split=0.2", "training.max_train_epochs=2", "training.train_batch_size=8",
            "dataset.validate_every_n_epochs=1", NO_SAMPLES, SMALL]  # fmt: skip
    run_dir = tmp_path / "a"
    run_dir.mkdir()
    trainer = Trainer(make_cfg(*args), run_dir)
    result = trainer.train()
    again = [
        trainer.validator.loss(trainer.base.unet, trainer.captions, trainer.accelerator.autocast, trainer.device)
        for _ in range(2)
    ]
    assert again[0] == again[1] == result.validation_loss  # same LoRA, same loss
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss/validation"]) for r in rows if "loss/validation" in r]
    assert logged == [(6, result.validation_losses[0]), (12, result.validation_losses[1])]
    assert not {i.path for i in trainer.data.items} & {i.path for i in trainer.data.validation_items}

    other_dir, other = train(tmp_path, *args, "optimizer.learning_rate=1e-2", name="b")
    assert other["validation_loss"] != result.validation_loss
    summary = json.loads((other_dir / "summary.json").read_text())
    assert summary["best_validation_loss"] == min(
        r["loss/validation"] for r in map(json.loads, (other_dir / "metrics.jsonl").read_text().splitlines())
        if "loss/validation" in r
    )


def test_validation_does_not_change_training(tmp_path):
    base = ["dataset.validation_split=0.2", "training.max_train_epochs=2", "training.train_batch_size=16", NO_SAMPLES,
            SMALL]  # fmt: skip
    every, s1 = train(tmp_path, *base, "dataset.validate_every_n_epochs=1", name="every")
    last, s2 = train(tmp_path, *base, "dataset.validate_every_n_epochs=5", name="last")
    a, b = load_lora(every / "demo.safetensors")[0], load_lora(last / "demo.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert s1["validation_loss"] == s2["validation_loss"]  # the final epoch is always validated
    assert s2["best_validation_loss"] == s2["validation_loss"]
