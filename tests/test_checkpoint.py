"""Checkpoints (mindmirror/core/checkpoint.py) on a resume, in real processes on CPU (gloo): one checkpoint agreed
by all ranks, falling back together when one rank cannot load the newest; a resume that can load none stops and
keeps every file; no training from scratch over an earlier run's checkpoints. The saved runs and the reference
(``baseline``, ``zero2_saved``, ``plain_saved``) are conftest.py's, shared with test_elastic.py."""

from __future__ import annotations

import pytest

from conftest import assert_finished_like_baseline, copy_of, one, run_train, two

pytestmark = pytest.mark.slow


def files(out):
    """Every file under checkpoints/ and best/, with its size."""
    return {str(p.relative_to(out)): p.stat().st_size for d in ("checkpoints", "best") for p in (out / d).rglob("*")
            if p.is_file()}


def test_a_load_failing_on_one_rank_moves_every_rank_to_the_previous_checkpoint(zero2_saved, baseline, tmp_path,
                                                                                deepspeed_json):
    out = copy_of(zero2_saved, tmp_path)
    proc = run_train(tmp_path, two(["--output_dir", str(out), "--resume"]), nproc=2,
                     deepspeed_json=deepspeed_json("zero2"), env={"MINDMIRROR_FAULT_LOAD_STEP": "3"})
    output = proc.stdout + proc.stderr
    assert "step_3 is not usable: failed to load (rank 1: RuntimeError: injected fault" in output
    # Both ranks took step 2: under ZeRO-2 each rank updates its own slice of the weights, so a rank
    # left on step 3 would show in every later loss and in the final weights.
    assert_finished_like_baseline(out, baseline, proc, resumed_from=2)


def test_a_resume_that_cannot_load_stops_and_keeps_every_file(zero2_saved, tmp_path, deepspeed_json):
    out = copy_of(zero2_saved, tmp_path)
    before = files(out)
    # Another model (a larger vocabulary) cannot take these checkpoints: every one fails to load.
    proc = run_train(tmp_path, two(["--output_dir", str(out), "--resume", "--vocab_size", "768"]), nproc=2,
                     deepspeed_json=deepspeed_json("zero2"), check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mindmirror: error: --resume: none of")]
    assert len(errors) == 2, proc.stderr[-3000:]  # raised on every rank, as one line each
    assert ("none of the 2 checkpoint(s)" in errors[0] and "The newest, step_3, was written by layout: 2 processes, "
            "DeepSpeed ZeRO stage 2, fp32; this run's layout: 2 processes, DeepSpeed ZeRO stage 2, fp32" in errors[0])
    assert "size mismatch" in errors[0] and "another --output_dir" in errors[0]
    assert files(out) == before
    assert not (out / "summary.json").exists()


def test_a_run_without_resume_refuses_an_earlier_runs_folder(plain_saved, tmp_path):
    out = copy_of(plain_saved, tmp_path)
    before = files(out)
    proc = run_train(tmp_path, one(["--output_dir", str(out)]), check=False)
    assert proc.returncode != 0
    assert "mindmirror: error: " in proc.stderr and "already holds an earlier run's checkpoints/step_3, best/: pass " \
        "--resume to continue that run, or choose another --output_dir" in proc.stderr
    assert files(out) == before
