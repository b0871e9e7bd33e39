"""What users get from the default run and a 4-job sweep, as digests: the proof that a
refactor changed nothing for them ([9] point 8; tests/test_unchanged_outputs.py).

For each final LoRA file: a digest of its tensor values, a digest of its layout (names,
dtypes, shapes) and its ss_* / modelspec.* metadata without the keys that change on every
run (times) or with the tensor values (sshs_* hashes). Values are bit-identical only on
the same torch build and CPU kernels, so the record names its platform; elsewhere the test
checks the layout and the metadata and says how to record the values again:

    .venv/bin/python -m tests.unchanged_outputs --commit <commit the record was made on> \
        --out tests/data/unchanged_outputs.<cpu capability>.<vendor>.json

(records the runs of that commit, checked out in a temporary git worktree, with this venv;
the test compares values with the record of its own platform, layout and metadata with
unchanged_outputs.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).resolve().parent / "data" / "unchanged_outputs.json"
# The runs: (name, train.py arguments, multirun). The sweep is the README's kind of command,
# cut to two steps a job so that the test stays short.
RUNS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("default", (), False),
    ("sweep", ("optimizer=adamw,prodigy", "network.dim=4,8", "debug=smoke"), True),
)
# Metadata that differs between two identical runs (times), or follows the tensor values.
VOLATILE = {"ss_training_started_at", "ss_training_finished_at", "modelspec.date", "sshs_model_hash", "sshs_legacy_hash"}


def cpu_vendor() -> str:
    """GenuineIntel / AuthenticAMD / ...: two CPUs of one capability (AVX512) run different
    kernels (oneDNN picks by model), and the bits differ."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def platform_fingerprint() -> dict[str, str]:
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vendor": cpu_vendor(),
        "machine": platform.machine(),
    }


def lora_digest(path: Path) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    values, layout = hashlib.sha256(), hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            layout.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            values.update(key.encode() + tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    kept = {k: v for k, v in sorted(metadata.items()) if k.startswith(("ss_", "modelspec.")) and k not in VOLATILE}
    return {"values": values.hexdigest(), "layout": layout.hexdigest(), "metadata": kept}


def final_loras(root: Path) -> dict[str, Path]:
    """Each job's final LoRA (no -<epoch> suffix), by the job's folder relative to `root`."""
    found = {}
    for path in sorted(root.rglob("*.safetensors")):
        if not re.search(r"-\d{6}$", path.stem):  # <name>-<epoch:06d> are intermediate
            found[str(path.parent.relative_to(root))] = path
    return found


def produce(tree: Path, out: Path) -> dict[str, Any]:
    """Run RUNS with `tree`'s train.py (this interpreter) into `out`; their digests."""
    # torch's own thread count, as the records were made with: another count (the tests'
    # one-thread workers) sums in another order and changes the last bits of the weights.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    runs: dict[str, Any] = {}
    for name, args, multirun in RUNS:
        where = out / name
        dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        command = [sys.executable, str(tree / "train.py"), *(["-m"] if multirun else []), *args, f"{dir_key}={where}"]
        proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
        runs[name] = {job: lora_digest(path) for job, path in final_loras(where).items()}
    return runs


def record(commit: str | None, path: Path = RECORD) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="atelier-unchanged-") as tmp:
        tree = REPO_ROOT
        if commit:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO_ROOT, check=True,
                           capture_output=True)  # fmt: skip
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
            runs = produce(tree, Path(tmp) / "out")
        finally:
            if commit:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO_ROOT, capture_output=True)
    data = {"commit": sha, "platform": platform_fingerprint(), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_path, path)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", help="record that commit's outputs (default: the working tree)")
    parser.add_argument("--out", type=Path, default=RECORD)
    args = parser.parse_args()
    data = record(args.commit, args.out)
    jobs = sum(len(r) for r in data["runs"].values())
    print(f"recorded {jobs} LoRA files of commit {data['commit'][:10]} on {data['platform']} into {args.out}")


if __name__ == "__main__":
    main()
