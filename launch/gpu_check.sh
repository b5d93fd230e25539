#!/usr/bin/env bash
# The device check: at most 8 minutes on one GPU (H100/H200), and the same script on CPU in seconds (CI runs that).
#
#   launch/gpu_check.sh                     # GPU: rows and gpu_check.json in ./gpu_check/ (or in $OUT where set)
#   launch/gpu_check.sh --cpu               # or GPU_CHECK_CPU=1: tiny model, 4 steps, fp32, gloo (tests/test_gpu_check.py)
#   BATCH=32 STEPS=40 launch/gpu_check.sh   # any variable below overrides its default
#
# Four one-process runs, one after the other, each under `timeout -s KILL` (SIGTERM would make the trainer save a
# checkpoint) through launch/accelerate_exec.py, as launch/multinode.sh starts the trainer:
#   ddp     plain Accelerate, bf16 autocast (fp32 master weights)
#   zero2   DeepSpeed, ds_configs/zero2.json (bf16)
#   reload  2 steps of a ddp run initialised from the ZeRO-2 run's best/ export (a bf16 export): its master weights
#           must be float32
#   zero3   DeepSpeed, ds_configs/zero3.json (bf16), zero3_init_flag off: the same initial weights as ddp and zero2
# Each trains STEPS steps of t5-v1_1-base (random init, the real 32,128-row vocabulary) on synthetic rows of 512
# input tokens and 128-token rationales, at the largest micro-batch the memory planner fits in FILL of the GPU,
# then evaluates (generation), saves its checkpoint, exports best/ and final/ and tests best/, as every run does.
# On one GPU ZeRO-2/3 shard nothing: they measure their own overheads and must train like DDP.
#
# A row is printed as each run ends (see docs/benchmarks.md, "launch/gpu_check.sh"); then PASS/FAIL for each run,
# for the agreement of the ddp, zero2 and zero3 losses (bf16 noise: 2% relative) and for the reload's float32.
# Exit code 0 when everything passes. Data, caches, checkpoints and exports live in a scratch folder; each run's
# folder is deleted once its row is printed (best/ of zero2 after the reload), the scratch folder at the end, so
# the disk holds at most one run's checkpoint and exports (about 22 bytes a parameter, 5.5 GB for t5-v1_1-base;
# the plan refuses a model above MAX_DISK_GB). What stays, in the results folder: each run's console log, its
# summary.json, metrics.jsonl and log.txt, rows.jsonl, losses.json and gpu_check.json.
#
# Variables (GPU default / CPU default):
#   OUT or RESULTS  results folder (gpu_check)            SCRATCH_DIR  where the scratch folder goes (TMPDIR, /tmp)
#   MODEL  t5-v1_1-base / tiny       VOCAB  32128          STEPS  40 / 4          BATCH  0 = the planner's fit / 4
#   FILL   0.8 (share of GPU memory the planned batch may use)                   LOG_EVERY  5 / 2 (logging steps)
#   INPUT_LEN  512 / 64              TARGET_LEN  128 / 32  GEN_LEN  32 / 8 (generated tokens at evaluation)
#   EVAL_ROWS  192 / 8               TEST_ROWS  96 / 8     RELOAD_STEPS  2
#   RUN_S  120 / 300 (limit of one run)  RELOAD_S  75 / 300    TOTAL_S  480 / 1200 (the whole check; the CPU
#   mode's limits are wide: on 2 shared cores a first DeepSpeed run can take minutes)
#   MAX_DISK_GB  15                  LOSS_RTOL  0.02 (bf16) / 1e-4 (fp32)    PYTHON  python3 on PATH
# Needs: a CUDA build of torch and `pip install -e .` (the CPU mode: the CPU build).
set -uo pipefail
cd "$(dirname "$0")/.."

