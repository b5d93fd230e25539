"""``mindmirror-scaling``: a scaling study over model size x ZeRO stage x precision x micro-batch x world size.

Every point is a real short training run of ``train/main.py`` through ``accelerate launch``. Per point
the study records the parameter count, step time, tokens/s, samples/s, model FLOP/s and MFU (model
FLOPs from :mod:`mindmirror.core.flops`, against the device's peak: detected on known GPUs, or
``--peak_tflops`` / ``MINDMIRROR_PEAK_FLOPS``), the peak memory of every rank (CUDA max allocated on
GPU, peak RSS on CPU) beside the analytic estimate, and a status: ``ok``, ``out of memory`` or
``failed`` with the reason. A failing point never stops the sweep. Results go to ``results.jsonl``
as each point finishes; a restarted sweep skips the points already there (``--retry_failed`` runs the
failed ones again). ``results.csv``, ``results.md`` and two plots (throughput and memory against
size, one line per ZeRO stage) are rewritten after every point.

``--dry_run`` runs nothing: it prints the plan with the memory estimate per rank, and for each size
and ZeRO stage the fewest GPUs of ``--device_memory_gb`` that fit it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mindmirror import runfiles
from mindmirror.core.flops import PEAK_FLOPS_ENV
from mindmirror.model import SIZES, model_config
from mindmirror.tools import estimate
from mindmirror.tools.launching import LAUNCH_LOG, REPO, TRAIN_SCRIPT, failure_reason, local_launch, log_tail

DS_CONFIGS = REPO / "ds_configs"
ZERO_VARIANTS = ("0", "1", "2", "3", "2+offload", "3+offload")
COLUMNS = ("point", "model", "parameters", "zero", "precision", "micro_batch", "world_size", "status", "reason",
           "step_s", "tokens_per_s", "samples_per_s", "model_tflops_per_s", "mfu", "peak_mem_mb",
           "mem_before_model_mb", "est_mem_mb")


@dataclass(frozen=True)
class Point:
    model: str
    zero: str  # one of ZERO_VARIANTS
    precision: str  # fp32 | bf16
    micro_batch: int
    world_size: int

    @property
    def name(self) -> str:
        zero = self.zero.replace("+offload", "off")
        return f"{self.model}_z{zero}_{self.precision}_mb{self.micro_batch}_w{self.world_size}"

    @property
    def stage(self) -> int:
        return int(self.zero[0])

    @property
    def offload(self) -> bool:
        return self.zero.endswith("+offload")


def plan(args) -> list[Point]:
    points = [Point(*values) for values in itertools.product(args.sizes, args.zero, args.precision, args.micro_batch,
                                                              args.world_size)]
    # ZeRO partitions nothing at world size 1 beyond stage 0, but the points still run (and say so):
    # they measure DeepSpeed's own overhead.
    return points


# ---------------------------------------------------------------------------------------------
# estimates


def parameters(p: Point, args) -> int:
    return estimate.parameter_count(model_config(p.model, args.vocab_size))


def estimate_point(p: Point, args) -> estimate.MemoryEstimate:
    config = model_config(p.model, args.vocab_size)
    return estimate.memory_per_rank(config, p.stage, p.world_size, p.offload, p.precision, p.micro_batch,
                                    args.enc_len, args.dec_len, gradient_checkpointing=args.gradient_checkpointing)


def dry_run(points: list[Point], args) -> str:
    gb = args.device_memory_gb
    lines = [f"plan: {len(points)} point(s), {args.steps} steps each; estimates per rank for encoder {args.enc_len} "
             f"/ decoder {args.dec_len} tokens per task, both tasks" +
             (", gradient checkpointing" if args.gradient_checkpointing else "") +
             "; total = params + grads + optimizer + the larger of buffers + activations and what is alive "
             "after the backward (GiB; mindmirror.tools.estimate.memory_per_rank names every term)", ""]
    header = ["point", "parameters", "params", "grads", "optimizer", "buffers", "activations", "after backward",
              "total GiB", "on host GiB"] + ([f"fits {gb:g} GB"] if gb else [])
    rows = []
    for p in points:
        e = estimate_point(p, args)
        g = e.gib()
        figures = [f"{g[k]:.2f}" for k in ("params", "grads", "optimizer", "buffers", "activations", "late", "total")]
        fits = ["yes" if estimate.plan_fits(e, gb * 1e9) else "no"] if gb else []
        rows.append([p.name, f"{parameters(p, args) / 1e6:.1f}M", *figures, f"{e.cpu_offloaded / 2 ** 30:.2f}", *fits])
    lines.append(runfiles.markdown_table(header, rows))
    if gb:
        fewest = [[size, *(fewest_gpus(size, z, gb, args) for z in ZERO_VARIANTS)] for size in args.sizes]
        lines += ["", f"fewest GPUs of {gb:g} GB per size and ZeRO stage ({args.precision[0]}, micro-batch "
                      f"{args.micro_batch[0]}):", "",
                  runfiles.markdown_table(["model", *(f"ZeRO-{z}" for z in ZERO_VARIANTS)], fewest)]
    return "\n".join(lines)


def fewest_gpus(size: str, z: str, gb: float, args) -> str:
    """The fewest GPUs of ``gb`` GB that fit ``size`` with ZeRO variant ``z`` (the dry run's second table)."""
    n = estimate.smallest_world_size(model_config(size, args.vocab_size), int(z[0]), z.endswith("offload"),
                                     args.precision[0], int(gb * 1e9), micro_batch=args.micro_batch[0],
                                     enc_len=args.enc_len, dec_len=args.dec_len,
                                     gradient_checkpointing=args.gradient_checkpointing)
    return "does not fit" if n is None else str(n)


# ---------------------------------------------------------------------------------------------
# running one point


def deepspeed_json(p: Point, folder: Path) -> Path:
    name = f"zero{p.stage}_offload" if p.offload else f"zero{p.stage}"
    config = json.loads((DS_CONFIGS / f"{name}.json").read_text())
    config["bf16"] = {"enabled": p.precision == "bf16"}
    path = folder / "deepspeed.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def command(p: Point, args, out: Path) -> tuple[list[str], dict]:
    cmd, env = local_launch(p.world_size)
    if p.stage > 0 or p.offload:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_json(p, out)), "--zero3_init_flag",
                "true" if p.stage == 3 else "false"]
    else:
        cmd += ["--mixed_precision", "bf16" if p.precision == "bf16" else "no"]
        if p.world_size > 1:
            cmd += ["--multi_gpu"]
            if not args.gpu:
                env["ACCELERATE_USE_CPU"] = "true"  # --multi_gpu + this = DDP over gloo on CPU
    cmd += [str(TRAIN_SCRIPT), "--from_pretrained", p.model, "--batch_size", str(p.micro_batch),
            "--max_steps", str(args.steps), "--logging_steps", "1", "--eval_steps", "0", "--max_eval_samples", "8",
            "--max_test_samples", "8", "--gen_max_len", "8", "--report_to", "none", "--lr_scheduler", "constant",
            "--warmup_ratio", "0", "--output_dir", str(out / "run"), "--vocab_size", str(args.vocab_size)]
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    return cmd + args.train_args, env


