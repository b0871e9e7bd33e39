#!/usr/bin/env bash
# Creates .venv with everything Kohya-Atelier needs (idempotent: a second run only checks).
# torch goes in first and is pinned through constraints.txt: any looser requirement
# would pull the newest torch with several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=$(sed -n 's/^torch==//p' constraints.txt)

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION"
  pip install "torch==$TORCH_VERSION"
fi
if ! .venv/bin/python -c "import atelier, hydra, diffusers, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.atelier-installed ] || [ constraints.txt -nt .venv/.atelier-installed ]; then
  echo "setup: installing kohya-atelier and its dependencies"
  pip install -c constraints.txt -e ".[dev]"
  touch .venv/.atelier-installed
fi

installed=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$installed" != "$TORCH_VERSION" ]; then
  echo "setup: torch $installed was installed instead of $TORCH_VERSION; see constraints.txt" >&2
  exit 1
fi
echo "setup: ready (.venv, torch $installed)"
