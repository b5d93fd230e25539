#!/usr/bin/env bash
# Run the paper's recipes (all five unless --recipes says otherwise) for a dataset, a model and seeds,
# chaining the self-evaluation stage into the CoT stage, then test-time self-evaluation and the table:
#
#   launch/recipes/run.sh --dataset svamp --model google/t5-v1_1-base --runs 0,1,2 --output_dir runs/recipes
#   mindmirror-report runs/recipes
#
# Flags: python -m mindmirror.tools.recipes --help. Add --config_file launch/zero2.yaml (or any Accelerate
# config) to run every stage on several GPUs; flags after -- go to every train/main.py stage.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m mindmirror.tools.recipes "$@"
