"""tiny-flux: a FLUX.1-dev-shaped built-in model (see atelier.models.tiny), random weights.

Saved as a diffusers FluxPipeline folder: a FluxTransformer2DModel with 2 double-stream and 3
single-stream blocks, FLUX's AE layout with 3 levels, tiny-sd15's CLIP-L-like text encoder with
the byte-level CLIP tokenizer, a tiny T5 encoder with a character-level T5 tokenizer, and FLUX's
flow-matching scheduler. Shapes are in atelier.models.flux_architectures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import architectures as arch
from . import flux_architectures as flux
from .tiny import TINY_FLUX_NAME, TINY_MODEL_NAME, build_seeded, build_tiny_tokenizer, save_pipeline

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

T5_MAX_LENGTH = 512  # FLUX.1-dev's tokenizer_2 (schnell uses 256 of it)
WORD_START = "▁"  # sentencepiece's word-start mark, T5's id 3


def build_tiny_flux(folder: Path | str) -> None:
    """Build tiny-flux with fixed seeds (one per component) and save it as a FluxPipeline folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    modules = build_seeded(
        TINY_FLUX_NAME,
        {
            "transformer": _transformer,
            "vae": _vae,
            "text_encoder": _clip_text_encoder,
            "text_encoder_2": _t5_encoder,
        },
    )
    pipeline = FluxPipeline(
        **modules,
        tokenizer=build_tiny_tokenizer(),  # pads with <|endoftext|>, as CLIP-L's in FLUX.1
        tokenizer_2=build_tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**flux.FLUX1_PIPELINE_SCHEDULER),
    )
    save_pipeline(pipeline, folder)  # the slow-tokenizer files are CLIP's; T5's is tokenizer.json only
    _name_the_t5_tokenizer_as_flux_does(Path(folder))


def _name_the_t5_tokenizer_as_flux_does(folder: Path) -> None:
    # transformers 5 has one T5 tokenizer class and saves its name, T5Tokenizer, which older
    # transformers read as the sentencepiece one (spiece.model, which needs the sentencepiece
    # package this folder does without). FLUX.1's own folders say T5TokenizerFast: the
    # tokenizer.json reader in transformers 4, an alias of T5Tokenizer in 5.
    index = folder / "model_index.json"
    config = json.loads(index.read_text(encoding="utf-8"))
    config["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _transformer(_: str) -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**flux.tiny_flux_config("transformer"))


def _vae(_: str) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**flux.tiny_flux_config("vae"))


def _clip_text_encoder(_: str) -> CLIPTextModel:
    # tiny-sd15's CLIP text tower: CLIP-L's layout (quick_gelu, no projection), 32 wide.
    return arch.build_text_encoder(TINY_MODEL_NAME)


def _t5_encoder(_: str) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**flux.tiny_flux_config("text_encoder_2")))


def build_tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer whose pieces are single characters (flux.TINY_T5_ALPHABET), built offline.

    It is the backend transformers 5's T5Tokenizer builds from a saved vocab (Unigram without
    byte fallback, whitespace split then "▁" word starts, "</s>" appended), so loading the saved
    folder gives this very tokenizer back, and older transformers read the same tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pad, eos, unk = flux.TINY_T5_SPECIAL_TOKENS
    characters = [chr(code) for start, end in flux.TINY_T5_ALPHABET for code in range(start, end + 1)]
    # Every piece is one character, so the segmentation is unique and the scores do not matter.
    vocab = [(pad, 0.0), (eos, 0.0), (unk, 0.0)] + [(piece, -1.0) for piece in [WORD_START, *characters]]
    assert len(vocab) == flux.TINY_T5_VOCAB_SIZE
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, 1)]
    )
    # extra_ids=0: no <extra_id_*> sentinels (only span-corruption pretraining uses them).
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )
