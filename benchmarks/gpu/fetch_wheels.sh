#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels benchmarks/gpu/check.sh installs on a GPU
# machine without one: what the project needs beyond the GPU image's own packages (CUDA
# torch, transformers, accelerate, peft, safetensors, tensorboard, numpy, pillow, scipy,
# matplotlib, rich, tqdm, pyyaml...), and the project itself. Into benchmarks/gpu/wheels/
# (git-ignored), for the GPU machine's Python (default 3.12, $GPU_PYTHON_VERSION).
#
#   bash benchmarks/gpu/fetch_wheels.sh
#
# The working tree and the wheels travel together under a 64 MiB limit
# ($TRAVEL_LIMIT_MB): bitsandbytes (~43 MB, CUDA kernels) is fetched only if it fits,
# else the 8-bit rows of the check are skipped and say why.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
OUT=benchmarks/gpu/wheels
LIMIT_MB=${TRAVEL_LIMIT_MB:-64}
# Pure-Python packages, pinned as constraints.txt pins them (antlr4 and dadaptation exist
# only as source archives: `pip wheel` builds their py3-none-any wheels here).
PURE="diffusers hydra-core omegaconf antlr4-python3-runtime hydra-submitit-launcher submitit lycoris-lora
      prodigyopt dadaptation lion-pytorch schedulefree toml importlib-metadata"
# Pins constraints.txt does not hold: hydra-core 1.3 and omegaconf 2.3 need antlr4 4.9.*.
EXTRA_PINS="antlr4-python3-runtime==4.9.3 toml==0.10.2 importlib-metadata==8.7.0"

pin() {  # NAME -> NAME==VERSION from constraints.txt or EXTRA_PINS
  local v
  v=$(sed -n "s/^$1==//p" constraints.txt)
  [ -n "$v" ] || v=$(echo "$EXTRA_PINS" | tr ' ' '\n' | sed -n "s/^$1==//p")
  if [ -n "$v" ]; then echo "$1==$v"; else echo "fetch-wheels: no pin for $1" >&2; exit 1; fi
}
pipq() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
specs=$(for name in $PURE; do pin "$name"; done)
echo "fetch-wheels: $(echo $specs)"
pipq wheel --no-deps -w "$OUT.tmp" $specs
echo "fetch-wheels: the project (kohya-atelier) from this tree"
pipq wheel --no-deps -w "$OUT.tmp" .

# The travel budget: the tree git would send (tracked + untracked, not ignored) plus the wheels.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheel_bytes=$(du -cb "$OUT.tmp"/*.whl | tail -1 | cut -f1)
bnb_spec=$(pin bitsandbytes)
pipq download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT.bnb" "$bnb_spec"
bnb=$(ls "$OUT.bnb"/bitsandbytes-*.whl 2>/dev/null | head -1 || true)
if [ -n "$bnb" ]; then
  bnb_bytes=$(du -b "$bnb" | cut -f1)
  total=$((tree_bytes + wheel_bytes + bnb_bytes))
  if [ "$total" -le $((LIMIT_MB * 1024 * 1024)) ]; then
    mv "$bnb" "$OUT.tmp/"
    echo "fetch-wheels: $bnb_spec fits ($((total / 1048576)) of $LIMIT_MB MiB with the tree)"
  else
    echo "fetch-wheels: $bnb_spec left out: $((total / 1048576)) MiB with it > $LIMIT_MB MiB (8-bit rows will be skipped)"
  fi
else
  echo "fetch-wheels: no $bnb_spec wheel for Python $PYVER on manylinux x86_64 (8-bit rows will be skipped)"
fi
rm -rf "$OUT.bnb" "$OUT" && mv "$OUT.tmp" "$OUT"
ls -la "$OUT"
echo "fetch-wheels: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -cb "$OUT"/*.whl | tail -1 | cut -f1 | awk '{printf "%.1f", $1/1048576}') MiB;" \
     "tree $((tree_bytes / 1048576)) MiB. Carry $OUT to the GPU machine and run: bash benchmarks/gpu/check.sh"
