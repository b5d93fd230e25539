"""The logic behind ``launch/gpu_check.sh``: the script only assembles and times the trainer's commands; this
module plans the check, writes its data, runs inside each trainer process, prints each run's row and judges.

  python -m mindmirror.tools.gpu_check plan  --scratch DIR ...  # batch, data, DeepSpeed JSONs: DIR/plan.json, plan.env
  python -m mindmirror.tools.gpu_check train --syncs FILE ...   # what accelerate launches: the trainer, counting syncs
  python -m mindmirror.tools.gpu_check row   --plan ... --name ddp --run DIR ...  # one run's row, as it ends
  python -m mindmirror.tools.gpu_check judge --plan ... --results DIR  # loss agreement, the reload's float32: PASS/FAIL

**plan** picks the micro-batch (the largest multiple of 8 whose memory plan,
:func:`mindmirror.tools.estimate.memory_per_rank`, fits ``--fill`` of the GPU in every layout, unless ``--batch`` is
given), writes a ``svamp_tree1`` data set in the tree-of-thought layout the trainer reads, whose inputs are longer
than ``--input_len`` tokens and whose CoT rationales are longer than ``--target_len`` (so truncation makes every row
exactly that long), refuses a model whose checkpoints and exports would not fit ``--max_disk_gb``, and, on CPU,
writes fp32 copies of the shipped DeepSpeed
JSONs (CPUs have no bf16 DeepSpeed path).

**train** is the trainer (:func:`mindmirror.cli.train_main`) with two additions that change nothing it computes:
on CUDA it counts the host syncs of every training step (``torch.cuda.set_sync_debug_mode("warn")`` from the first
step on, its warnings counted and swallowed, the count noted at each entry of ``Trainer.train_step``), and it dies
with its launcher (``PR_SET_PDEATHSIG``): ``timeout -s KILL`` kills a one-process DeepSpeed run's torchrun agent, whose
worker runs in a session of its own and would otherwise live on, holding the GPU.

**row** reads what the run left (``summary.json``, ``metrics.jsonl``, ``log.txt`` and the checkpoint's manifest, before
the script deletes them) and prints one Markdown row: tokens/s and MFU (median of the logging windows after the
first), the peak memory above the pre-model baseline against the planner's figure, the evaluation's and the
checkpoint save's seconds, host syncs per step (median; max), and the first and last logged loss. It keeps the
losses and the row in the results folder for **judge**.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from mindmirror import runfiles

LAYOUTS = {"ddp": 0, "zero2": 2, "zero3": 3}  # the runs whose losses must agree, and their ZeRO stages
RUNS = ("ddp", "zero2", "reload", "zero3")  # in the order the script runs them
ROWS, LOSSES = "rows.jsonl", "losses.json"  # in the results folder
SYNC_TEXT = "synchronizing CUDA operation"  # torch's sync-debug warning: "called a synchronizing CUDA operation"
# Tolerances of the loss agreement (relative, on each logged window's loss): bf16 rounding (8-bit mantissa, 2^-8 per
# operation) moves a loss by a few tenths of a percent and the trajectories drift a little over tens of steps; a
# wrong normalisation (by processes, micro-batches or tokens), a lost update or another initialisation moves it by
# far more. fp32 (the CPU mode) agrees to rounding.
LOSS_RTOL = {"bf16": 0.02, "fp32": 1e-4}
# Bytes per parameter on disk, worst moment of the check: a DDP run (fp32 weights) holds its checkpoint (weights 4 +
# Adam 8) and its two exports (4 + 4) while the ZeRO-2 run's best/ export waits for the reload run (2 in bf16, 4 in
# fp32); a ZeRO run holds its weights (2 or 4), fp32 master and Adam (12) and two exports.
DISK_BYTES_PER_PARAM = {"bf16": 22, "fp32": 24}
GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# plan


def _label_lengths(tokenizer, labels: list[str]) -> int:
    return max(len(tokenizer(label).input_ids) for label in labels)


def _filler(sentences: list[str], start: int, chars: int) -> str:
    """Whole sentences from ``sentences``, cyclically from ``start``, until there are at least ``chars``."""
    out, i = [], start
    while sum(len(s) + 1 for s in out) < chars:
        out.append(sentences[i % len(sentences)])
        i += 1
    return " ".join(out)


def long_problems(n_train: int, n_test: int, input_len: int, target_len: int, seed: int = 0) -> dict:
    """Synthetic SVAMP-style problems (:mod:`mindmirror.data.synthetic`) made long: each question is followed by
    other problems' statements, and each CoT is preceded by them, about 6 characters per wanted token (the
    bundled tokenizer gives about 3.7), so the trainer truncates every input to ``input_len`` and every rationale
    to ``target_len``. Gold labels stay the problem's equation."""
    from mindmirror.data import synthetic

    problems = synthetic.generate(seed=seed, n_train=n_train, n_test=n_test)
    everything = problems["train"] + problems["test"]
    statements = [s.strip() + "." for p in everything for s in p.body.split(".")
                  if s.strip() and "answer" not in s.lower()]
    long = {}
    for split, items in problems.items():
        long[split] = [dataclasses.replace(
            p, question=p.question + "\n" + _filler(statements, 7 * i + 1, 6 * input_len),
            cots=[_filler(statements, 7 * i + 3 + b, 6 * target_len) + " " + cot for b, cot in enumerate(p.cots)])
            for i, p in enumerate(items)]
    return long


