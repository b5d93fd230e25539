"""Shared helpers for tests that run the trainer in real processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindmirror.tools.launching import TRAIN_SCRIPT, free_port, local_launch  # noqa: F401  (free_port: test_trainer)

REPO = Path(__file__).resolve().parents[1]

# Small, fast training settings on the bundled synthetic data.
FAST = ["--subsample", "0.02", "--valid_fraction", "0.01", "--max_eval_samples", "16", "--max_test_samples", "32",
        "--gen_max_len", "12",
        "--report_to", "none", "--logging_steps", "1", "--lr_scheduler", "linear", "--warmup_ratio", "0.2"]


def launch_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update({"MINDMIRROR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                # One thread per process everywhere, so runs laid out differently sum in the same order.
                "MINDMIRROR_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    env.pop("ACCELERATE_USE_CPU", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the `accelerate` of this Python
    return env


def accelerate_cmd(nproc: int = 1, deepspeed_json: Path | None = None, extra: list[str] | None = None) -> list[str]:
    """An ``accelerate launch`` command line for ``train/main.py`` on CPU."""
    cmd, _ = local_launch(nproc)
    if deepspeed_json is not None:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_json), "--zero3_init_flag", "false"]
    elif nproc > 1:
        cmd += ["--multi_gpu"]
    else:
        cmd += ["--mixed_precision", "no"]
    return cmd + (extra or []) + [str(TRAIN_SCRIPT)]


def run_train(tmp_path: Path, args: list[str], nproc: int = 1, deepspeed_json: Path | None = None,
              env: dict | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the trainer through ``accelerate launch`` in real processes (gloo on CPU)."""
    full_env = launch_env(tmp_path) | (env or {})
    if nproc > 1 and deepspeed_json is None:
        full_env["ACCELERATE_USE_CPU"] = "true"  # --multi_gpu + this = MULTI_CPU DDP that works on CPU
    proc = subprocess.run(accelerate_cmd(nproc, deepspeed_json) + args, cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_csv(path: Path | str) -> list[dict]:
    """The rows of a CSV table the tools write (results.csv, runs.csv)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log_lines(out: Path, text: str) -> list[str]:
    """The lines of a run's log.txt (every rank's full record) that hold ``text``."""
    return [line for line in (out / "log.txt").read_text().splitlines() if text in line]


def train_losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.fixture
def deepspeed_json(tmp_path):
    """A shipped DeepSpeed JSON with precision switched to fp32 (CPU tests), written to tmp_path."""
    def make(name: str, **zero_overrides) -> Path:
        config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        config["bf16"] = {"enabled": False}
        config["zero_optimization"].update(zero_overrides)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        return path
    return make
