#!/usr/bin/env bash
# bash bench/gpu_check.sh   (on a machine with >= 1 NVIDIA GPU; a few minutes)
#
# What the CPU test suite cannot show: the GPU paths of the distributed trainer. Each line trains
# the tiny synthetic set for one epoch and must end with a metrics table:
#   1. DDP over NCCL with bf16-mixed, one process per visible GPU;
#   2. DeepSpeed ZeRO-2 (stock Lightning DeepSpeedStrategy on CUDA), bf16-mixed;
#   3. DeepSpeed ZeRO-3 with optimizer + parameter offload (JIT-builds DeepSpeedCPUAdam);
#   4. consolidation of the ZeRO-3 checkpoint into a plain fp32 state dict.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPUS=$(nvidia-smi -L | grep -c '^GPU')
OUT=${OUT:-/tmp/twotower-gpu-check}
TINY="data.synthetic.num_users=600 data.synthetic.num_items=300 trainer.max_epochs=1 data.dir=$OUT/data trainer.accelerator=gpu trainer.devices=$GPUS trainer.precision=bf16-mixed"
run() { local name=$1; shift; local t0=$SECONDS
  "$PY" -m twotower fit $TINY run.dir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 \
    && echo "ok   $name  $((SECONDS - t0))s" || { echo "FAIL $name (see $OUT/$name.log)"; tail -20 "$OUT/$name.log"; }; }
mkdir -p "$OUT"
run ddp trainer.strategy=ddp
run zero2 trainer.strategy=deepspeed trainer.zero_stage=2
run zero3_offload -c configs/trainer/deepspeed_zero3_offload.yaml trainer.devices=$GPUS
"$PY" -c "from twotower.trainers.checkpoints import consolidate_checkpoint as c; s=c('$OUT/zero3_offload/checkpoints/best.ckpt'); print('ok   consolidate', len(s['state_dict']), 'tensors')"