def write_data(folder: Path, problems: dict) -> Path:
    """The ``svamp_tree1`` files of ``problems`` (ground truth and teacher records) under ``folder``."""
    from mindmirror.data import synthetic

    for rel, text in synthetic.dataset_files(problems).items():
        if rel.startswith("svamp_tree1/"):
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return folder


def fp32_deepspeed_json(name: str, out: Path) -> Path:
    """ds_configs/<name>.json with bf16 off (and, for ZeRO-3, every parameter partitioned), for CPU runs."""
    from mindmirror.tools.estimate import DS_CONFIGS

    config = json.loads((DS_CONFIGS / f"{name}.json").read_text())
    config["bf16"] = {"enabled": False}
    if config["zero_optimization"]["stage"] == 3:  # a tiny model stays whole below the persistence threshold
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def planned_bytes(config, stage: int, precision: str, batch: int, input_len: int, label_len: int,
                  target_len: int) -> int:
    """The planner's per-GPU figure for one process of this check (both tasks, as the trainer runs them)."""
    from mindmirror.tools import estimate

    return estimate.memory_per_rank(config, stage, 1, False, precision, batch, input_len, label_len,
                                    rationale_dec_len=target_len).total


def fitting_batch(config, precision: str, device_bytes: int, fill: float, lengths: tuple[int, int, int],
                  multiple: int = 8, most: int = 4096) -> int:
    """The largest multiple of ``multiple`` whose plan fits ``fill`` of the device in every layout (at least
    ``multiple``: the run then shows how far off it is)."""
    def fits(b):
        return all(planned_bytes(config, s, precision, b, *lengths) <= fill * device_bytes for s in LAYOUTS.values())

    batch = multiple
    while batch + multiple <= most and fits(batch + multiple):
        batch += multiple
    return batch


def plan(args) -> int:
    import torch

    from mindmirror.model import load_tokenizer, model_config

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu
    precision = "bf16" if cuda else "fp32"
    tokenizer = load_tokenizer("", args.model, True)
    config = model_config(args.model, args.vocab_size or len(tokenizer))
    from mindmirror.core.flops import peak_flops
    from mindmirror.tools.estimate import parameter_count

    parameters = parameter_count(config)
    disk = DISK_BYTES_PER_PARAM[precision] * parameters
    if not _disk_fits(args, parameters, disk, scratch):
        return 2

    multiple = 8 if cuda else 1  # the collator pads to a multiple of 8 on GPU
    label_len = _label_len(args, tokenizer, multiple)
    lengths = (args.input_len, label_len, args.target_len)
    device_name, device_bytes = "cpu", None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device_name, device_bytes = props.name, props.total_memory
    batch = args.batch or (fitting_batch(config, precision, device_bytes, args.fill, lengths) if cuda else 4)

    n_train = args.steps * batch + batch + args.eval_rows  # one spare batch: the carve-out may round up
    problems = long_problems(n_train, args.test_rows, args.input_len, args.target_len, seed=args.seed)
    data = write_data(scratch / "data", problems)
    if not _rows_long_enough(args, tokenizer, problems["train"][:16]):
        return 2

    ds = {"zero2": "ds_configs/zero2.json", "zero3": "ds_configs/zero3.json"}
    if not cuda:
        ds = {name: str(fp32_deepspeed_json(name, scratch / "ds")) for name in ds}
    figures = {name: planned_bytes(config, stage, precision, batch, *lengths) for name, stage in LAYOUTS.items()}
    figures["reload"] = figures["ddp"]
    record = {"model": args.model, "parameters": parameters, "vocab_size": config.vocab_size, "precision": precision,
              "device": device_name, "device_bytes": device_bytes, "peak_flops": peak_flops(None, precision)
              if cuda else None, "batch": batch, "steps": args.steps, "input_len": args.input_len,
              "label_len": label_len, "target_len": args.target_len, "planned_bytes": figures,
              "loss_rtol": args.loss_rtol or LOSS_RTOL[precision], "disk_bytes": disk, "cuda": cuda,
              "train_questions": n_train, "eval_rows": args.eval_rows, "test_rows": args.test_rows}
    (scratch / "plan.json").write_text(json.dumps(record, indent=2))
    env = {"BATCH": batch, "DATA_DIR": data, "VALID_FRACTION": f"{args.eval_rows / n_train:.8f}",
           "ZERO2_JSON": ds["zero2"], "ZERO3_JSON": ds["zero3"]}
    (scratch / "plan.env").write_text("".join(f"{k}={shlex.quote(str(v))}\n" for k, v in env.items()))
    _print_plan(args, record)
    return 0


