#!/usr/bin/env bash
# Multi-node torchrun launch of launch.train. Run it once on every node with the same
# arguments; each node says who it is through the environment:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 GPUS_PER_NODE=8 \
#       launch/multinode.sh --job.config_file configs/llama3_8b.toml [--section.field value ...]
#
#   NNODES          number of nodes                              (default 1)
#   NODE_RANK       this node's rank, 0 .. NNODES-1              (required when NNODES > 1)
#   MASTER_ADDR     address of node 0, reachable from all nodes  (required when NNODES > 1)
#   MASTER_PORT     a free TCP port on node 0                    (default 29500)
#   GPUS_PER_NODE   processes per node, one per GPU              (default: GPUs seen by nvidia-smi, else 1)
#   PYTHON          interpreter                                  (default python3)
#   TORCHRUN_ARGS   extra torchrun flags, e.g. "--max-restarts 3"
#   LOG_RANK        the global rank whose log is shown on the console (default 0)
#   LOG_DIR         every rank's stdout/stderr, as files (default ./outputs/torchrun_logs)
#
# One log stream, as torchtitan's run_train.sh: only rank LOG_RANK's output reaches the console
# (teed to its file too); every other rank writes only to its file under LOG_DIR (torchrun's
# --redirects/--tee; <LOG_DIR>/<run id>_*/attempt_<n>/<local rank>/{stdout,stderr}.log).
# All remaining arguments go to launch.train (torchtitan's --section.field flags).
# Rendezvous is torchrun's static one: node ranks are fixed, node 0 hosts the store.
# Run from the repo root (configs refer to assets/ by relative path).
set -euo pipefail

NNODES="${NNODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ "$NNODES" -gt 1 ]]; then
    : "${NODE_RANK:?NODE_RANK must be set on every node when NNODES > 1}"
    : "${MASTER_ADDR:?MASTER_ADDR (address of node 0) must be set when NNODES > 1}"
fi
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
fi

LOG_RANK="${LOG_RANK:-0}"
LOG_DIR="${LOG_DIR:-./outputs/torchrun_logs}"
first_rank=$((NODE_RANK * GPUS_PER_NODE))
if (( LOG_RANK >= first_rank && LOG_RANK < first_rank + GPUS_PER_NODE )); then
    log_flags=(--tee 3 --local-ranks-filter "$((LOG_RANK - first_rank))" --role rank)
else
    log_flags=(--redirects 3)
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    --log-dir "$LOG_DIR" "${log_flags[@]}" \
    ${TORCHRUN_ARGS:-} \
    -m launch.train "$@"
