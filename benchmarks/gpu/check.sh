#!/usr/bin/env bash
# GPU proof in one call (see benchmarks/gpu/README.md):
#
#   bash benchmarks/gpu/check.sh [--out DIR] [--budget SECONDS] [--only ROW ...]   # a CUDA machine
#   bash benchmarks/gpu/check.sh --dry --out DIR                                     # CPU, tiny models
#
# On a bare GPU machine with no network (CUDA torch, transformers, accelerate, peft,
# safetensors and tensorboard installed), it first installs what else the project needs
# from the wheels that benchmarks/gpu/fetch_wheels.sh put in benchmarks/gpu/wheels/, into
# a folder of its own ($ATELIER_SITE, default /tmp/atelier-site): the machine's torch is
# never replaced. Where every dependency is importable already (a machine where
# `pip install -e .` ran, or the project's .venv) nothing is installed.
# Results go to DIR (default $OUT, else benchmarks/results/): gpu-check.json, gpu-check.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

PYTHON=${PYTHON:-python3}
WHEELS=${ATELIER_WHEELS:-benchmarks/gpu/wheels}
SITE=${ATELIER_SITE:-/tmp/atelier-site}
# Import names of the dependencies the GPU image lacks (fetch_wheels.sh brings them).
NEEDED="diffusers hydra omegaconf antlr4 submitit hydra_plugins.hydra_submitit_launcher lycoris prodigyopt dadaptation lion_pytorch schedulefree toml"

missing() {
  "$PYTHON" - "$@" <<'PY'
import importlib.util, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a dotted name whose parent package is missing
        return False
print(" ".join(n for n in sys.argv[1:] if not found(n)))
PY
}

todo=$(missing $NEEDED)
if [ -n "$todo" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu-check: missing $todo and no wheels in $WHEELS: run benchmarks/gpu/fetch_wheels.sh on a machine with network first" >&2
    exit 2
  fi
  echo "gpu-check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE (missing: $todo)"
  # --no-deps: the wheels are the complete list; the machine's torch and the rest stay as they are.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  todo=$(missing $NEEDED)
  if [ -n "$todo" ]; then
    echo "gpu-check: still missing after installing the wheels: $todo" >&2
    exit 2
  fi
else
  # The working tree is the code measured, whatever copy of the project is installed.
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$PYTHON" benchmarks/gpu/check.py "$@"