CPU=${GPU_CHECK_CPU:-0}
[ "${1:-}" = "--cpu" ] && CPU=1
if [ "$CPU" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU mode stays on CPU, GPU or not
  d_model=tiny d_steps=4 d_batch=4 d_log=2 d_in=64 d_tgt=32 d_gen=8 d_eval=8 d_test=8 d_run=300 d_reload=300 d_total=1200
  ddp_precision=no
else
  d_model=t5-v1_1-base d_steps=40 d_batch=0 d_log=5 d_in=512 d_tgt=128 d_gen=32 d_eval=192 d_test=96 d_run=120
  d_reload=75 d_total=480
  ddp_precision=bf16
fi
RESULTS=${RESULTS:-${OUT:-gpu_check}}
MODEL=${MODEL:-$d_model} VOCAB=${VOCAB:-32128} STEPS=${STEPS:-$d_steps} BATCH=${BATCH:-$d_batch} FILL=${FILL:-0.8}
LOG_EVERY=${LOG_EVERY:-$d_log} INPUT_LEN=${INPUT_LEN:-$d_in} TARGET_LEN=${TARGET_LEN:-$d_tgt} GEN_LEN=${GEN_LEN:-$d_gen}
EVAL_ROWS=${EVAL_ROWS:-$d_eval} TEST_ROWS=${TEST_ROWS:-$d_test} RELOAD_STEPS=${RELOAD_STEPS:-2}
RUN_S=${RUN_S:-$d_run} RELOAD_S=${RELOAD_S:-$d_reload} TOTAL_S=${TOTAL_S:-$d_total}
MAX_DISK_GB=${MAX_DISK_GB:-15} LOSS_RTOL=${LOSS_RTOL:-0}
PY=${PYTHON:-$(command -v python3 || command -v python)}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

mkdir -p "$RESULTS"
rm -rf "${RESULTS:?}"/{rows.jsonl,losses.json,gpu_check.json,ddp,zero2,reload,zero3} "$RESULTS"/*.log
SCRATCH=$(mktemp -d "${SCRATCH_DIR:-${TMPDIR:-/tmp}}/gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
helper() { timeout -s KILL 120 "$PY" -m mindmirror.tools.gpu_check "$@"; }

[ "$CPU" = 1 ] || timeout -s KILL 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
plan=(--scratch "$SCRATCH" --model "$MODEL" --vocab_size "$VOCAB" --steps "$STEPS" --batch "$BATCH" --fill "$FILL"
      --input_len "$INPUT_LEN" --target_len "$TARGET_LEN" --eval_rows "$EVAL_ROWS" --test_rows "$TEST_ROWS"
      --max_disk_gb "$MAX_DISK_GB" --loss_rtol "$LOSS_RTOL")
[ "$CPU" = 1 ] && plan+=(--cpu)
helper plan "${plan[@]}" || { echo "gpu_check: the plan failed" >&2; exit 2; }
# shellcheck disable=SC1091  # BATCH DATA_DIR VALID_FRACTION ZERO2_JSON ZERO3_JSON, written by the plan
source "$SCRATCH/plan.env"

common=(--from_pretrained "$MODEL" --random_init --vocab_size "$VOCAB" --dataset svamp_tree1 --data_dir "$DATA_DIR"
        --cache_dir "$SCRATCH/cache" --batch_size "$BATCH" --lr 1e-4 --lr_scheduler constant --warmup_ratio 0
        --logging_steps "$LOG_EVERY" --eval_steps 0 --valid_fraction "$VALID_FRACTION" --max_eval_samples "$EVAL_ROWS"
        --max_test_samples "$TEST_ROWS" --max_input_length "$INPUT_LEN" --max_target_length "$TARGET_LEN"
        --gen_max_len "$GEN_LEN" --save_total_limit 1 --report_to none)
ddp=(--mixed_precision "$ddp_precision")
zero2=(--use_deepspeed --deepspeed_config_file "$ZERO2_JSON" --zero3_init_flag false)
zero3=(--use_deepspeed --deepspeed_config_file "$ZERO3_JSON" --zero3_init_flag false)

run() {  # run NAME LIMIT_S SKIP_REASON ACCELERATE_FLAGS... -- TRAINER_FLAGS...: one run, then its row
  local name=$1 limit=$2 skip=$3 rc=0 start=$SECONDS acc=()
  shift 3
  while [ "$1" != "--" ]; do acc+=("$1"); shift; done
  shift
  local dir="$SCRATCH/runs/$name" left=$((TOTAL_S - SECONDS - 15))  # 15 s for the rows and the verdict
  [ -z "$skip" ] && [ "$left" -lt 20 ] && skip="no time left in TOTAL_S=$TOTAL_S"
  [ "$left" -lt "$limit" ] && limit=$left
  if [ -z "$skip" ]; then  # (the braces keep bash's "Killed" notice of a run cut off at its limit off the console)
    { timeout -s KILL "$limit" "$PY" launch/accelerate_exec.py --num_machines 1 --num_processes 1 --dynamo_backend no \
        --main_process_port "$("$PY" -c 'from mindmirror.tools.launching import free_port; print(free_port())')" \
        "${acc[@]}" --module mindmirror.tools.gpu_check train --syncs "$SCRATCH/syncs/$name.json" \
        "${common[@]}" "$@" --output_dir "$dir" > "$RESULTS/$name.log" 2>&1
      rc=$?; } 2>/dev/null
  fi
  helper row --plan "$SCRATCH/plan.json" --results "$RESULTS" --name "$name" --run "$dir" --rc "$rc" \
    --seconds $((SECONDS - start)) --limit "$limit" --skipped "$skip" --console "$RESULTS/$name.log" \
    --syncs "$SCRATCH/syncs/$name.json"
}

run ddp "$RUN_S" "" "${ddp[@]}" -- --max_steps "$STEPS"
rm -rf "$SCRATCH/runs/ddp"
run zero2 "$RUN_S" "" "${zero2[@]}" -- --max_steps "$STEPS"
rm -rf "$SCRATCH/runs/zero2/checkpoints" "$SCRATCH/runs/zero2/final"  # best/ waits for the reload
export_dir="$SCRATCH/runs/zero2/best" skip=""
[ -d "$export_dir" ] || skip="the zero2 run left no best/ export"
run reload "$RELOAD_S" "$skip" "${ddp[@]}" -- --max_steps "$RELOAD_STEPS" --init_from "$export_dir"
rm -rf "$SCRATCH/runs/reload" "$SCRATCH/runs/zero2"
run zero3 "$RUN_S" "" "${zero3[@]}" -- --max_steps "$STEPS"
rm -rf "$SCRATCH/runs/zero3"
helper judge --plan "$SCRATCH/plan.json" --results "$RESULTS"
