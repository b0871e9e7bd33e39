"""What the training loop consumes: batches per epoch, their latents, captions, loss weights.

TrainingData gathers the dataset layer (scan, validation split, reg images, buckets,
caption ops, augmentations, latent cache) behind a few calls:

    data = TrainingData(cfg.dataset, seed, batch_size)   # scan + check, no model needed
    data.prepare(vae, device)                            # latent caches
    for batch in data.load(data.epoch(epoch)): ...       # Batch: latents, captions, weights

Every per-step random choice (flip, crop and colour seeds, caption shuffle/dropout,
the seed of each batch's noise and timesteps) is drawn from one `random.Random`
when an epoch starts; its state is part of the training state (state_dict), so a
resumed run draws the same, and a batch gets the same noise whichever process of
a data-parallel run trains it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from atelier.config.schema import DatasetConfig
from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.conditioning.sdxl import time_ids
from atelier.data.buckets import (
    BucketManager,
    bucket_batches,
    bucket_steps_per_epoch,
    log_bucket_counts,
    single_bucket_warning,
)
from atelier.data.caption_ops import captions_are_static, process_caption
from atelier.data.caption_weights import brackets_cut_apart
from atelier.config.schema.captions import CaptionOptions
from atelier.data.dataset import DatasetIndex, ImageItem
from atelier.data.latent_cache import LatentCache, can_cache_latents, default_cache_dir
from atelier.runtime import phases, reuse
from atelier.config.schema.dataset import cache_latents_wanted, caption_options, max_token_length
from atelier.data.options import bucket_settings, face_crop_range, image_limits, resize_interpolation
from atelier.data.latents import PixelJob, StepEncoder
from atelier.data.masks import MaskOptions, MaskSource, find_mask_files
from atelier.data.holdout import split_validation
from atelier.data.regularization import balance_reg_repeats
from atelier.data.subsets import scan_sources
from atelier.utils.rng import as_tuples
from atelier.runtime.signals import raise_if_stop_asked

log = logging.getLogger(__name__)

@dataclass
class Batch:
    """One forward pass: sample indices into TrainingData.items and their draws."""

    indices: list[int]
    flips: list[bool]
    seeds: list[int]
    captions: list[str]
    noise_seed: int = 0  # seeds this batch's noise and timesteps
    latents: torch.Tensor | None = field(default=None, repr=False)
    masks: torch.Tensor | None = field(default=None, repr=False)  # [B, h, w] loss masks (masked_loss)

    def __len__(self) -> int:
        return len(self.indices)

    def noise_generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.noise_seed)


@dataclass(frozen=True)
class StepPlace:
    """Where an epoch's batches fall in the run: batch j of TrainingData.epoch trains at optimizer
    step step_of(j) (0-based, the steps done before it, sd-scripts' current_step)."""

    first_step: int  # optimizer steps of the epochs before this one
    accumulation: int  # batches per optimizer step (gradient_accumulation_steps)
    world_size: int  # processes; batch j goes to process j % world_size (shard)
    total_steps: int  # the run's optimizer steps (token_warmup_step below 1 is a fraction of it)

    def step_of(self, j: int) -> int:
        return self.first_step + (j // self.world_size) // self.accumulation


class TrainingData:
    def __init__(self, d: DatasetConfig, seed: int, batch_size: int):
        self.options = d
        self.seed = seed
        self.batch_size = batch_size
        self.captions = caption_options(d)
        # dataset.subsets' own caption options (an item's `subset` indexes them).
        self.subset_captions = [subset.captions(self.captions) for subset in d.subsets]
        self.rng = random.Random(seed)
        self.validation_seed = d.validation_seed if d.validation_seed is not None else seed
        limits = image_limits(d)
        full, self.reg_index = scan_sources(d, limits)
        train_items, self.validation_items = split_validation(full.items, d.validation_split, self.validation_seed)
        self.index = _subset(full, train_items)
        reg_items = balance_reg_repeats(self.reg_index.items, self.index.num_train_samples) if self.reg_index else []
        self.items: list[ImageItem] = train_items + reg_items
        self.num_train_items = len(train_items)
        self._make_buckets(d)
        # Mask files are found now, so a missing one fails before any model is loaded.
        self.masks = _mask_source(d, full.items)
        self.latent_cache: LatentCache | None = None
        self.step_encoder: StepEncoder | None = None
        self._log_summary(len(reg_items))

    def _make_buckets(self, d: DatasetConfig) -> None:
        manager = BucketManager(bucket_settings(d))
        warning = single_bucket_warning(manager.settings)
        if warning:
            log.warning(warning)
        self.assignments = manager.assign(self.items)
        # Before the validation images: with bucket_no_upscale they could add buckets.
        self.bucket_info = manager.info(self.assignments)
        self.validation_assignments = manager.assign(self.validation_items)
        self.validation_buckets = [a.bucket for a in self.validation_assignments]
        self.batches_per_epoch = bucket_steps_per_epoch(self.assignments, self.batch_size)
        log_bucket_counts(self.bucket_info, log)

    def _log_summary(self, num_reg_used: int) -> None:
        if self.reg_index is not None:
            log.info(
                "reg images: %d (x repeats: %d), %d used, balanced to %d samples per epoch, prior_loss_weight %s",
                self.reg_index.num_images,
                self.num_reg_images,
                num_reg_used,
                self.num_samples - self.index.num_train_samples,
                self.options.prior_loss_weight,
            )
        if self.validation_items:
            log.info("validation: %d image(s) held out from training", len(self.validation_items))

    # ------------------------------------------------------------- numbers
    @property
    def num_samples(self) -> int:
        """Samples in one epoch: train and reg images x repeats."""
        return sum(a.repeats for a in self.assignments)

    @property
    def num_reg_images(self) -> int:
        """sd-scripts' num_reg_images: reg images x their folders' repeats, before balancing."""
        return self.reg_index.num_train_samples if self.reg_index else 0

    @property
    def has_reg(self) -> bool:
        return len(self.items) > self.num_train_items

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """ss_dataset_dirs: train folders (images trained on), then reg folders, as sd-scripts lists them."""
        reg = self.reg_index.dataset_dirs() if self.reg_index else {}
        return {**self.index.dataset_dirs(), **reg}

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        reg = self.reg_index.tag_frequency() if self.reg_index else {}
        return {**self.index.tag_frequency(), **reg}

    def captions_of(self, item: ImageItem) -> CaptionOptions:
        """The caption options an item is drawn with: its subset's, else the dataset's."""
        return self.captions if item.subset is None else self.subset_captions[item.subset]

    def _caption_option_sets(self) -> list[CaptionOptions]:
        """The distinct caption options the trained items use."""
        return list(dict.fromkeys(self.captions_of(item) for item in self.items))

    @property
    def static_captions(self) -> bool:
        return all(captions_are_static(options) for options in self._caption_option_sets())

    def distinct_captions(self) -> list[str]:
        """Every caption a step can see when captions are static (prefix/suffix applied)."""
        return list(dict.fromkeys(self.fixed_caption(item) for item in self.items))

    def fixed_caption(self, item: ImageItem) -> str:
        """The item's caption without random processing (validation, the text-encoder cache)."""
        static = replace(
            self.captions_of(item),
            shuffle_caption=False,
            caption_dropout_rate=0.0,
            caption_tag_dropout_rate=0.0,
            caption_dropout_every_n_epochs=0,
            token_warmup_step=0.0,
        )
        return process_caption(item.caption, static, random.Random(0), 1)

    # -------------------------------------------------------------- latents
    def prepare(self, vae: torch.nn.Module, device: torch.device) -> None:
        """Cache the latents (or set up per-step encoding) and the validation latents."""
        with phases.phase("latents"):
            self._prepare(vae, device)

    def _prepare(self, vae: torch.nn.Module, device: torch.device) -> None:
        d = self.options
        cacheable, reason = can_cache_latents(d.random_crop, d.color_aug, d.face_crop_aug_range is not None)
        if cache_latents_wanted(d) and not cacheable:
            log.warning(reason)
        paths = [item.path for item in self.items]
        if cache_latents_wanted(d) and cacheable:
            self.latent_cache = self._new_cache(vae, device, flip_aug=d.flip_aug)
            stats = self.latent_cache.build(self.items, [a.bucket for a in self.assignments],
                                            check_stop=raise_if_stop_asked)
            log.info("latent cache: %d latents (%s)", len(self.latent_cache), stats)
        else:
            self.step_encoder = StepEncoder(
                vae,
                paths,
                device,
                random_crop=d.random_crop,
                color_aug=d.color_aug,
                num_workers=d.max_data_loader_n_workers,
                persistent_workers=d.persistent_data_loader_workers,
                face_crop_aug_range=face_crop_range(d),
                interpolation=resize_interpolation(d),
                vae_batch_size=d.vae_batch_size,
            )
            log.info("latents are encoded every step (not cached)")

    def validation_latents(self, vae: torch.nn.Module, device: torch.device) -> list[torch.Tensor]:
        """Centre-cropped, unflipped latents of the held-out images (cached like training ones)."""
        if not self.validation_items:
            return []
        cache = self._new_cache(vae, device, flip_aug=False)
        cache.build(self.validation_items, self.validation_buckets, progress=False)
        return [cache.get(i) for i in range(len(self.validation_items))]

    def _new_cache(self, vae: torch.nn.Module, device: torch.device, flip_aug: bool) -> LatentCache:
        d = self.options
        cache_dir = Path(d.latent_cache_dir) if d.latent_cache_dir else default_cache_dir(self.index.root)
        # Jobs of an in-process sweep share what they encoded (atelier.runtime.reuse).
        return LatentCache(vae, cache_dir, d.cache_latents_to_disk, flip_aug=flip_aug, device=device,
                           batch_size=d.vae_batch_size, shared=reuse.latent_store(),
                           interpolation=resize_interpolation(d))  # fmt: skip

    @property
    def caches_latents(self) -> bool:
        return self.latent_cache is not None

    # ------------------------------------------------- captions, validation
    def caption_encoder(
        self, tokenizer, text_encoder, *, frozen: bool, clip_skip: int, autocast: Callable[[], AbstractContextManager],
        encoder_type: Callable[..., CaptionEncoder] = CaptionEncoder,
    ) -> CaptionEncoder:
        """The run's caption encoder; it caches per caption when `frozen` and captions are static.

        tokenizer / text_encoder: one each, or lists (SDXL's two, FLUX's CLIP-L and T5);
        `encoder_type`: the family's encoder (atelier.plugins.FamilyPlugin.caption_encoder).
        """
        wanted = bool(self.options.cache_text_encoder_outputs) and frozen
        tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        text_encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        encoder = encoder_type(
            tokenizers if len(tokenizers) > 1 else tokenizers[0],
            text_encoders if len(text_encoders) > 1 else text_encoders[0],
            max_token_length=max_token_length(self.options),
            clip_skip=clip_skip,
            cache=wanted and self.static_captions,
            autocast=autocast,
            weighted=self.options.weighted_captions,
        )
        if self.options.weighted_captions:
            self._warn_brackets_cut_apart()
        if encoder.caching:
            # The held-out images' captions too: every caption a run encodes is then cached.
            validation = [self.fixed_caption(item) for item in self.validation_items]
            count = encoder.fill(list(dict.fromkeys([*self.distinct_captions(), *validation])))
            log.info("text-encoder outputs cached for %d distinct caption(s)", count)
        elif wanted:
            log.info("text-encoder outputs are not cached: captions change every step (shuffle or dropout)")
        return encoder

    def _warn_brackets_cut_apart(self) -> None:
        # sd-scripts only says so in --weighted_captions' help ("No commas inside parens").
        cut = [caption for options in self._caption_option_sets() for caption in brackets_cut_apart(
            (item.caption for item in self.items if self.captions_of(item) == options), options)]  # fmt: skip
        if cut:
            log.warning(
                "dataset.weighted_captions: %d caption(s) hold a caption_separator inside brackets, e.g. %r; "
                "shuffle_caption / caption_tag_dropout_rate / keep_tokens_separator / token_warmup_step split "
                "captions at it and break those brackets apart: write one bracket per tag, e.g. '(a:1.2), (b:1.2)'",
                len(cut), cut[0],
            )

    # -------------------------------------------------------------- batches
    def epoch(self, epoch: int, place: StepPlace | None = None) -> list[Batch]:
        """This epoch's batches (no batch mixes buckets) with every random draw made.

        `place` says at which optimizer step each batch trains (token warmup needs it).
        """
        d = self.options
        augmented = d.random_crop or d.color_aug or d.face_crop_aug_range is not None
        if place is None and any(options.token_warmup_step > 0 for options in self._caption_option_sets()):
            raise ValueError("dataset.token_warmup_step needs the batches' steps: pass TrainingData.epoch a StepPlace")
        batches = []
        for j, indices in enumerate(bucket_batches(self.assignments, self.batch_size, self.seed, epoch)):
            flips = [self.rng.random() < 0.5 for _ in indices] if d.flip_aug else [False] * len(indices)
            seeds = [self.rng.getrandbits(63) for _ in indices] if augmented else [0] * len(indices)
            step, total = (place.step_of(j), place.total_steps) if place is not None else (0, 0)
            captions = [process_caption(self.items[i].caption, self.captions_of(self.items[i]), self.rng, epoch, step,
                                        total) for i in indices]  # fmt: skip
            batches.append(Batch(indices, flips, seeds, captions, noise_seed=self.rng.getrandbits(63)))
        return batches

    def load(self, batches: list[Batch]) -> Iterator[Batch]:
        """The batches in order, each with its latents [B, C, h, w] (CPU)."""
        if self.latent_cache is not None:
            for batch in batches:
                batch.latents = self.latent_cache.get_batch(batch.indices, batch.flips)
                yield self._with_masks(batch)
            return
        assert self.step_encoder is not None, "call prepare() first"
        jobs = [self.pixel_job(batch) for batch in batches]
        latents = self.step_encoder.encode(jobs, [batch.indices for batch in batches])
        for batch, batch_latents in zip(batches, latents):
            batch.latents = batch_latents
            yield self._with_masks(batch)

    def _with_masks(self, batch: Batch) -> Batch:
        if self.masks is not None:
            job = self.pixel_job(batch)
            size = tuple(batch.latents.shape[-2:])  # the latents' h, w: masks are area-averaged to it
            batch.masks = self.masks.batch(job.paths, job.buckets, job.flips, job.seeds, size)
        return batch

    def pixel_job(self, batch: Batch) -> PixelJob:
        return PixelJob(
            tuple(self.items[i].path for i in batch.indices),
            tuple(self.assignments[i].bucket for i in batch.indices),
            tuple(batch.flips),
            tuple(batch.seeds),
        )

    def loss_weights(self, batch: Batch) -> torch.Tensor | None:
        """Per-sample loss weights: 1 for train images, prior_loss_weight for reg images."""
        if not self.has_reg:
            return None
        prior = float(self.options.prior_loss_weight)
        return torch.tensor([1.0 if i < self.num_train_items else prior for i in batch.indices])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(as_tuples(state["rng"]))

    def restart_draws(self) -> None:
        """Draw again as from the run's first epoch (training.initial_epoch / initial_step)."""
        self.rng.seed(self.seed)


def _subset(index: DatasetIndex, items: list[ImageItem]) -> DatasetIndex:
    """The index of the images trained on (validation images taken out)."""
    folders = [
        replace(folder, num_images=sum(1 for item in items if item.folder_name == folder.name))
        for folder in index.folders
    ]
    return DatasetIndex(root=index.root, folders=folders, items=items, warnings=index.warnings)


def _mask_source(d: DatasetConfig, items: list[ImageItem]) -> MaskSource | None:
    """The loss masks dataset.alpha_mask / conditioning_data_dir give (None: no masks)."""
    if not (d.alpha_mask or d.conditioning_data_dir):
        return None
    files = find_mask_files(items, d.conditioning_data_dir) if d.conditioning_data_dir else None
    return MaskSource(files, bool(d.alpha_mask), MaskOptions(bool(d.random_crop), face_crop_range(d),
                                                             resize_interpolation(d)))  # fmt: skip


def shard(batches: list[Batch], rank: int, world_size: int) -> list[Batch]:
    """Process `rank`'s share of an epoch: every world_size-th batch.

    Every process gets ceil(len / world_size) batches; the last round wraps around
    to the epoch's first batches, as accelerate's even_batches does, so no process
    waits for a gradient the others never send.
    """
    if world_size == 1:
        return batches
    count = -(-len(batches) // world_size)
    return [batches[(rank + world_size * k) % len(batches)] for k in range(count)]


def batch_time_ids(data: TrainingData, batch: Batch) -> torch.Tensor:
    """[B, 6] add_time_ids of a training batch, from its items' sizes and buckets."""
    rows = [
        time_ids(data.assignments[i].bucket, data.assignments[i].image_size, flipped)
        for i, flipped in zip(batch.indices, batch.flips)
    ]
    return torch.tensor(rows, dtype=torch.float32)


__all__ = ["Batch", "StepPlace", "TrainingData", "batch_time_ids", "shard"]

