"""Captions longer than CLIP's 75 tokens, encoded in chunks as sd-scripts does.

sd-scripts' max_token_length (150 or 225) tokenizes a caption to that many tokens,
cuts them into 75-token chunks, wraps each chunk in its own BOS ... EOS so CLIP sees
77-token inputs, encodes the chunks, and stitches the hidden states back together:

    [BOS of chunk 0] [75 states of chunk 0] ... [75 states of chunk n-1] [last state of chunk n-1]

so the UNet gets max_token_length + 2 states. With 75 this is plain CLIP encoding.

Weighted captions (dataset.weighted_captions) go through the same chunks: tokenize_weighted
gives the ids and, position for position, each token's weight; apply_token_weights scales
the stitched hidden states by them.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from atelier.conditioning.text_encoding import encode_tokens
from atelier.config.schema.dataset import max_token_length_problem
from atelier.data.caption_weights import parse_prompt_attention


def tokenize_long(tokenizer: CLIPTokenizer, captions: list[str], max_token_length: int | None = 75) -> torch.Tensor:
    """Token ids [batch, chunks, 77]: max_token_length / 75 chunks, each BOS ... EOS/pad."""
    problem = max_token_length_problem(max_token_length)
    if problem:
        raise ValueError(problem)
    max_token_length = max_token_length or 75
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=max_token_length + 2,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return split_into_chunks(ids, tokenizer.model_max_length, tokenizer.eos_token_id, tokenizer.pad_token_id)


def tokenize_weighted(
    tokenizer: CLIPTokenizer, captions: list[str], max_token_length: int | None = 75
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [batch, chunks, 77] as tokenize_long's, weights [batch, max_token_length + 2]).

    Each (text, weight) run of the caption (atelier.data.caption_weights) is tokenized on its
    own and every token gets the run's weight; BOS, EOS and padding weigh 1. The weights are
    laid out like the stitched hidden states (stitch_chunks): position i weighs state i.
    sd-scripts: TokenizeStrategy._get_weighted_input_ids (library/strategy_base.py). A caption
    without brackets gets exactly tokenize_long's ids.
    """
    problem = max_token_length_problem(max_token_length)
    if problem:
        raise ValueError(problem)
    length = (max_token_length or 75) + 2
    all_ids, all_weights = [], []
    for caption in captions:
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in parse_prompt_attention(caption):
            # Without its BOS and EOS; verbose=False: a long run is cut below, not an error.
            tokens = tokenizer(text, verbose=False).input_ids[1:-1]
            ids += tokens
            weights += [weight] * len(tokens)
            if len(ids) > length - 2:
                break
        ids, weights = ids[: length - 2], weights[: length - 2]  # truncated as tokenize_long truncates
        padding = length - 2 - len(ids)
        all_ids.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        all_weights.append([1.0, *weights] + [1.0] * (padding + 1))
    ids_tensor = torch.tensor(all_ids, dtype=torch.long)
    chunks = split_into_chunks(ids_tensor, tokenizer.model_max_length, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return chunks, torch.tensor(all_weights)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor, keep_mean: bool = False) -> torch.Tensor:
    """Hidden states [batch, tokens, dim] x each token's weight [batch, tokens].

    sd-scripts' train_network.py / sdxl_train_network.py (library/strategy_sd.py,
    encode_tokens_with_weights): the states are multiplied, not rescaled afterwards (the older
    get_weighted_text_embeddings of fine_tune.py kept each caption's mean; train_network.py no
    longer does). A caption whose weights are all 1 comes back unchanged, bit for bit.

    `keep_mean`: then rescaled so each caption's mean over tokens and features stays what it
    was, as sd-scripts' SD1/2 sampler does (library/lpw_stable_diffusion.py,
    get_weighted_text_embeddings: the means in float32, cast to the states' dtype). Where that
    ratio is not finite or 0 (states averaging exactly 0) the states are left unrescaled
    instead of becoming NaN or zero.
    """
    weights = weights.to(device=hidden.device, dtype=hidden.dtype)
    if bool((weights == 1).all()):
        return hidden
    weighted = hidden * weights.unsqueeze(-1)
    if not keep_mean:
        return weighted
    ratio = _mean(hidden) / _mean(weighted)
    ratio = torch.where(torch.isfinite(ratio) & (ratio != 0), ratio, torch.ones_like(ratio))
    return weighted * ratio[:, None, None]


