"""FLUX.1's memory switches, measured on tiny-flux and sized on the real FLUX.1-dev architecture.

    python benchmarks/bench_flux_memory.py [--steps 10] [--no-markdown]

For each switch (none, training.gradient_checkpointing, training.fp8_base with bf16,
dataset.cache_text_encoder_outputs with a frozen CLIP-L, training.blocks_to_swap) one model=tiny_flux run is set up
in-process and trained a few steps by hand, and the script reports:

- frozen weight bytes on the training device: the transformer and the text encoders as
  stored (fp8 where fp8_base stores them), less the text encoders a cached run moves off it and
  the weights blocks_to_swap keeps in CPU memory;
- weight bytes copied to the device in one step (blocks_to_swap's price);
- activation bytes saved for the backward of one step (torch.autograd.graph.saved_tensors_hooks:
  every tensor autograd keeps, counted once), what gradient checkpointing trades for time;
- the median seconds per step (CPU: a time ratio, not a GPU speed).

Then the same accounting on FLUX.1-dev's real shapes, built on the meta device (no weights,
no memory): transformer (12B) and T5-XXL / CLIP-L bytes in bf16 and in fp8. The CPU here has
no GPU, so no VRAM is measured; the bytes are what the switches move, per tensor.
Figures go to stdout, benchmarks/results/flux-memory-<time>.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.utils.atomic import write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
BASE = ["model=tiny_flux", "sampling.limit=0", "training.train_batch_size=2", "network.train_unet_only=true"]
SWITCHES = {
    "none": ["dataset.cache_text_encoder_outputs=false"],
    "gradient_checkpointing": ["dataset.cache_text_encoder_outputs=false", "training.gradient_checkpointing=true"],
    "fp8_base (bf16)": ["dataset.cache_text_encoder_outputs=false", "training.mixed_precision=bf16",
                        "training.fp8_base=true"],
    "bf16 (fp8_base's baseline)": ["dataset.cache_text_encoder_outputs=false", "training.mixed_precision=bf16"],
    "cache_text_encoder_outputs": ["dataset.cache_text_encoder_outputs=true"],
    "blocks_to_swap=2": ["dataset.cache_text_encoder_outputs=false", "training.blocks_to_swap=2"],
}  # fmt: skip
SWAP_FLUX1 = 18  # sd-scripts' "safe for most cases" blocks_to_swap for FLUX.1 on a 24 GB card


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (an fp8 parametrization's original)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def typed_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import atelier.config
    from atelier.config.typed import run_config

    atelier.config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return run_config(compose("config", overrides=overrides))


def measure_switch(name: str, overrides: list[str], steps: int) -> dict:
    from accelerate.state import AcceleratorState

    from atelier.loop.adapter import Adapter
    from atelier.models import block_swap

    AcceleratorState._reset_state(True)
    copied = {"bytes": 0}
    fetch = block_swap.fetch_weight

    def counting_fetch(layer, device):  # what a swapped run copies to the device, per use
        weight = fetch(layer, device)
        copied["bytes"] += block_swap.stored_bytes(layer)
        return weight

    block_swap.fetch_weight = counting_fetch
    with tempfile.TemporaryDirectory(prefix="atelier-flux-mem-") as tmp:
        adapter = Adapter(typed_config([*BASE, *overrides]), Path(tmp))
        adapter.setup()
        base = adapter.base
        text_bytes = sum(stored_bytes(te) for te in base.text_encoders)
        # A cached run's frozen text encoders leave a GPU (build.offload_text_encoders): count them off.
        offloaded = adapter.captions.caching
        # blocks_to_swap: the streamed weights stay in CPU memory (the CPU is the device here: counted by layer).
        t = adapter.cfg.training
        streamed = block_swap.streamed_layers(block_swap.blocks_to_swap(base.unet, t.blocks_to_swap)) \
            if t.blocks_to_swap else []
        off_device = sum(block_swap.stored_bytes(layer) for layer in streamed)
        frozen = stored_bytes(base.unet) - off_device + (0 if offloaded else text_bytes)  # LoRA: not in it
        batches = list(adapter.data.load(adapter.data.epoch(1)))
        saved, seconds, copies = [], [], []
        for i in range(steps):
            batch = batches[i % len(batches)]
            total = {"bytes": 0, "seen": set()}

            def pack(tensor: torch.Tensor, total=total) -> torch.Tensor:
                key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
                if key not in total["seen"]:
                    total["seen"].add(key)
                    total["bytes"] += tensor.untyped_storage().nbytes()
                return tensor

            copied["bytes"] = 0
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                inputs = adapter.step_inputs(batch)
                with adapter.accelerator.autocast():
                    pred = adapter.objective.predict(base.unet, inputs.noisy, inputs.timesteps, inputs.hidden)
                loss = adapter.step_loss(batch, inputs, pred)
            adapter.accelerator.backward(loss)
            adapter.optimizer_step()
            seconds.append(time.perf_counter() - start)
            saved.append(total["bytes"])
            copies.append(copied["bytes"])
        block_swap.fetch_weight = fetch
        return {
            "switch": name,
            "frozen_bytes_on_device": frozen,
            "text_encoder_bytes": text_bytes,
            "text_encoders_off_device": offloaded,
            "saved_activation_bytes": statistics.median(saved),
            "weights_copied_per_step": statistics.median(copies),
            "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 4),
            "overrides": [*BASE, *overrides],
        }


def flux1_dev_sizes() -> dict:
    """FLUX.1-dev's transformer, T5-XXL and CLIP-L on the meta device: bytes by storage dtype."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from atelier.models.flux_architectures import build_flux_transformer

    with torch.device("meta"):
        transformer = build_flux_transformer("dev")
        # google/t5-v1_1-xxl's encoder and openai/clip-vit-large-patch14's text tower.
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77))

    def sizes(model: torch.nn.Module) -> dict:
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        total = sum(p.numel() for p in model.parameters())
        return {"parameters": total, "bf16_bytes": 2 * total, "fp8_base_bytes": linear + 2 * (total - linear)}

    from atelier.models.block_swap import blocks_to_swap, streamed_layers

    swapped = sum(layer.weight.numel() for layer in streamed_layers(blocks_to_swap(transformer, SWAP_FLUX1)))
    size = sizes(transformer)
    # blocks_to_swap: those weights stay in CPU memory; each step copies them twice (forward, backward).
    size["blocks_to_swap"] = {"blocks": SWAP_FLUX1, "streamed_parameters": swapped,
                              "bf16_bytes_on_device": size["bf16_bytes"] - 2 * swapped,
                              "fp8_base_bytes_on_device": size["fp8_base_bytes"] - swapped}  # fmt: skip
    return {"transformer": size, "t5xxl": sizes(t5), "clip_l": sizes(clip)}


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def markdown(record: dict) -> str:
    rows = ["| switch | frozen weights on the device | saved activations / step | weights copied / step | "
            "s / step (CPU) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in record["tiny_flux"]:
        rows.append(f"| {r['switch']} | {r['frozen_bytes_on_device'] / 1e6:.2f} MB | "
                    f"{r['saved_activation_bytes'] / 1e6:.2f} MB | {r['weights_copied_per_step'] / 1e6:.2f} MB | "
                    f"{r['seconds_per_step']} |")  # fmt: skip
    real = record["flux1_dev"]
    t, t5, clip = real["transformer"], real["t5xxl"], real["clip_l"]
    swap = t["blocks_to_swap"]
    text = "\n".join(rows)
    return f"""
## FLUX.1 memory switches (benchmarks/bench_flux_memory.py, {record['date'][:10]})

{record['machine']}; `{record['command']}`. tiny-flux, batch 2 at 64 px, network.train_unet_only
(CLIP-L frozen, so its outputs can be cached), median of {record['steps']} steps:

{text}

FLUX.1-dev's real shapes (meta device): transformer {t['parameters'] / 1e9:.2f} B parameters,
{gb(t['bf16_bytes'])} in bf16, {gb(t['fp8_base_bytes'])} with fp8_base (Linear weights in fp8);
T5-XXL {gb(t5['bf16_bytes'])} bf16 / {gb(t5['fp8_base_bytes'])} fp8; CLIP-L {gb(clip['bf16_bytes'])}.
With cached text-encoder outputs both text encoders leave the GPU ({gb(t5['bf16_bytes'] + clip['bf16_bytes'])}
in bf16). fp8_base + cached outputs leave {gb(t['fp8_base_bytes'])} of frozen weights on a 24 GB card.
blocks_to_swap={swap['blocks']} keeps {swap['streamed_parameters'] / 1e9:.2f} B transformer parameters in CPU memory:
{gb(swap['bf16_bytes_on_device'])} of the transformer stay on the device in bf16,
{gb(swap['fp8_base_bytes_on_device'])} with fp8_base; each step copies the streamed weights to the device twice
(forward and backward; three times with gradient checkpointing).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "command": "python benchmarks/bench_flux_memory.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "tiny_flux": [measure_switch(name, overrides, args.steps) for name, overrides in SWITCHES.items()],
        "flux1_dev": flux1_dev_sizes(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"flux-memory-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json", json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    section = markdown(record)
    print(section)
    if not args.no_markdown:
        write_text(BENCHMARKS_MD, BENCHMARKS_MD.read_text(encoding="utf-8").rstrip("\n") + "\n" + section)


if __name__ == "__main__":
    main()
