"""dataset.subsets: several image folders, each with its own repeats and caption options
(the [[datasets.subsets]] of an sd-scripts dataset config, same key names).

A subset's caption option left out (null) is the dataset's (dataset.shuffle_caption, ...), as a
subset inherits the [general] / [[datasets]] values in sd-scripts. Augmentations, loss masks and
bucketing are dataset-wide here (dataset.flip_aug, ...): the latent cache is built for one set.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from omegaconf import MISSING

from atelier.config.schema.captions import CaptionOptions

# CaptionOptions' fields a subset may set; the rest of a subset says where its images are.
CAPTION_KEYS = tuple(f.name for f in fields(CaptionOptions))


@dataclass
class SubsetConfig:
    # The folder of images themselves (not a parent of N_name folders), as sd-scripts' image_dir.
    image_dir: str = MISSING
    num_repeats: int = 1
    # The caption of an image without a caption file (sd-scripts' class_tokens).
    class_tokens: Optional[str] = None
    # Regularization images: balanced against the train images, weighted by prior_loss_weight.
    is_reg: bool = False
    caption_extension: Optional[str] = None
    # Caption options (null: the dataset's value), with CaptionOptions' rules.
    shuffle_caption: Optional[bool] = None
    caption_separator: Optional[str] = None
    keep_tokens: Optional[int] = None
    keep_tokens_separator: Optional[str] = None
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: Optional[float] = None
    caption_tag_dropout_rate: Optional[float] = None
    caption_dropout_every_n_epochs: Optional[int] = None
    secondary_separator: Optional[str] = None
    enable_wildcard: Optional[bool] = None
    token_warmup_min: Optional[int] = None
    token_warmup_step: Optional[float] = None

    def problem(self) -> str | None:
        """What is wrong with its own values, as "<key> ..." (DatasetConfig names `dataset.subsets[i]`:
        a subset does not know its place in the list)."""
        if not str(self.image_dir).strip():
            return "image_dir is empty: give the folder that holds this subset's images"
        if self.num_repeats < 1:
            return f"num_repeats must be at least 1, got {self.num_repeats}"
        return None

    def captions(self, dataset: CaptionOptions) -> CaptionOptions:
        """This subset's caption options: its own where set, else the dataset's (ValueError naming the key)."""
        own = {name: getattr(self, name) for name in CAPTION_KEYS if getattr(self, name) is not None}
        return replace(dataset, **own) if own else dataset
