"""sampling: the sample images made during training, and how often."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import SI

from atelier.config.sample_prompts import SampleDefaults, load_prompt_file, parse_prompts
from atelier.config.samplers import normalize_sampler
from atelier.config.schema.checks import unresolved
from atelier.config.schema.fields import option
from atelier.errors import ConfigError, MissingFileError


@dataclass
class SamplingConfig:
    prompts: List[str] = option(
        default_factory=list, flag="sample_prompts",
        doc='Lines in sd-scripts syntax: "prompt --n negative --w 512 --h 512 --s 20 --l 7 --d 1". Prompt and '
            'negative are read with A1111 weights as sd-scripts\' sampler reads them: (word) x1.1, [word] /1.1, '
            '(word:1.3), \\( for a literal bracket.',
        kohya="written to kohya_prompts.txt",
    )
    prompt_file: Optional[str] = option(None, flag="sample_prompts", doc="A file of such lines.",
                                        kohya="its lines written to kohya_prompts.txt")
    limit: Optional[int] = option(None, doc="Use only the first N prompts (debug runs).",
                                  kohya="only the first N prompts are written")
    sample_every_n_epochs: Optional[int] = option(5, flag="sample_every_n_epochs",
                                                  doc="Sample every n epochs (null: only after the last step).")
    sample_every_n_steps: Optional[int] = option(
        None, flag="sample_every_n_steps",
        doc="Sample every n steps instead (needs sample_every_n_epochs=null: in sd-scripts the epochs win).",
    )
    sample_at_first: bool = option(False, flag="sample_at_first",
                                   doc="Also sample before the first step: the base model, for comparison.")
    sampler: str = option("ddim", flag="sample_sampler", doc="The sampler (ddim, euler_a, dpmsolver++, ...).")
    width: int = option(SI("${dataset.resolution}"), flag="sample_prompts --w",
                        doc="Sample width; a prompt's --w wins over it.")
    height: int = option(SI("${dataset.resolution}"), flag="sample_prompts --h",
                         doc="Sample height; a prompt's --h wins over it.")
    steps: int = option(20, flag="sample_prompts --s", doc="Sampling steps; a prompt's --s wins over it.")
    cfg_scale: float | None = option(None, flag="sample_prompts --l",
                                     doc="CFG scale; a prompt's --l wins over it. null: the model family's (SD 7.0; "
                                         "FLUX.1 1.0, no CFG, as sd-scripts).")
    seed: int = option(1234, flag="sample_prompts --d", doc="Sampling seed; a prompt's --d wins over it.")

    def __post_init__(self) -> None:
        """The sampler and the prompt lines are parsed now, so a typo fails before training rather
        than after it (when the LoRA would not be written)."""
        for key in ("sample_every_n_epochs", "sample_every_n_steps"):
            every = getattr(self, key)
            if every is not None and every < 1:
                raise ConfigError(f"sampling.{key}={every}: must be at least 1 (null: off)")
        if self.sample_every_n_steps is not None and self.sample_every_n_epochs is not None:
            raise ConfigError(
                f"sampling.sample_every_n_steps={self.sample_every_n_steps} and sampling.sample_every_n_epochs="
                f"{self.sample_every_n_epochs} are both set; sd-scripts then samples by epoch and ignores the steps: "
                "set sampling.sample_every_n_epochs=null to sample by steps (or sample_every_n_steps=null)"
            )
        if unresolved(self.width) or unresolved(self.height):
            return  # built with its defaults (the dataset's resolution): checked once resolved
        try:
            normalize_sampler(str(self.sampler))
        except ValueError as err:
            raise ConfigError(f"sampling.sampler: {err}") from None
        # Parsed for its syntax only: the family's CFG scale is not known here (FamilyPlugin.sample_cfg_scale).
        defaults = SampleDefaults(width=self.width, height=self.height, steps=self.steps,
                                  cfg_scale=1.0 if self.cfg_scale is None else self.cfg_scale, seed=self.seed)
        try:
            if self.prompts:
                parse_prompts(list(self.prompts), defaults)
            elif self.prompt_file:
                load_prompt_file(self.prompt_file, defaults)
        except FileNotFoundError as err:
            raise MissingFileError(f"{err}: pass an existing .txt, .toml or .json file, or sampling.prompt_file=null") from None
        except ValueError as err:
            key = "sampling.prompts" if self.prompts else "sampling.prompt_file"
            raise ConfigError(f"{key}: {err}") from None
