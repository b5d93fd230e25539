"""``mindmirror-databench``: what the data path costs as a data set grows, per rank.

For each size it writes a scaled copy of the bundled self-evaluation data (``svamp_tree2``: 25 rows a
question, the kind of set that grows largest; its teacher records repeated until the training split holds
that many rows), then runs the trainer for one optimizer step through ``accelerate launch``, twice: with an
empty tokenized-data cache (cold: parse, build, tokenize, write the Arrow tables) and again (warm: map the
tables). It prints, per rank, the seconds from process start to the end of the first step and the peak RSS
then, and each size's peak against the smallest size's.

    mindmirror-databench --rows 10000,100000,1000000 --nproc 2 --output databench.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mindmirror import runfiles
from mindmirror.data.registry import BUNDLED_DATA_DIR, SELF_EVAL
from mindmirror.tools.launching import TRAIN_SCRIPT, local_launch

ROWS_PER_QUESTION = 25  # 5 CoTs x 5 self-evaluations, with --num_train_branches 5
CHUNK = 5000  # teacher records per chunk file
VALID_FRACTION = 0.001


def write_scaled_data(root: Path, rows: int) -> Path:
    """``root/svamp_tree2/llm/{train,test}_CoT_k.json`` with enough repeated teacher records for ``rows`` training
    rows (after the validation carve). Written once per size; reused when present."""
    folder = root / "svamp_tree2" / "llm"
    done = folder / ".complete"
    if done.is_file():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    source = BUNDLED_DATA_DIR / "svamp_tree2" / "llm"
    with gzip.open(source / "train_CoT_0.json.gz", "rt", encoding="utf-8") as f:
        records = json.load(f)
    questions = math.ceil(rows / ROWS_PER_QUESTION / (1 - VALID_FRACTION))
    for k, start in enumerate(range(0, questions, CHUNK)):
        rows_of_chunk = range(start, min(questions, start + CHUNK))
        part = [dict(records[i % len(records)], idx=j) for j, i in enumerate(rows_of_chunk)]
        (folder / f"train_CoT_{k}.json").write_text(json.dumps(part))
    with gzip.open(source / "test_CoT_0.json.gz", "rt", encoding="utf-8") as f:
        (folder / "test_CoT_0.json").write_text(f.read())
    done.touch()
    return root


def launch(data_dir: Path, cache: Path, out: Path, nproc: int) -> dict:
    """One trainer run of a single optimizer step; returns its ``summary.json``."""
    cmd, env = local_launch(nproc)
    cmd += (["--multi_gpu"] if nproc > 1 else ["--mixed_precision", "no"]) + \
        [str(TRAIN_SCRIPT), "--data_dir", str(data_dir),
           "--dataset", "svamp_tree2", "--model_type", SELF_EVAL, "--num_train_branches", "5",
           "--valid_fraction", str(VALID_FRACTION), "--max_steps", "1", "--batch_size", "8",
           "--max_eval_samples", "8", "--max_test_samples", "8", "--gen_max_len", "4", "--report_to", "none",
           "--max_input_length", "256", "--max_target_length", "128", "--output_dir", str(out)]
    env.update(MINDMIRROR_CACHE=str(cache), PYTHONWARNINGS="ignore")
    if nproc > 1:
        env["ACCELERATE_USE_CPU"] = "true"  # --multi_gpu with this gives CPU DDP (gloo)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the trainer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return runfiles.read_summary(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mindmirror-databench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", default="10000,100000,1000000", help="training-row counts, comma-separated")
    p.add_argument("--nproc", type=int, default=2, help="trainer processes (ranks)")
    p.add_argument("--workdir", default="", help="where the scaled data and caches go (default: a temporary folder)")
    p.add_argument("--output", default="", help="write the figures as JSON here")
    return p.parse_args(argv)


def run(argv=None) -> list[dict]:
    """Run the benchmark; returns one record per size and cache state."""
    args = parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="mindmirror-databench-") as tmp:
        work = Path(args.workdir or tmp)
        for rows in sizes:
            data_dir = write_scaled_data(work / f"data-{rows}", rows)
            cache = work / f"cache-{rows}-{os.getpid()}"
            for state in ("cold", "warm"):
                summary = launch(data_dir, cache, work / f"run-{rows}-{state}-{os.getpid()}", args.nproc)
                record = {"rows": summary["rows"]["train"], "target_rows": rows, "cache": state,
                          "from_cache": summary["data"]["from_cache"], "load_s": summary["data"]["load_s"],
                          "first_step_s": summary["first_step_s_per_rank"],
                          "peak_rss_mb": summary["peak_mem_mb_first_step_per_rank"]}
                results.append(record)
                print(f"{record['rows']:>9,} rows  {state}: first step after "
                      f"{', '.join(f'{s:.1f}' for s in record['first_step_s'])} s; peak RSS "
                      f"{', '.join(f'{m:,.0f}' for m in record['peak_rss_mb'])} MB (per rank)", flush=True)
    print("\n" + table(results), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


def table(results: list[dict]) -> str:
    """A markdown table: per size and cache state, the worst rank's time to the first step and peak RSS, and the
    peak above the smallest size's (same cache state)."""
    smallest = {r["cache"]: max(r["peak_rss_mb"]) for r in results if r["target_rows"] == results[0]["target_rows"]}
    header = ["training rows", "cache", "to first step (s, worst rank)", "peak RSS (MB, worst rank)", "above smallest"]
    return runfiles.markdown_table(header, [
        [f"{r['rows']:,}", r["cache"], f"{max(r['first_step_s']):.1f}", f"{max(r['peak_rss_mb']):,.0f}",
         f"{max(r['peak_rss_mb']) - smallest[r['cache']]:+,.0f}"] for r in results])


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