def batch_problem(out: Path, p: Point) -> str | None:
    """Why a finished run did not measure its point: the trainer lowers a micro-batch that the training data
    cannot fill (so small data sets train), which would record another point under this one's name."""
    summary = runfiles.finished_summary(out / "run")
    if summary is None:
        return None  # measure() reports an unreadable summary
    used = summary.get("batch_size", p.micro_batch)
    if used == p.micro_batch:
        return None
    return (f"error: micro-batch {p.micro_batch} x {p.world_size} process(es) is larger than the "
            f"{summary['rows']['train']} training rows (the trainer ran micro-batch {used}): not this point")


def measure(out: Path, p: Point, warmup: int) -> dict:
    """Figures of a finished run from its metrics.jsonl and summary.json (the first steps left out)."""
    records = [json.loads(line) for line in (out / "run" / runfiles.METRICS).read_text().splitlines()]
    steps = [r for r in records if "samples_per_s" in r]
    timed = steps[warmup:] or steps
    global_batch = p.micro_batch * p.world_size
    step_times = [global_batch / r["samples_per_s"] for r in timed]
    total = sum(step_times)
    tokens = sum(r["tokens_per_s"] * t for r, t in zip(timed, step_times, strict=True))
    flops = sum(r["model_flops_per_s"] * t for r, t in zip(timed, step_times, strict=True))
    summary = runfiles.read_summary(out / "run")
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    return {"step_s": statistics.median(step_times), "tokens_per_s": tokens / total,
            "samples_per_s": global_batch * len(timed) / total, "model_tflops_per_s": flops / total / 1e12,
            "mfu": statistics.mean(mfu) if mfu else None,
            "peak_mem_mb": max(summary.get("peak_mem_mb_per_rank") or [steps[-1]["peak_mem_mb"]]),
            "mem_before_model_mb": summary.get("peak_mem_mb_before_model"),
            "peak_mem_mb_per_rank": summary.get("peak_mem_mb_per_rank")}


