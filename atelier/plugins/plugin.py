"""A model family as one plug-in: everything that differs between families, asked in one place.

`FamilyPlugin` is the interface the trainer, the sampler, the outputs and the tools call; a
family is added by writing one module that implements it (atelier/plugins/sd.py for SD1.x,
SD2.x and SDXL, atelier/plugins/flux.py for FLUX.1) and registering it (atelier.plugins).

The invariant: no code outside atelier/plugins picks behaviour by the model family; the config's
rules and the tools read the family's facts, everything else asks its plug-in
(tests/test_families.py scans for branches). A plug-in answers with
- `facts`: its atelier.families.ModelFamily, the data the config's rules need (they run before
  anything is loaded, so the facts sit below the config; the plug-in sits above the layers whose
  code it chooses);
- how to load it (`load`), condition it (`caption_encoder`), what a step draws, predicts and is
  scored against (`objective`: noise / target / loss and timestep sampling), which modules a
  LoRA targets and under which kohya names (`lora_names`, `network`), how to sample
  (`default_cfg_scale`, `check_sample_prompts`, `sample_clip_skip`, `sample_pipeline`) and which
  ss_* keys are its own (`own_metadata`, `metadata`).
The heavy code lives in its layer (models, conditioning, network, objective, sampling); a
plug-in method chooses and wires it, so that one module reads as the whole family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.config.sample_prompts import SamplePrompt
from atelier.config.schema import AtelierConfig, ModelConfig, NetworkConfig, SamplingConfig, TrainingConfig
from atelier.families import ModelFamily
from atelier.models.loading import BaseModel
from atelier.network.lora import LoRANetwork
from atelier.objective.steps import Objective

# A caption encoder class, or a partial of one with the family's own options: called with the
# run's tokenizers, text encoders and caching options (atelier.conditioning.training_data).
EncoderFactory = Callable[..., CaptionEncoder]


class FamilyPlugin(ABC):
    """One model family's behaviour; `facts` holds its data (atelier.families.family)."""

    facts: ModelFamily

    # ------------------------------------------------------------------ load
    @abstractmethod
    def load(self, model: ModelConfig, cache_dir: str | None = None) -> BaseModel:
        """The base model the `model` group names, float32 on the CPU (the trainer moves and casts it)."""

    # ----------------------------------------------------------- condition
    @abstractmethod
    def caption_encoder(self, base: BaseModel, t: TrainingConfig) -> EncoderFactory:
        """What turns the run's captions into the denoiser's text conditioning."""

    # ------------------------------------------------------------ objective
    @abstractmethod
    def objective(self, t: TrainingConfig, base: BaseModel) -> Objective:
        """The training step's draws (noise, timesteps), denoiser call, target and loss."""

    # -------------------------------------------------------------- network
    @abstractmethod
    def lora_names(self, base: BaseModel, net: NetworkConfig) -> list[str]:
        """The kohya names of the modules the `network` group's LoRA adapts, in the file's order."""

    @abstractmethod
    def network(self, net: NetworkConfig, base: BaseModel, unet: bool, text_encoder: bool) -> LoRANetwork:
        """The network the `network` group describes on the trained parts (from network.weights when set)."""

    # ------------------------------------------------------------- sampling
    default_cfg_scale: float  # a sample prompt's CFG scale when neither --l nor sampling.cfg_scale gives one

    def sample_cfg_scale(self, given: float | None) -> float:
        """The CFG scale of a sample prompt without --l: sampling.cfg_scale (`given`), else the family's."""
        return self.default_cfg_scale if given is None else given

    @abstractmethod
    def check_sample_prompts(self, prompts: Sequence[SamplePrompt], sampling: SamplingConfig) -> None:
        """Warn, once per run, of what the prompts ask that this family's sampler reads otherwise."""

    @abstractmethod
    def sample_clip_skip(self, t: TrainingConfig) -> int | None:
        """training.clip_skip as the sampler takes it (None: the family's pipeline has its own)."""

    @abstractmethod
    def sample_pipeline(self, base: BaseModel, cfg: AtelierConfig) -> Any:
        """The pipeline atelier.sampling.generate.generate_samples renders the run's prompts with."""

    # ------------------------------------------------------------- metadata
    own_metadata: tuple[str, ...] = ()  # ss_* keys only this family's files carry

    def metadata(self, meta: dict[str, Any]) -> None:
        """Make the run's ss_* / modelspec.* metadata the family's (in place): other families' own
        keys are dropped by atelier.outputs.metadata before this is called."""
