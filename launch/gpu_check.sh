#!/usr/bin/env bash
# One prepared GPU check, about 8 minutes on one H100/H200: t5-v1_1-large (random init), bf16, the bundled data.
#
#   launch/gpu_check.sh                       # figures to ./gpu_check/ (or to $OUT where that is set)
#   MODEL=t5-v1_1-base STEPS=20 launch/gpu_check.sh
#
# For each layout on one GPU (plain Accelerate bf16 "ddp", DeepSpeed ZeRO-2, DeepSpeed ZeRO-3) it trains STEPS
# optimizer steps, evaluates (generation) and tests the best export, then runs a 2-step stage-2 run initialised
# from the ZeRO-2 run's export (the export reload). It prints, per layout, tokens/s, MFU, peak GPU memory and the
# loss, and writes them to gpu_check.json, so the figures can go into docs/benchmarks.md.
# Needs: a CUDA build of torch and `pip install -e .` (deepspeed, datasets and transformers from pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu_check}
MODEL=${MODEL:-t5-v1_1-large}
STEPS=${STEPS:-40}
BATCH=${BATCH:-64}
PER_RUN_S=${PER_RUN_S:-140}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())"

common=(--from_pretrained "$MODEL" --random_init --batch_size "$BATCH" --lr 1e-4 --lr_scheduler constant
        --warmup_ratio 0 --logging_steps 5 --eval_steps 0 --max_eval_samples 128 --max_test_samples 128
        --max_input_length 512 --max_target_length 128 --gen_max_len 32 --report_to none)
launch() {  # launch NAME ACCELERATE_FLAGS... -- TRAINER_FLAGS...
  local name=$1; shift
  local acc=()
  while [ "$1" != "--" ]; do acc+=("$1"); shift; done; shift
  echo "== $name"
  rm -rf "${OUT_DIR:?}/$name"
  timeout "$PER_RUN_S" python -m accelerate.commands.launch --num_machines 1 --num_processes 1 \
    --dynamo_backend no "${acc[@]}" train/main.py "$@" --output_dir "$OUT_DIR/$name" \
    > "$OUT_DIR/$name.log" 2>&1 || echo "$name failed or timed out (exit $?): see $OUT_DIR/$name.log"
  tail -n 14 "$OUT_DIR/$name.log"
}

launch ddp --mixed_precision bf16 -- "${common[@]}" --max_steps "$STEPS"
launch zero2 --use_deepspeed --deepspeed_config_file ds_configs/zero2.json --zero3_init_flag false \
  -- "${common[@]}" --max_steps "$STEPS"
launch zero3 --use_deepspeed --deepspeed_config_file ds_configs/zero3.json --zero3_init_flag true \
  -- "${common[@]}" --max_steps "$STEPS"
if [ -d "$OUT_DIR/zero2/best" ]; then
  launch reload --mixed_precision bf16 -- "${common[@]}" --max_steps 2 --init_from "$OUT_DIR/zero2/best"
fi

python - "$OUT_DIR" <<'EOF'
import json, statistics, sys
from pathlib import Path

root, rows = Path(sys.argv[1]), []
for name in ("ddp", "zero2", "zero3", "reload"):
    run = root / name
    if not (run / "summary.json").is_file():
        rows.append({"layout": name, "status": "failed"})
        continue
    summary = json.loads((run / "summary.json").read_text())
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in train if "tokens_per_s" in m][1:] or [m for m in train if "tokens_per_s" in m]
    rows.append({"layout": name, "status": "ok", "steps": summary["final_step"],
                 "tokens_per_s": statistics.median(m["tokens_per_s"] for m in train),
                 "mfu": statistics.median(m.get("mfu", float("nan")) for m in train),
                 "peak_mem_gb": max(summary["peak_mem_mb_per_rank"]) / 1024, "final_loss": summary["final_loss"],
                 "test_accuracy": summary["test_accuracy"], "precision": summary["mixed_precision"],
                 "wall_s": summary["wall_s"]})
print("\n| layout | steps | tokens/s | MFU | peak GPU memory (GB) | final loss | wall (s) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r["status"] != "ok":
        print(f"| {r['layout']} | failed | | | | | |")
        continue
    print(f"| {r['layout']} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_gb']:.1f} | "
          f"{r['final_loss']:.4f} | {r['wall_s']:.0f} |")
(root / "gpu_check.json").write_text(json.dumps(rows, indent=2))
EOF
