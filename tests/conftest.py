"""Shared helpers for tests that run the trainer in real processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
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


# ---------------------------------------------------------------------------------------------
# Resume (test_elastic.py, test_checkpoint.py). Every run has the global batch 8 (one process x 8, or two x 4),
# so an uninterrupted one-process run is the reference for every layout: the global step batches make the data
# order the same in all of them. Tolerance on losses: 2e-5, as between uninterrupted layouts (fp32 summation
# order); elastic resume moves the exact fp32 weights and Adam moments, so it adds nothing to that. The saved runs
# are built once a session, for both files; the tests resume copies of them (copy_of).

STEPS = ["--max_steps", "6", "--eval_steps", "3"]
TOL = 2e-5
KILL_AT_4 = {"MINDMIRROR_FAULT_KILL_AT_STEP": "4"}  # every rank dies as step 4 starts: step 3 is saved


def one(extra=()):
    return FAST + STEPS + ["--batch_size", "8", *extra]


def two(extra=()):
    return FAST + STEPS + ["--batch_size", "4", *extra]


# test_trainer.py has a baseline of its own (the same run, its folder), which its tests get instead.
@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """One process, no DeepSpeed, six steps without a stop: the reference losses of every layout."""
    tmp = tmp_path_factory.mktemp("baseline")
    run_train(tmp, one(["--output_dir", str(tmp / "out")]))
    return train_losses(tmp / "out")


@pytest.fixture(scope="session")
def zero2_saved(tmp_path_factory):
    """Two processes under ZeRO-2, checkpoints at steps 2 and 3, killed as step 4 starts."""
    tmp = tmp_path_factory.mktemp("zero2")
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())  # as the deepspeed_json fixture does
    config["bf16"] = {"enabled": False}
    (tmp / "zero2.json").write_text(json.dumps(config))
    killed = run_train(tmp, two(["--save_steps", "1", "--output_dir", str(tmp / "out")]), nproc=2,
                       deepspeed_json=tmp / "zero2.json", env=KILL_AT_4, check=False)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp / "out" / "checkpoints").iterdir()) == ["step_2", "step_3"]
    return tmp / "out"


@pytest.fixture(scope="session")
def plain_saved(tmp_path_factory):
    """One process without DeepSpeed, a checkpoint at step 3 and best/ from its evaluation, killed at step 4."""
    tmp = tmp_path_factory.mktemp("plain")
    killed = run_train(tmp, one(["--save_steps", "3", "--output_dir", str(tmp / "out")]), env=KILL_AT_4,
                       check=False)
    assert killed.returncode != 0 and (tmp / "out" / "best").is_dir()
    return tmp / "out"


def copy_of(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "out")
    return tmp_path / "out"


def losses_by_step(out):
    """The loss of each step; a step run again after a resume counts with its latest value."""
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def assert_finished_like_baseline(out, baseline, proc, resumed_from: int):
    output = proc.stdout + proc.stderr
    assert f"resumed from step {resumed_from} " in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 6
    losses = losses_by_step(out)
    assert [losses[s] for s in range(1, 7)] == pytest.approx(baseline, abs=TOL)
    return summary
