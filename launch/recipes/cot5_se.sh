#!/usr/bin/env bash
# The paper's recipe "5 CoTs + SE (self-evaluation 50 epochs, then 5 CoTs 80 epochs from it)", for every seed of --runs:
#   launch/recipes/cot5_se.sh --dataset svamp --model google/t5-v1_1-base --runs 0,1,2
# Other flags as for launch/recipes/run.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" --recipes cot5_se "$@"