def run_point(p: Point, args, root: Path, e: estimate.MemoryEstimate) -> dict:
    """Run one point (``e``: its memory estimate) and return its record."""
    out = root / "points" / p.name
    out.mkdir(parents=True, exist_ok=True)
    # A point measures one fresh run: a retried point's earlier run (its metrics, any checkpoints kept
    # with --keep_checkpoints) goes first; the trainer would refuse to start over them.
    shutil.rmtree(out / "run", ignore_errors=True)
    result = {"point": p.name, **asdict(p), "parameters": parameters(p, args), "est_mem_mb": e.total / 2 ** 20,
              "est_breakdown_mb": {k: v * 1024 for k, v in e.gib().items()}}
    cmd, env = command(p, args, out)
    if args.peak_tflops:
        env[PEAK_FLOPS_ENV] = str(args.peak_tflops * 1e12)
    t0 = time.time()
    with open(out / LAUNCH_LOG, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=out)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    result["wall_s"] = time.time() - t0
    if not args.keep_checkpoints:  # a point's figures are in its metrics; its weights are not needed
        for heavy in (runfiles.CHECKPOINTS, runfiles.BEST, runfiles.FINAL):
            shutil.rmtree(out / "run" / heavy, ignore_errors=True)
    text = log_tail(out / LAUNCH_LOG)
    if returncode is None:
        result.update(status="failed", reason=f"timed out after {args.timeout} s")
    elif returncode != 0:
        status, reason = failure_reason(returncode, text)
        result.update(status=status, reason=reason)
    elif (problem := batch_problem(out, p)) is not None:
        result.update(status="failed", reason=problem)
    else:
        try:
            result.update(status="ok", reason="", **measure(out, p, args.warmup_steps))
        except (OSError, ValueError, KeyError, ZeroDivisionError) as err:
            result.update(status="failed", reason=f"finished but its metrics could not be read: {err}")
    return result


# ---------------------------------------------------------------------------------------------
# outputs


def load_results(path: Path) -> dict[str, dict]:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                results[record["point"]] = record
    return results


