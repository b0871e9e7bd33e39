"""VAE latents of the training images, encoded once per run."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from atelier.data.dataset import ImageItem
from atelier.data.images import load_image


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL,
    items: list[ImageItem],
    resolution: int,
    device: torch.device,
    seed: int,
    batch_size: int = 4,
) -> torch.Tensor:
    """Scaled latents [N, C, h, w] on the CPU, one per item, in item order.

    Sampled from the VAE's posterior with a seeded generator, so the cache is the
    same in every run of the same seed.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc="caching latents", unit="batch", leave=False):
        batch = items[start : start + batch_size]
        pixels = torch.stack([load_image(item.path, resolution, resolution) for item in batch])
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(device, dist.mean.dtype)
        chunks.append((dist.mean + dist.std * noise).float().cpu())
    return torch.cat(chunks) * vae.config.scaling_factor
