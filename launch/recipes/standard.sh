#!/usr/bin/env bash
# The paper's recipe "standard distillation (label task only, 300 epochs)", for every seed of --runs:
#   launch/recipes/standard.sh --dataset svamp --model google/t5-v1_1-base --runs 0,1,2
# Other flags as for launch/recipes/run.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" --recipes standard "$@"