def _disk_fits(args, parameters: int, disk: int, scratch: Path) -> bool:
    """Whether one run's checkpoint and exports (``disk`` bytes) fit ``--max_disk_gb`` and 90% of the free space
    under ``scratch``; if not, says so on stderr."""
    free = shutil.disk_usage(scratch).free
    if disk > args.max_disk_gb * 1e9 or disk > 0.9 * free:
        sys.stderr.write(f"gpu_check: {args.model} ({parameters / 1e6:.0f}M parameters) would need about "
                         f"{disk / 1e9:.1f} GB for one run's checkpoint and exports (the trainer always writes both), "
                         f"more than MAX_DISK_GB={args.max_disk_gb:g} or 90% of the {free / 1e9:.0f} GB free under "
                         f"{scratch}: choose a smaller MODEL or raise MAX_DISK_GB on a larger disk\n")
        return False
    return True


def _label_len(args, tokenizer, multiple: int) -> int:
    """The answers' length in tokens, from a sample of the problems' equations (short: the rationale carries the
    long target), at most ``--target_len``, rounded up to ``multiple``."""
    probe = long_problems(64, 0, 1, 1, seed=args.seed)["train"]
    label_len = min(args.target_len, _label_lengths(tokenizer, [p.equation for p in probe]) + 2)
    return -(-label_len // multiple) * multiple


def _rows_long_enough(args, tokenizer, sample: list) -> bool:
    """Whether every row of ``sample`` is longer than ``--input_len`` and ``--target_len`` tokens, so that truncation
    makes it exactly that long; if not, says so on stderr."""
    input_tokens = min(len(tokenizer("predict: " + p.input).input_ids) for p in sample)
    rationale_tokens = min(len(tokenizer(p.cots[0]).input_ids) for p in sample)
    if input_tokens < args.input_len or rationale_tokens < args.target_len:
        sys.stderr.write(f"gpu_check: the generated rows are too short ({input_tokens} input and {rationale_tokens} "
                         f"rationale tokens, wanted {args.input_len} and {args.target_len})\n")
        return False
    return True


def _print_plan(args, record: dict) -> None:
    """The plan's lines above the rows: the device and library versions, the model, batch and lengths, the
    planner's figures, then the table's header."""
    from importlib.metadata import version

    device_name, device_bytes, cuda = record["device"], record["device_bytes"], record["cuda"]
    parameters, disk, figures = record["parameters"], record["disk_bytes"], record["planned_bytes"]
    print(f"gpu_check: {device_name}" + (f", {device_bytes / GIB:.1f} GiB" if device_bytes else "") + "; " +
          ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "accelerate", "deepspeed")))
    print(f"gpu_check: {args.model} ({parameters / 1e6:.1f}M parameters, vocabulary {record['vocab_size']}), "
          f"{record['precision']}, micro-batch {record['batch']} questions "
          f"({'given' if args.batch else f'the planner at {args.fill:.0%} of the GPU'}"
          f"{'' if cuda else ', CPU'}), {args.steps} steps; rows of {args.input_len} input tokens, "
          f"{record['label_len']}-token answers, {args.target_len}-token rationales; {record['train_questions']} "
          f"training questions; disk at most ~{disk / 1e9:.1f} GB at a time")
    print("gpu_check: planner per GPU: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in figures.items()
                                                      if k in LAYOUTS) +
          f"; a row's peak is the {'GPU memory allocated' if cuda else 'RSS'} above the pre-model baseline")
    print()
    print(HEADER)