def _mean(hidden: torch.Tensor) -> torch.Tensor:
    """Each caption's mean over tokens and features, summed in float32 (half precision would
    lose it), in the states' dtype as sd-scripts keeps it."""
    return hidden.float().mean(dim=(-2, -1)).to(hidden.dtype)


def split_into_chunks(ids: torch.Tensor, chunk_length: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """[batch, n*(chunk_length-2)+2] ids -> [batch, n, chunk_length], each chunk wrapped.

    Every chunk gets the caption's first token (BOS) and its last token (EOS, or pad
    when padded). When pad differs from EOS (SD2's tokenizer), a chunk that ends
    mid-caption gets an EOS at its end and an empty chunk starts BOS EOS, so each
    chunk looks like a caption CLIP was trained on.
    """
    content = chunk_length - 2
    num_chunks = (ids.shape[1] - 2) // content
    if num_chunks < 1 or num_chunks * content + 2 != ids.shape[1]:
        raise ValueError(f"{ids.shape[1]} tokens do not split into {chunk_length}-token chunks")
    bos, last = ids[:, :1], ids[:, -1:]
    chunks = []
    for k in range(num_chunks):
        chunk = torch.cat([bos, ids[:, 1 + k * content : 1 + (k + 1) * content], last], dim=1)
        if pad_id != eos_id:
            _close_chunk(chunk, eos_id, pad_id)
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def _close_chunk(chunk: torch.Tensor, eos_id: int, pad_id: int) -> None:
    ends_mid_caption = (chunk[:, -2] != eos_id) & (chunk[:, -2] != pad_id)
    chunk[ends_mid_caption, -1] = eos_id
    empty = chunk[:, 1] == pad_id
    chunk[empty, 1] = eos_id


def encode_chunks(text_encoder: CLIPTextModel, chunk_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states [batch, n*75+2, dim] of tokenize_long's chunks (see the module doc)."""
    batch, num_chunks, chunk_length = chunk_ids.shape
    hidden = encode_tokens(text_encoder, chunk_ids.reshape(batch * num_chunks, chunk_length), clip_skip)
    return stitch_chunks(hidden, batch, num_chunks)


def stitch_chunks(hidden: torch.Tensor, batch: int, num_chunks: int) -> torch.Tensor:
    """[batch * num_chunks, chunk_length, dim] states of the chunks -> [batch, n*75+2, dim]."""
    chunk_length = hidden.shape[1]
    hidden = hidden.reshape(batch, num_chunks * chunk_length, hidden.shape[-1])
    pieces = [hidden[:, :1]]
    for k in range(num_chunks):
        start = k * chunk_length
        pieces.append(hidden[:, start + 1 : start + chunk_length - 1])  # drop each chunk's BOS and EOS
    pieces.append(hidden[:, -1:])
    return torch.cat(pieces, dim=1)


def encode_long(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    captions: list[str],
    max_token_length: int | None = 75,
    clip_skip: int = 1,
    weighted: bool = False,
    keep_mean: bool = False,
) -> torch.Tensor:
    """Hidden states [batch, max_token_length + 2, dim] of the captions; `weighted`: with the
    attention weights written in them (tokenize_weighted, apply_token_weights; `keep_mean`: see there)."""
    if not weighted:
        return encode_chunks(text_encoder, tokenize_long(tokenizer, captions, max_token_length), clip_skip)
    chunk_ids, weights = tokenize_weighted(tokenizer, captions, max_token_length)
    return apply_token_weights(encode_chunks(text_encoder, chunk_ids, clip_skip), weights, keep_mean)


__all__ = [
    "apply_token_weights",
    "encode_chunks",
    "encode_long",
    "split_into_chunks",
    "stitch_chunks",
    "tokenize_long",
    "tokenize_weighted",
]
