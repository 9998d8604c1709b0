#!/usr/bin/env bash
# Launch `twotower fit` with torchrun: one process per device, on one node or many.
#
#   bash launch/torchrun.sh [--nproc-per-node P] [--nnodes N] [--node-rank R]
#                           [--rdzv-endpoint HOST:PORT] [--] [twotower fit arguments...]
#
# One node, 2 CPU processes:   bash launch/torchrun.sh --nproc-per-node 2 -- trainer.accelerator=cpu
# Two nodes of 8 GPUs (run on each node, with its own --node-rank):
#   bash launch/torchrun.sh --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-endpoint node0:29500 \
#        -- -c configs/trainer/ddp.yaml
# Every option may come from the environment instead: NPROC_PER_NODE, NNODES, NODE_RANK,
# MASTER_ADDR + MASTER_PORT (the rendezvous endpoint), RDZV_ID; PYTHON picks the interpreter.
# trainer.devices and trainer.num_nodes are set to match the launch (Lightning's TorchElastic
# environment checks devices x num_nodes == WORLD_SIZE); later arguments may still override them.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ENDPOINT="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
RDZV_ID=${RDZV_ID:-twotower}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) NPROC_PER_NODE=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank|--node_rank) NODE_RANK=$2; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) RDZV_ENDPOINT=$2; shift 2 ;;
    --rdzv-id) RDZV_ID=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
set -x
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
  -m twotower fit "trainer.devices=$NPROC_PER_NODE" "trainer.num_nodes=$NNODES" "$@"
