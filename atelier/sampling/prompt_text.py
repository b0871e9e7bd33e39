"""The text a sample prompt gives the pipeline, with its A1111 attention weights read.

Sample prompts (and negative prompts) may weight words as captions do with
dataset.weighted_captions: ``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.3)``, nesting multiplies,
``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` for the literal character (atelier.data.caption_weights).
sd-scripts' sampler always reads them, with or without --weighted_captions, and so does Atelier:

- SD1/2: sd-scripts samples through StableDiffusionLongPromptWeightingPipeline
  (library/lpw_stable_diffusion.py, get_weighted_text_embeddings): each token's states are
  multiplied by its weight and each prompt is rescaled to its previous mean (keep_mean).
- SDXL: SdxlStableDiffusionLongPromptWeightingPipeline encodes through
  SdxlTextEncodingStrategy.encode_tokens_with_weights: both encoders' states multiplied, no
  mean restored, the pooled output not weighted (what dataset.weighted_captions does in training).

A text without weight syntax (has_weight_syntax) goes to the pipeline as the text it was before
weights were read, so its image is the same bit for bit. Only a text with brackets or a
backslash is encoded here and passed as embeddings. Difference from sd-scripts: prompts are read
up to 75 tokens, weighted or not, as diffusers' pipeline reads them (sd-scripts' SD1/2 sampler
reads up to 225, its SDXL sampler up to --max_token_length).
"""

from __future__ import annotations

from typing import Any

import torch

from atelier.conditioning.sdxl import SDXLCaptionEncoder, SDXLText
from atelier.conditioning.text_chunks import encode_long
from atelier.data.caption_weights import has_weight_syntax

# One 75-token chunk: the length diffusers' pipeline reads a plain prompt to.
SAMPLE_TOKEN_LENGTH = 75


def text_arguments(pipeline: Any, prompt: str, negative_prompt: str, clip_skip: int | None = None) -> dict[str, Any]:
    """The pipeline's keyword arguments for the two texts: each either as text or as embeddings
    (`prompt_embeds`, with `pooled_prompt_embeds` on SDXL; `negative_...` for the negative).

    `clip_skip` > 1 (SD1/2 only, sd-scripts' meaning) encodes both texts here: diffusers' own
    clip_skip reaches for `text_encoder.text_model`, which transformers >= 5.6 removed.
    """
    sdxl = is_sdxl(pipeline)
    skip = None if sdxl or not clip_skip or clip_skip <= 1 else clip_skip
    arguments: dict[str, Any] = {}
    for text, prefix in ((prompt, ""), (negative_prompt, "negative_")):
        if skip is None and not has_weight_syntax(text):
            # An empty negative stays None: SDXL's pipeline then uses zeros, as it always did.
            arguments[f"{prefix}prompt"] = (text or None) if prefix else text
            continue
        if sdxl:
            encoded = encode_sdxl_text(pipeline, text)
            arguments[f"{prefix}prompt_embeds"] = encoded.hidden
            arguments[f"{prefix}pooled_prompt_embeds"] = encoded.pooled
        else:
            arguments[f"{prefix}prompt_embeds"] = encode_sd_text(pipeline, text, skip or 1)
    return arguments


def is_sdxl(pipeline: Any) -> bool:
    return getattr(pipeline, "text_encoder_2", None) is not None


def encode_sd_text(pipeline: Any, text: str, clip_skip: int = 1) -> torch.Tensor:
    """SD1/2 hidden states [1, 77, dim] of one text, weights applied and its mean kept as
    sd-scripts' sampler does; a text without weights encodes as plain CLIP text."""
    return encode_long(pipeline.tokenizer, pipeline.text_encoder, [text], SAMPLE_TOKEN_LENGTH, clip_skip,
                       weighted=True, keep_mean=True)  # fmt: skip


def encode_sdxl_text(pipeline: Any, text: str) -> SDXLText:
    """SDXL's penultimate states of both encoders [1, 77, dim1 + dim2], weighted (no mean kept),
    and the unweighted pooled output of encoder 2: the training's weighted-caption encoding."""
    encoder = SDXLCaptionEncoder(
        [pipeline.tokenizer, pipeline.tokenizer_2],
        [pipeline.text_encoder, pipeline.text_encoder_2],
        max_token_length=SAMPLE_TOKEN_LENGTH,
        weighted=True,
    )
    return encoder([text])


__all__ = ["SAMPLE_TOKEN_LENGTH", "encode_sd_text", "encode_sdxl_text", "is_sdxl", "text_arguments"]
