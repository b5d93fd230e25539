"""The scaling study and the benchmark, end to end on the tiny model (real accelerate launch runs)."""

from __future__ import annotations

import json

import pytest

from conftest import read_csv
from mindmirror.tools import bench, scaling
from mindmirror.tools.launching import LAUNCH_LOG

pytestmark = pytest.mark.slow
FAST_TRAIN = ["--", "--subsample", "0.02", "--valid_fraction", "0.02", "--max_eval_samples", "4"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDMIRROR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINDMIRROR_NUM_THREADS", "1")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.chdir(tmp_path)  # the sweep below is given a relative output folder
    return tmp_path


def sweep(out, micro_batches, capsys):
    args = ["--sizes", "tiny", "--zero", "0", "--micro_batch", micro_batches, "--steps", "3", "--warmup_steps", "1",
            "--vocab_size", "0", "--output_dir", out.name] + FAST_TRAIN
    assert scaling.main(args) == 0
    return capsys.readouterr().out


def test_sweep_records_every_point_skips_finished_ones_and_survives_a_failure(env, capsys):
    out = env / "study"
    # 120 rows of training data: micro-batch 200 cannot make one step, so that point fails.
    printed = sweep(out, "2,4,200", capsys)
    rows = read_csv(out / "results.csv")
    assert [r["micro_batch"] for r in rows] == ["2", "4", "200"]
    ok, bad = rows[:2], rows[2]
    for r in ok:
        assert r["status"] == "ok", r
        assert float(r["tokens_per_s"]) > 0 and float(r["samples_per_s"]) > 0 and float(r["step_s"]) > 0
        assert float(r["peak_mem_mb"]) > float(r["mem_before_model_mb"]) > 0
        assert float(r["model_tflops_per_s"]) > 0 and float(r["est_mem_mb"]) > 0
        assert int(r["parameters"]) > 1e6
    for record in map(json.loads, (out / "results.jsonl").read_text().splitlines()):
        assert record["est_breakdown_mb"]["total"] == pytest.approx(record["est_mem_mb"])
    assert bad["status"] == "failed" and "larger than" in bad["reason"] and "error" in bad["reason"], bad
    table = (out / "results.md").read_text()
    assert table.count("| tiny |") == 3 and "failed: " in table
    for png in ("throughput.png", "memory.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "2 ok, 1 not" in printed

    # Restarted: nothing runs again, the records stay as they were.
    logs = {p: p.stat().st_mtime_ns for p in (out / "points").rglob(LAUNCH_LOG)}
    before = (out / "results.jsonl").read_text()
    printed = sweep(out, "2,4,200", capsys)
    assert "3 already done, 0 to run" in printed
    assert (out / "results.jsonl").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "points").rglob(LAUNCH_LOG)} == logs


def test_dry_run_says_what_xxl_needs(capsys):
    assert scaling.main(["--dry_run", "--sizes", "t5-v1_1-small,t5-v1_1-xxl", "--zero", "0,3", "--precision", "bf16",
                         "--device_memory_gb", "80", "--micro_batch", "1"]) == 0
    text = capsys.readouterr().out
    xxl = next(line for line in text.splitlines() if line.startswith("| t5-v1_1-xxl |"))
    cells = [c.strip() for c in xxl.strip("|").split("|")]
    assert cells[1] == "does not fit"  # ZeRO-0 replicates 11B parameters' states on every GPU
    assert int(cells[4]) > 1  # ZeRO-3: several GPUs
    small = next(line for line in text.splitlines() if line.startswith("| t5-v1_1-small |"))
    assert set(c.strip() for c in small.strip("|").split("|")[1:]) == {"1"}
    assert "t5-v1_1-xxl_z3_bf16_mb1_w1" in text


def test_benchmark_small_mode_prints_both_sides(env, capsys):
    report = bench.run(["--model", "tiny", "--vocab_size", "0", "--steps", "3", "--warmup_steps", "1",
                        "--batch_size", "4", "--subsample", "0.02"])
    text = capsys.readouterr().out
    assert set(report["samples_per_s"]) == {"baseline", "mindmirror"}
    assert all(v > 0 for v in report["samples_per_s"].values())
    assert report["ratio"] == pytest.approx(report["samples_per_s"]["mindmirror"] / report["samples_per_s"]["baseline"])
    assert 0 <= report["padding"]["grouped"] <= report["padding"]["random"] < 1
    assert "| baseline |" in text and "| mindmirror |" in text and "padding fraction" in text
    # Both sides really trained: finite losses.
    assert all(loss == loss and loss > 0 for loss in report["final_loss"].values())
    # The same clock times both sides and splits their steps: every phase measured, adding up to the step.
    for name, split in report["split"].items():
        assert report["samples_per_s"][name] == pytest.approx(4 / split["step"])
        assert all(split[phase] > 0 for phase in ("data", "forward", "backward", "clip", "optimizer")), name
        assert sum(split[phase] for phase in bench.PHASES) == pytest.approx(split["step"])
    assert report["split"]["baseline"]["host_reads"] > report["split"]["mindmirror"]["host_reads"]
    assert "| forward |" in text and "| host reads (count) |" in text
