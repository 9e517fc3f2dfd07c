#!/usr/bin/env bash
# The GPU path in one command (about 6 minutes on one H200): the CUDA tests, the fast engine's
# benchmark with the batched trainer on the GPU (P1, P3), and a 50-client pFedPG round on a
# ViT-B/16 at 224 px; one JSON with every figure.
#
#   scripts/gpu_check.sh [OUTPUT.json] [extra python -m fedpers.gpu_check flags]
#
# On a machine with torch, timm, transformers and peft but not the rest of fedpers' dependencies,
# put wheels of the missing pure-Python packages in .whl/ (Python 3.12 example, run where pip can
# reach the package index):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       flwr-datasets==0.6.1 datasets==4.8.5 omegaconf==2.4.0 multiprocess==0.70.19 dill==0.4.1
# They are installed into a temporary folder, not into the machine's Python. Flower itself is not
# needed: the fast engine does not import it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-experiments/bench/gpu_check.json}
shift || true
if ! python3 -c "import omegaconf, flwr_datasets, datasets" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
mkdir -p "$(dirname "$out")"
python3 -m fedpers.gpu_check --output "$out" "$@"
