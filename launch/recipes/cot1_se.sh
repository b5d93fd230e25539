#!/usr/bin/env bash
# The paper's recipe "1 CoT + SE (self-evaluation 150 epochs, then 1 CoT 300 epochs from it)", for every seed of --runs:
#   launch/recipes/cot1_se.sh --dataset svamp --model google/t5-v1_1-base --runs 0,1,2
# Other flags as for launch/recipes/run.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" --recipes cot1_se "$@"
