#!/usr/bin/env bash
# Run a scaling study on this machine or inside a SLURM allocation (all points on its first node):
#   launch/scaling_study.sh --sizes t5-v1_1-base,t5-v1_1-large --zero 0,2,3 --world_size 1,8
#   sbatch --nodes 1 --gpus-per-node 8 --time 04:00:00 launch/scaling_study.sh --sizes ... --output_dir scaling/h100
# Every point is a short `accelerate launch train/main.py` run; rerunning the same command skips the points
# already in <output_dir>/results.jsonl, so a preempted or timed-out job just runs again.
# See docs/scaling.md for the flags, the outputs and how to read them.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
exec python -m mindmirror.tools.scaling "$@"
