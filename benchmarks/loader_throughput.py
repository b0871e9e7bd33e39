"""How fast training batches are produced: from the latent cache vs encoded every step.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/loader_throughput.py

Measures images/s of TrainingData.load(TrainingData.epoch(e)), the exact code the
trainer runs, with the embedded tiny model's VAE on the CPU, for

- the demo dataset (11 images, 64 px, 56 samples per epoch) and
- a synthetic dataset: 64 generated 256 px images (square, 3:2 and 2:3) written to a
  temp dir, trained at 128 px (the tiny VAE downsamples only 2x, so its attention at
  256 px would cost ~1.5 s per image and measure nothing but that):

    cache build     encoding every image once (the up-front cost of the cache)
    disk reload     a second run finding every latent in the disk cache
    memory cache    batches from the in-memory latent cache (the default)
    pixels only     decode + crop + flip + colour of a per-step batch, no VAE, in a
                    torch DataLoader with 0 (in process), 1 and 2 worker processes
    per step        the same plus the VAE encode (random_crop/color_aug runs)

Prints a table and appends a section to BENCHMARKS.md (--no-write to skip).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from atelier.config.schema import DatasetConfig  # noqa: E402
from atelier.conditioning.training_data import TrainingData  # noqa: E402
from atelier.data.latents import PixelLoader  # noqa: E402
from atelier.utils.atomic import write_text  # noqa: E402

BATCH_SIZE = 8
SYNTHETIC_RESOLUTION = 128
WORKERS = (0, 1, 2)


def synthetic_dataset(root: Path, count: int = 64, size: int = 256) -> Path:
    """`count` random-noise-and-gradient PNGs of mixed aspect ratios in root/1_synthetic."""
    folder = root / "1_synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shapes = [(size, size), (size * 3 // 2, size), (size, size * 3 // 2)]
    for i in range(count):
        width, height = shapes[i % len(shapes)]
        noise = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(noise).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"synthetic, image {i}")
    return root


def dataset_config(root: Path, resolution: int, cache_dir: Path, **options) -> DatasetConfig:
    cfg = DatasetConfig(name="bench", train_data_dir=str(root), resolution=resolution, latent_cache_dir=str(cache_dir))
    return OmegaConf.structured(cfg) if not options else OmegaConf.merge(OmegaConf.structured(cfg), options)


def epoch_rate(data: TrainingData, epochs: int) -> float:
    """Median images/s over `epochs` epochs of data.load(data.epoch(e))."""
    rates = []
    for epoch in range(1, epochs + 1):
        batches = data.epoch(epoch)
        start = time.perf_counter()
        images = sum(batch.latents.shape[0] for batch in data.load(batches))
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def pixel_rate(data: TrainingData, workers: int, epochs: int) -> float:
    """Median images/s of decoding the epochs' pixels; worker processes start once (first epoch)."""
    loader = PixelLoader(data.options.random_crop, data.options.color_aug, workers)
    rates = []
    for epoch in range(1, epochs + 1):
        jobs = [data.pixel_job(batch) for batch in data.epoch(epoch)]
        start = time.perf_counter()
        images = sum(pixels.shape[0] for pixels in loader(jobs))
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(name: str, root: Path, resolution: int, vae, epochs: int) -> list[tuple[str, str, str, float]]:
    cpu = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        cfg = dataset_config(root, resolution, Path(cache_dir), cache_latents_to_disk=True, flip_aug=True)
        cached = TrainingData(cfg, 42, BATCH_SIZE)
        start = time.perf_counter()
        cached.prepare(vae, cpu)
        latents = len(cached.latent_cache)
        rows.append((name, "cache build (VAE, flip_aug: 2 latents/image)", "-", latents / (time.perf_counter() - start)))
        reloaded = TrainingData(cfg, 42, BATCH_SIZE)
        start = time.perf_counter()
        reloaded.prepare(vae, cpu)
        rows.append((name, "disk cache reload", "-", latents / (time.perf_counter() - start)))
        rows.append((name, "memory cache (default)", "-", epoch_rate(cached, epochs)))
    augmented = TrainingData(
        dataset_config(root, resolution, root, random_crop=True, color_aug=True, flip_aug=True), 42, BATCH_SIZE
    )
    for workers in WORKERS:
        rows.append((name, "pixels only (decode, crop, flip, colour)", str(workers), pixel_rate(augmented, workers, epochs)))
    for workers in WORKERS:
        augmented.options.max_data_loader_n_workers = workers
        augmented.prepare(vae, cpu)
        rows.append((name, "per step (pixels + VAE encode)", str(workers), epoch_rate(augmented, epochs)))
    return rows


def table(rows, samples: dict[str, str]) -> str:
    lines = ["| dataset | batches from | DataLoader workers | images/s |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {samples[name]} | {mode} | {workers} | {rate:,.0f} |" for name, mode, workers, rate in rows]
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPU(s) (nproc), {model}; load average at the end {load}"


def versions() -> str:
    import diffusers
    import PIL

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"Pillow {PIL.__version__}; torch threads {torch.get_num_threads()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (median; default 3)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL

    from atelier.models.tiny import ensure_tiny_model

    vae = AutoencoderKL.from_pretrained(ensure_tiny_model() / "vae").eval()
    demo = REPO_ROOT / "atelier" / "assets" / "demo_dataset"
    samples = {
        "demo": "demo (11 images, 64 px, 56 samples/epoch)",
        "synthetic": f"synthetic (64 images of 256 px, trained at {SYNTHETIC_RESOLUTION} px, 64 samples/epoch)",
    }
    rows = measure("demo", demo, 64, vae, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        rows += measure("synthetic", synthetic_dataset(Path(tmp)), SYNTHETIC_RESOLUTION, vae, args.epochs)
    result = table(rows, samples)
    print(result)
    if not args.no_write:
        write_section(result, args)
    return 0


def write_section(result: str, args: argparse.Namespace) -> None:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE") if k in os.environ)
    command = " ".join(filter(None, [env, ".venv/bin/python benchmarks/loader_throughput.py", *map(shlex.quote,
                                                                                                  sys.argv[1:])]))
    section = [
        f"## Loader throughput ({datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- command: `{command}`",
        f"- batch size {BATCH_SIZE}, tiny model VAE on the CPU, median of {args.epochs} epochs per row",
        "",
        result,
        "",
    ]
    path = REPO_ROOT / "BENCHMARKS.md"
    # The same header as benchmarks/bench_train.py writes, whichever script runs first.
    header = "# Benchmarks\n\nRows appended by `benchmarks/*.py`; each names its machine and exact command.\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else header
    write_text(path, text.rstrip("\n") + "\n\n" + "\n".join(section))
    print(f"appended to {path}")


if __name__ == "__main__":
    raise SystemExit(main())
