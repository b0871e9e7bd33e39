"""The `sd15-random` and `sdxl-random` builtins: full-size SD1.5- and SDXL-shaped base models
with random weights, built in memory from atelier.models.architectures (nothing on disk). They
are the benchmarks' full-size models; `load_base_model(builtin=...)` builds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atelier.models.loading import BaseModel

RANDOM_BUILTINS = ("sd15-random", "sdxl-random")


def build_random_base(name: str, v_parameterization: bool = False, seed: int = 0) -> BaseModel:
    """A full-size SD1.5- or SDXL-shaped base model with random weights, built in memory (benchmarks).

    The tokenizers are the tiny models' byte-level ones: their ids fit the 49408-entry embeddings.
    """
    import torch
    from transformers import CLIPTokenizer

    from atelier.models import architectures as arch
    from atelier.models.loading import BaseModel
    from atelier.models.tiny import TINY_SDXL_NAME, ensure_tiny_model

    name_arch = name.removesuffix("-random")
    sdxl = name_arch == "sdxl"
    torch.manual_seed(seed)
    tokenizers = ensure_tiny_model(name=TINY_SDXL_NAME) if sdxl else ensure_tiny_model()
    extra = {}
    if sdxl:
        extra = {
            "text_encoder_2": arch.build_text_encoder_2(name_arch),
            "tokenizer_2": CLIPTokenizer.from_pretrained(tokenizers / "tokenizer_2", local_files_only=True),
        }
    return BaseModel(
        unet=arch.build_unet(name_arch),
        vae=arch.build_vae(name_arch),
        text_encoder=arch.build_text_encoder(name_arch),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "tokenizer", local_files_only=True),
        noise_scheduler=arch.build_noise_scheduler(v_parameterization),
        version="sdxl" if sdxl else "sd1",
        v_parameterization=v_parameterization,
        name=name,
        path=f"builtin:{name}",
        **extra,
    )
