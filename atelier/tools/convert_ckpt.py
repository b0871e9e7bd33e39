"""`atelier convert-ckpt`: a pickled checkpoint (.ckpt / .pt / .pth / .bin) to .safetensors.

A pickle is a program: unpickling it can run any code its author put in. This tool
reads one only with --allow-pickle, and even then through torch's restricted
weights-only unpickler, with every non-tensor object the file names (a Lightning
callback, or a payload) replaced by an inert stub: no code from the file runs.
The tensors are written unchanged (keys, dtypes) to a .safetensors file, which
holds data only and loads everywhere (A1111, ComfyUI, diffusers, this trainer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atelier.tools.common import ToolError, check_output, existing_file

SAVE_DTYPES = {"keep": None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def convert(source: Path, output: Path, dtype: torch.dtype | None = None) -> tuple[int, list[str], str]:
    """Write the tensors of `source` to `output`; (tensors written, keys dropped, what it looks like)."""
    from safetensors.torch import save_file

    from atelier.models.load_errors import ModelLoadError
    from atelier.models.pickles import load_pickled_state_dict
    from atelier.models.sources import identify_single_file
    from atelier.utils.atomic import atomic_path

    state = load_pickled_state_dict(source, "convert-ckpt")
    tensors: dict[str, torch.Tensor] = {}
    dropped = []
    seen_storage: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            dropped.append(str(key))
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        value = value.contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen_storage:  # safetensors refuses tensors sharing memory
            value = value.clone()
        seen_storage.add(value.untyped_storage().data_ptr())
        tensors[str(key)] = value
    if not tensors:
        raise ToolError(f"'{source}' holds no tensors")
    try:
        what = identify_single_file(list(tensors), file=source, key="input").description
    except ModelLoadError as error:
        what = str(error).split(": ", 2)[-1].split(". ")[0]
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "converted_from": source.name})
    return len(tensors), dropped, what


def run(args: argparse.Namespace) -> int:
    from atelier.models.pickles import is_pickle_file

    source = existing_file(args.input, "checkpoint")
    output = check_output(args.output, args.force, [source])
    if not is_pickle_file(source):
        raise ToolError(f"'{source}' is not a pickled checkpoint (.ckpt, .pt, .pth, .bin)")
    if output.suffix.lower() != ".safetensors":
        raise ToolError(f"the output must be a .safetensors file, got '{output}'")
    if not args.allow_pickle:
        raise ToolError(
            f"'{source}' is a Python pickle, and unpickling can run code hidden in the file. Pass "
            "--allow-pickle to read it anyway, with torch's restricted (weights-only) unpickler: only "
            "tensors are built, anything else is replaced by an inert stub"
        )
    from atelier.models.pickles import pickled_globals

    stubbed = pickled_globals(source, "convert-ckpt")
    count, dropped, what = convert(source, output, SAVE_DTYPES[args.save_precision])
    print(f"{source.name}: {what}")
    if stubbed:
        print(f"not run (replaced by inert stubs, left out): {', '.join(stubbed)}")
    print(f"wrote {count} tensors to {output}")
    if dropped:
        more = " ..." if len(dropped) > 8 else ""
        print(f"left out {len(dropped)} non-tensor entries: {', '.join(dropped[:8])}{more}")
    return 0
