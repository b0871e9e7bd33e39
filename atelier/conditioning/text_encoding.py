"""Caption -> text-encoder hidden states, with sd-scripts' clip_skip."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel


def encode_tokens(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states for the UNet's cross-attention.

    clip_skip=k takes the output of the k-th layer from the end and applies the
    final layer norm to it, as sd-scripts and A1111 do.
    """
    input_ids = input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_norm(hidden)