def fmt(value, digits=2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


def write_outputs(results: list[dict], root: Path) -> None:
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    header = ["model", "params", "ZeRO", "prec", "micro-batch", "ranks", "status", "step s", "tokens/s", "samples/s",
              "TFLOP/s", "MFU", "peak MB/rank", "of it before the model", "estimate MB/rank"]
    rows = []
    for r in results:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        rows.append([r["model"], f"{r['parameters'] / 1e6:.1f}M", r["zero"], r["precision"], r["micro_batch"],
                     r["world_size"], status.replace("|", "/"), fmt(r.get("step_s")), fmt(r.get("tokens_per_s"), 0),
                     fmt(r.get("samples_per_s")), fmt(r.get("model_tflops_per_s"), 4), mfu,
                     fmt(r.get("peak_mem_mb"), 0), fmt(r.get("mem_before_model_mb"), 0), fmt(r.get("est_mem_mb"), 0)])
    (root / "results.md").write_text(runfiles.markdown_table(header, rows) + "\n")
    plot(results, root)


def plot(results: list[dict], root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    for key, label, name in (("tokens_per_s", "tokens/s (all ranks)", "throughput.png"),
                             ("peak_mem_mb", "peak memory per rank (MB)", "memory.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[str, list[dict]] = {}
        for r in ok:
            lines.setdefault(f"ZeRO-{r['zero']} {r['precision']} mb{r['micro_batch']} x{r['world_size']}", []).append(r)
        for line_label, rows in sorted(lines.items()):
            rows.sort(key=lambda r: r["parameters"])
            ax.plot([r["parameters"] for r in rows], [r[key] for r in rows], marker="o", label=line_label)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.set_title(f"{label} against model size")
        if lines:
            ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / name, dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    def csv_list(kind):
        return lambda text: [kind(x) for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(prog="mindmirror-scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=csv_list(str), default=["tiny", "t5-v1_1-small"], help=f"from {', '.join(SIZES)}")
    p.add_argument("--zero", type=csv_list(str), default=["0", "2", "3"], help=f"from {', '.join(ZERO_VARIANTS)}")
    p.add_argument("--precision", type=csv_list(str), default=None,
                   help="fp32,bf16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--micro_batch", type=csv_list(int), default=[8])
    p.add_argument("--world_size", type=csv_list(int), default=[1])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per point")
    p.add_argument("--warmup_steps", type=int, default=2, help="first steps left out of the figures")
    p.add_argument("--output_dir", default="scaling", help="where results and per-point runs go")
    p.add_argument("--vocab_size", type=int, default=32128, help="embedding rows (32128: the published t5-v1_1)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--timeout", type=int, default=3600, help="seconds before a point is stopped and marked failed")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (default: detected GPU)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each point's checkpoints and exports")
    p.add_argument("--retry_failed", action="store_true", help="run recorded failed / out-of-memory points again")
    p.add_argument("--dry_run", action="store_true", help="print the plan and memory estimates; run nothing")
    p.add_argument("--device_memory_gb", type=float, default=0.0,
                   help="GPU memory for the dry run's fit check (default: this machine's GPU, if any)")
    p.add_argument("--enc_len", type=int, default=64, help="encoder tokens per task for the estimates")
    p.add_argument("--dec_len", type=int, default=64, help="decoder tokens per task for the estimates")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more train/main.py flags for every point")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    import torch

    args.gpu = torch.cuda.is_available()
    args.precision = args.precision or (["bf16"] if args.gpu else ["fp32"])
    if not args.device_memory_gb and args.gpu:
        args.device_memory_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    for size in args.sizes:
        if size not in SIZES:
            p.error(f"--sizes: {size!r} is not one of {', '.join(SIZES)}")
    for z in args.zero:
        if z not in ZERO_VARIANTS:
            p.error(f"--zero: {z!r} is not one of {', '.join(ZERO_VARIANTS)}")
    for prec in args.precision:
        if prec not in ("fp32", "bf16"):
            p.error(f"--precision: {prec!r} is not fp32 or bf16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    points = plan(args)
    if args.dry_run:
        print(dry_run(points, args))
        return 0
    root = Path(args.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results_file = root / "results.jsonl"
    done = load_results(results_file)
    todo = [p for p in points if p.name not in done or (args.retry_failed and done[p.name]["status"] != "ok")]
    print(f"scaling study: {len(points)} point(s), {len(points) - len(todo)} already done, {len(todo)} to run "
          f"-> {root}", flush=True)
    for i, p in enumerate(todo, 1):
        e = estimate_point(p, args)
        print(f"[{i}/{len(todo)}] {p.name}: estimate {e.total / 2 ** 20:.0f} MB per rank ...", end=" ", flush=True)
        result = run_point(p, args, root, e)
        with open(results_file, "a") as f:
            f.write(json.dumps(result) + "\n")
        done[p.name] = result
        if result["status"] == "ok":
            print(f"ok: {result['step_s']:.2f} s/step, {result['tokens_per_s']:.0f} tokens/s, peak "
                  f"{result['peak_mem_mb']:.0f} MB per rank ({result['wall_s']:.0f} s)", flush=True)
        else:
            print(f"{result['status']}: {result['reason']}", flush=True)
        write_outputs([done[q.name] for q in points if q.name in done], root)
    write_outputs([done[q.name] for q in points if q.name in done], root)
    print((root / "results.md").read_text())
    failed = sum(done[q.name]["status"] != "ok" for q in points)
    print(f"{len(points) - failed} ok, {failed} not; table: {root / 'results.md'}, plots: {root / 'throughput.png'}, "
          f"{root / 'memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