# ---------------------------------------------------------------------------------------------
# train: the trainer, in the launched process


def _die_with_parent() -> None:
    """SIGKILL this process when the process that started it dies (Linux): under torchrun the trainer runs in a
    session of its own, so a ``timeout -s KILL`` of the launcher would leave it running."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def count_host_syncs(path: Path) -> None:
    """From the first training step on, count the host syncs (CUDA's sync-debug warnings) and write their running
    total at each entry of ``Trainer.train_step`` to ``path``: the differences are the syncs of each loop iteration
    (collation, the agreement, the step, and the log, evaluation and save when due)."""
    record = {"available": False, "reason": "", "at_step_start": []}

    def dump():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))

    import torch

    from mindmirror.core import loop

    trainer = getattr(loop, "Trainer", None)
    step = getattr(trainer, "train_step", None)
    if not torch.cuda.is_available():
        record["reason"] = "no CUDA: torch.cuda.set_sync_debug_mode counts CUDA syncs only"
    elif step is None:
        record["reason"] = "mindmirror.core.loop.Trainer.train_step not found: no step boundary to count at"
    if record["reason"]:
        dump()
        return
    import functools
    import warnings

    count = [0]
    armed = []

    def arm():
        previous = warnings.showwarning  # logging's, once mindmirror.logs has captured warnings

        def show(message, category, filename, lineno, file=None, line=None):
            if SYNC_TEXT in str(message):
                count[0] += 1
                return
            previous(message, category, filename, lineno, file, line)

        warnings.filterwarnings("always", message=f".*{SYNC_TEXT}")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        record["available"] = True
        armed.append(True)

    @functools.wraps(step)
    def counted(self, *args, **kwargs):
        if not armed:
            arm()
        record["at_step_start"].append(count[0])
        dump()
        return step(self, *args, **kwargs)

    trainer.train_step = counted


def train(argv: list[str]) -> int:
    """``train [--syncs FILE] TRAINER FLAGS``: the trainer's flags are passed on untouched."""
    syncs, rest = (argv[1], argv[2:]) if argv[:1] == ["--syncs"] and len(argv) > 1 else ("", argv)
    _die_with_parent()
    if syncs:
        try:
            count_host_syncs(Path(syncs))
        except Exception as e:  # counting is a measurement: never the reason a run fails
            Path(syncs).write_text(json.dumps({"available": False, "reason": f"{type(e).__name__}: {e}"}))
    from mindmirror.cli import train_main

    return train_main(rest)


# ---------------------------------------------------------------------------------------------
# row

COLUMNS = ("run", "status", "steps", "tokens/s", "MFU", "peak / plan (GiB)", "eval s", "save s", "host syncs/step",
           "loss first → last", "wall s")
HEADER = runfiles.markdown_table(COLUMNS, [])  # printed once by plan; each run's row prints its own line


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line cut by a kill
            out.append(json.loads(line))
    return out


def _median_after_first(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


_SAVE_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*Saving current state to .*\.tmp-step_(\d+)\s*$")


def save_seconds(run: Path) -> float | None:
    """Seconds of the newest checkpoint save: from Accelerate's "Saving current state to .tmp-step_N" line in
    log.txt to the manifest, which the trainer writes last."""
    try:
        lines = (run / runfiles.LOG).read_text(errors="replace").splitlines()
    except OSError:
        return None
    started = {}
    for line in lines:
        m = _SAVE_START.match(line)
        if m:
            second = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            started[int(m.group(3))] = second + int(m.group(2)) / 1e3
    for step in sorted(started, reverse=True):  # mindmirror.core.checkpoint's names (not imported: it needs torch)
        manifest = run / "checkpoints" / f"step_{step}" / "manifest.json"
        if manifest.is_file():
            return manifest.stat().st_mtime - started[step]
    return None


def host_syncs(path: Path) -> tuple[str, dict]:
    """``"median (max N)"`` of the syncs per loop iteration, or why there is no figure."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "n/a", {"reason": "no count written"}
    marks = record.get("at_step_start", [])
    per_step = [b - a for a, b in itertools.pairwise(marks)]
    if not record.get("available") or not per_step:
        return "n/a", {"reason": record.get("reason") or "fewer than two steps counted"}
    return f"{statistics.median(per_step):g} (max {max(per_step)})", {"per_step": per_step}


def export_dtype(folder: Path) -> str | None:
    """The dtype of the first tensor of an export's (first) safetensors file, read from its header."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    with open(files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return next((v["dtype"] for k, v in header.items() if k != "__metadata__"), None)


def _status(rc: int, console: Path, summary: dict | None, limit: int | None, skipped: str = "") -> str:
    if skipped:
        return f"skipped: {skipped}"
    if rc == 0 and summary is not None:
        return "ok"
    if rc in (124, 137):
        return f"killed at the {limit} s limit" if limit else "killed at its time limit"
    from mindmirror.tools.launching import failure_reason

    try:
        text = console.read_text(errors="replace")[-20000:]
    except OSError:
        text = ""
    status, reason = failure_reason(rc, text)
    return f"{status} (exit {rc}): {reason[:160]}"


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def row(args) -> int:
    plan_record = json.loads(Path(args.plan).read_text())
    results, run = Path(args.results), Path(args.run)
    results.mkdir(parents=True, exist_ok=True)
    summary = runfiles.finished_summary(run)
    metrics = _read_jsonl(run / runfiles.METRICS)
    train = [m for m in metrics if "loss" in m and m.get("split", "train") == "train"]
    valid = [m for m in metrics if m.get("split") == "valid"]
    tokens = _median_after_first([m.get("tokens_per_s") for m in train])
    mfu = _median_after_first([m.get("mfu") for m in train])
    planned = plan_record["planned_bytes"].get(args.name)
    if summary is not None:
        peak = (max(summary["peak_mem_mb_per_rank"]) - summary.get("peak_mem_mb_before_model", 0.0)) * 2 ** 20
    else:
        peak = max((m["peak_mem_mb"] for m in train if "peak_mem_mb" in m), default=None)
        peak = None if peak is None else peak * 2 ** 20
    eval_s = sum(m["eval_s"] for m in valid if "eval_s" in m) if valid else None
    save_s = save_seconds(run)
    syncs, sync_detail = host_syncs(Path(args.syncs)) if args.syncs else ("n/a", {"reason": "not counted"})
    losses = [(m["step"], m["loss"]) for m in train]
    steps = summary["final_step"] if summary else (train[-1]["step"] if train else 0)
    status = _status(args.rc, Path(args.console), summary, args.limit, args.skipped)
    memory = "n/a"
    if peak is not None:  # * : a run cut off before summary.json: the log's peak, no baseline subtracted
        memory = f"{peak / GIB:.2f}{'' if summary else '*'} / " + \
            (f"{planned / GIB:.2f} ({peak / planned:.2f})" if planned else "n/a")
    loss = f"{losses[0][1]:.4f} → {losses[-1][1]:.4f}" if losses else "n/a"
    print(runfiles.markdown_row([args.name, status, steps, _fmt(tokens, ',.0f'), _fmt(mfu, '.1%'), memory,
                                 _fmt(eval_s, '.1f'), _fmt(save_s, '.1f'), syncs, loss, args.seconds]), flush=True)

    extra = {}
    if summary is not None:
        extra["param_dtype"] = summary.get("param_dtype")
        extra["init_from"] = summary.get("init_from")
    if (run / "best").is_dir():
        extra["export_dtype"] = export_dtype(run / "best")
    record = {"run": args.name, "status": status, "rc": args.rc, "steps": steps, "tokens_per_s": tokens, "mfu": mfu,
              "peak_bytes_above_baseline": peak, "planned_bytes": planned, "eval_s": eval_s, "save_s": save_s,
              "host_syncs": sync_detail, "wall_s": args.seconds, "peak_is": "GPU allocated" if plan_record["cuda"]
              else "RSS", **extra}
    with open(results / ROWS, "a") as f:
        f.write(json.dumps(record) + "\n")
    stored = _load_losses(results)
    stored[args.name] = losses
    (results / LOSSES).write_text(json.dumps(stored, indent=1))
    kept = results / args.name  # the run's small files, for reading after its folder is gone
    kept.mkdir(exist_ok=True)
    for name in (runfiles.SUMMARY, runfiles.METRICS, runfiles.LOG, runfiles.CONFIG):
        if (run / name).is_file():
            shutil.copy2(run / name, kept / name)
    return 0


def _load_losses(results: Path) -> dict:
    try:
        return json.loads((results / LOSSES).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# judge


def compare_losses(losses: dict, rtol: float) -> list[tuple[str, bool, str]]:
    """Each pair of layouts: whether every logged loss agrees to ``rtol`` (relative), and how far apart they are."""
    checks = []
    names = list(LAYOUTS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            la, lb = dict(map(tuple, losses.get(a, []))), dict(map(tuple, losses.get(b, [])))
            if not la or not lb:
                missing = " and ".join(n for n, lx in ((a, la), (b, lb)) if not lx)
                checks.append((f"losses {a} vs {b}", False, f"no logged losses from {missing}"))
                continue
            common = sorted(set(la) & set(lb))
            if not common or set(la) != set(lb):
                checks.append((f"losses {a} vs {b}", False, f"logged steps differ: {sorted(la)} vs {sorted(lb)}"))
                continue
            worst = max(common, key=lambda s: abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-12))
            rel = abs(la[worst] - lb[worst]) / max(abs(lb[worst]), 1e-12)
            checks.append((f"losses {a} vs {b}", rel <= rtol,
                           f"{len(common)} logged steps, largest relative difference {rel:.2e} at step {worst} "
                           f"({la[worst]:.5f} vs {lb[worst]:.5f}; tolerance {rtol:g})"))
    return checks


def judge(args) -> int:
    results = Path(args.results)
    plan_record = json.loads(Path(args.plan).read_text())
    rows = {r["run"]: r for r in _read_jsonl(results / ROWS)}
    checks = [(f"run {name}", rows.get(name, {}).get("status") == "ok", rows.get(name, {}).get("status", "not run"))
              for name in RUNS]
    checks += compare_losses(_load_losses(results), plan_record["loss_rtol"])
    reload, zero2 = rows.get("reload", {}), rows.get("zero2", {})
    checks.append(("reload float32", reload.get("param_dtype") == "float32",
                   f"the ZeRO-2 export ({zero2.get('export_dtype') or 'dtype unknown'}) reloaded as "
                   f"{reload.get('param_dtype') or 'nothing (no summary)'} master weights"))
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    missing = [r for r in rows.values() if r.get("host_syncs", {}).get("reason") and r["steps"]]
    if missing:
        print(f"note: host syncs per step not measured ({missing[0]['host_syncs']['reason']})")
    passed = all(ok for _, ok, _ in checks)
    (results / "gpu_check.json").write_text(json.dumps(
        {"plan": plan_record, "rows": list(rows.values()), "checks": [
            {"check": n, "pass": ok, "detail": d} for n, ok, d in checks], "pass": passed}, indent=2))
    print(f"gpu_check: {'PASS' if passed else 'FAIL'} (figures in {results / 'gpu_check.json'})")
    return 0 if passed else 1


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the trainer's own flags follow: not parsed here
        return train(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m mindmirror.tools.gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="choose the batch, write the data and plan.json/plan.env")
    p.add_argument("--scratch", required=True)
    p.add_argument("--model", default="t5-v1_1-base")
    p.add_argument("--vocab_size", type=int, default=32128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=0, help="micro-batch in questions; 0: the planner's fit")
    p.add_argument("--fill", type=float, default=0.8, help="share of the GPU's memory the planned batch may use")
    p.add_argument("--input_len", type=int, default=512)
    p.add_argument("--target_len", type=int, default=128)
    p.add_argument("--eval_rows", type=int, default=192)
    p.add_argument("--test_rows", type=int, default=96)
    p.add_argument("--max_disk_gb", type=float, default=15.0)
    p.add_argument("--loss_rtol", type=float, default=0.0, help="0: 0.02 in bf16, 1e-4 in fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    r = sub.add_parser("row", help="print and keep one run's row")
    r.add_argument("--plan", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--run", required=True)
    r.add_argument("--rc", type=int, required=True, help="the run's exit code")
    r.add_argument("--skipped", default="", help="why the run was not started (empty: it was)")
    r.add_argument("--seconds", type=int, default=0)
    r.add_argument("--limit", type=int, default=0)
    r.add_argument("--console", default="")
    r.add_argument("--syncs", default="")
    j = sub.add_parser("judge", help="loss agreement and the reload's float32: PASS/FAIL")
    j.add_argument("--plan", required=True)
    j.add_argument("--results", required=True)
    args = parser.parse_args(argv)
    return {"plan": plan, "row": row, "judge": judge}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
