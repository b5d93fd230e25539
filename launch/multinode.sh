#!/usr/bin/env bash
# Start mindmirror's share of a multi-node job on this node: one `accelerate launch` per node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     launch/multinode.sh --dataset svamp_tree1 --from_pretrained google/t5-v1_1-large ...
#
# Environment (all but NODE_RANK and MASTER_ADDR have defaults):
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's rank, 0 .. NNODES-1
#   MASTER_ADDR    address of node 0, reachable from every node
#   MASTER_PORT    a free TCP port on node 0 (default 29500)
#   GPUS_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1)
#   ACCELERATE_CONFIG_FILE  an Accelerate config such as launch/zero3.yaml (default: plain DDP);
#                  its machine and process counts are overridden by the values above
#   MINDMIRROR_SHUTDOWN_TIMEOUT  seconds the trainers get to checkpoint after a stop signal before the
#                  torchrun agent SIGKILLs them (default 270; exported as TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
#                  whose default of 30 s is too short to save a large ZeRO checkpoint)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING (default 1), NCCL_DEBUG (default WARN)  see below
#   MINDMIRROR_CACHE  the tokenized-data cache (default ~/.cache/mindmirror): node-local or shared, both
#                  work (each node's first process builds what its folder lacks, into a folder of its own)
#   MINDMIRROR_PYTHON  the Python that has mindmirror and accelerate (default: python3 on PATH)
# Every argument goes to train/main.py unchanged; --collective_timeout (minutes, default 60) is how long a
# process waits in a collective for the others, e.g. for the main process's data build, save or export.
#
# Stopping: the trainer takes SIGTERM or SIGUSR1 as "finish this optimizer step (or this evaluation
# batch), save a checkpoint and exit with code 75", and this script then exits 75. The signal may go to
# every process of the run (a Slurm step, as the templates in launch/slurm/ do; the process group:
# `kill -TERM -- -PGID`), to this script's process (it becomes the trainer itself with one process, the
# torchrun agent that forwards SIGTERM with several), or to any one trainer: the ranks agree to stop.
set -euo pipefail

: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0)}"
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=1
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MINDMIRROR_SHUTDOWN_TIMEOUT=${MINDMIRROR_SHUTDOWN_TIMEOUT:-270}
if ! [[ $MINDMIRROR_SHUTDOWN_TIMEOUT =~ ^[0-9]+$ ]]; then
  echo "multinode: MINDMIRROR_SHUTDOWN_TIMEOUT must be whole seconds, got '$MINDMIRROR_SHUTDOWN_TIMEOUT'" >&2
  exit 2
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$MINDMIRROR_SHUTDOWN_TIMEOUT
# A collective that fails or times out on one rank ends the run with an error instead of hanging every
# rank until the job's time limit (torchrun sets the same default for its workers), and NCCL says why.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

launch=(--num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR"
        --main_process_port "$MASTER_PORT" --num_processes $((NNODES * GPUS_PER_NODE)) --same_network
        --rdzv_backend static --dynamo_backend no)
if [ -n "${ACCELERATE_CONFIG_FILE:-}" ]; then
  launch=(--config_file "$ACCELERATE_CONFIG_FILE" "${launch[@]}")
elif [ $((NNODES * GPUS_PER_NODE)) -gt 1 ]; then
  launch=(--multi_gpu "${launch[@]}")
else  # a single process: Accelerate refuses --multi_gpu and the multi-machine flags
  launch=(--num_processes 1 --num_machines 1 --dynamo_backend no)
fi

echo "multinode: node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes here, main $MASTER_ADDR:$MASTER_PORT," \
     "shutdown timeout ${MINDMIRROR_SHUTDOWN_TIMEOUT} s" >&2
# A launcher that exits ends the run (a Slurm step, the job) while its trainer is still saving.
# Accelerate's one-process launcher kills its trainer 5 s after a SIGTERM: launch/accelerate_exec.py runs
# `accelerate launch` with one change, the one-process trainer replaces the launcher (exec) instead of
# running under it. The torchrun agent (several processes) forwards SIGTERM and waits the shutdown
# timeout, but dies on SIGUSR1. Ignored signals stay ignored across exec, so the launcher ignores both
# until it installs its own handlers (torchrun: SIGTERM only); the trainer installs its own as it starts
# (a signal in its first seconds, before that, is lost).
trap '' TERM USR1
PYTHON=${MINDMIRROR_PYTHON:-$(command -v python3 || command -v python)}
exec "$PYTHON" "$repo/launch/accelerate_exec.py" "${launch[@]}" "$repo/train/main.py" "$@"
