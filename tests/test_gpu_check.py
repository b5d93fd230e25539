"""launch/gpu_check.sh, the prepared device check, cannot rot before a GPU comes: its CPU mode (the same script and
helper, a tiny model, fp32, gloo) runs end to end here, and the helper's judgements are checked on made-up inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mindmirror.tools import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_check.sh"


@pytest.mark.slow
def test_cpu_mode_runs_every_layout_prints_rows_and_passes(tmp_path):
    results, scratch = tmp_path / "results", tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, GPU_CHECK_CPU="1", OUT=str(results), SCRATCH_DIR=str(scratch), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1300)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}\n{proc.stderr[-6000:]}"

    # A row per run, as it ends, in the order run, each complete.
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert [r.split("|")[1].strip() for r in rows] == ["ddp", "zero2", "reload", "zero3"], out
    assert all(r.split("|")[2].strip() == "ok" for r in rows), out
    for name in ("losses ddp vs zero2", "losses ddp vs zero3", "losses zero2 vs zero3", "reload float32"):
        assert f"PASS  {name}" in out, out
    report = json.loads((results / "gpu_check.json").read_text())
    assert report["pass"] and report["plan"]["vocab_size"] == 32128
    by_run = {r["run"]: r for r in report["rows"]}
    assert by_run["reload"]["param_dtype"] == "float32" and by_run["reload"]["steps"] == 2
    for name in ("ddp", "zero2", "zero3"):
        row = by_run[name]
        assert row["steps"] == 4 and row["tokens_per_s"] > 0 and row["save_s"] is not None and row["eval_s"] is not None
        assert row["peak_bytes_above_baseline"] > 0 and row["planned_bytes"] > 0
        assert (results / name / "metrics.jsonl").is_file()  # the run's small files are kept
    # Nothing large stays behind: the scratch folder (data, cache, checkpoints, exports) is gone.
    assert list(scratch.iterdir()) == []
    assert not list(results.rglob("*.safetensors")) and not list(results.rglob("checkpoints"))


def test_losses_that_disagree_or_are_missing_fail():
    ddp = [[2, 10.0], [4, 9.0]]
    agree = gpu_check.compare_losses({"ddp": ddp, "zero2": [[2, 10.01], [4, 9.01]], "zero3": ddp}, rtol=0.02)
    assert [ok for _, ok, _ in agree] == [True, True, True]
    # a wrong normalisation (the loss doubled) or a lost update shows far above bf16 noise
    off = gpu_check.compare_losses({"ddp": ddp, "zero2": [[2, 10.0], [4, 9.5]], "zero3": ddp}, rtol=0.02)
    assert [ok for _, ok, _ in off] == [False, True, False]
    assert "at step 4" in off[0][2]
    missing = gpu_check.compare_losses({"ddp": ddp, "zero2": ddp}, rtol=0.02)
    assert [ok for _, ok, _ in missing] == [True, False, False] and "no logged losses from zero3" in missing[1][2]
    cut_short = gpu_check.compare_losses({"ddp": ddp, "zero2": ddp[:1], "zero3": ddp}, rtol=0.02)
    assert not cut_short[0][1] and "logged steps differ" in cut_short[0][2]


def test_host_syncs_are_counted_per_step_and_swallowed(tmp_path, monkeypatch):
    """The count the trainer's process keeps on CUDA, with stand-ins for CUDA: torch's sync-debug warnings between
    two entries of Trainer.train_step are that step's; other warnings pass through."""
    import torch

    from mindmirror.core import loop

    def fake_step(self, syncs):
        for _ in range(syncs):
            warnings.warn("called a synchronizing CUDA operation (Triggered internally at c10/cuda/x.cpp:1.)",
                          stacklevel=2)
        warnings.warn("something else", stacklevel=2)

    modes = []
    monkeypatch.setattr(loop.Trainer, "train_step", fake_step)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    path = tmp_path / "syncs.json"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        gpu_check.count_host_syncs(path)
        for syncs in (2, 0, 3, 1):
            loop.Trainer.train_step(None, syncs)
    assert modes == ["warn"]
    assert [str(w.message) for w in shown] == ["something else"] * 4
    assert json.loads(path.read_text())["at_step_start"] == [0, 2, 2, 5]
    assert gpu_check.host_syncs(path) == ("2 (max 3)", {"per_step": [2, 0, 3]})


def test_host_syncs_say_why_they_are_missing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_check.count_host_syncs(tmp_path / "syncs.json")
    figure, detail = gpu_check.host_syncs(tmp_path / "syncs.json")
    assert figure == "n/a" and "no CUDA" in detail["reason"]


def test_plan_refuses_a_model_whose_checkpoint_and_exports_exceed_the_disk_limit(tmp_path, capsys):
    code = gpu_check.main(["plan", "--scratch", str(tmp_path), "--model", "t5-v1_1-xl", "--max_disk_gb", "15"])
    assert code == 2
    assert "MAX_DISK_GB=15" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists() and not (tmp_path / "data").exists()


def test_generated_rows_are_long_enough_to_be_truncated_to_the_asked_lengths():
    from mindmirror.data import formats
    from mindmirror.model import load_tokenizer

    problems = gpu_check.long_problems(4, 1, input_len=512, target_len=128)
    tokenizer = load_tokenizer("", "t5-v1_1-base", True)
    for p in problems["train"]:
        assert len(tokenizer("predict: " + p.input).input_ids) > 512
        rationale = formats.tree_cot_rationale(p.cots[0], "svamp")
        assert rationale and len(tokenizer(rationale).input_ids) > 128
        assert formats.tree_cot_answer(p.cots[0], "svamp")  # still a usable CoT


def test_plan_on_a_stand_in_h100_fills_the_gpu_with_the_shipped_bf16_configs(tmp_path, monkeypatch, capsys):
    """The GPU branch of the plan, with CUDA's queries answered as an H100 would: the largest multiple of 8 whose
    plan fits 80% of the memory in every layout, bf16, the shipped DeepSpeed JSONs, the H100's peak for MFU."""
    import types

    import torch

    from mindmirror.model import model_config
    from mindmirror.tools import estimate

    name, memory = "NVIDIA H100 80GB HBM3", 80 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(name=name,
                                                                                            total_memory=memory))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10 ** 12))
    assert gpu_check.main(["plan", "--scratch", str(tmp_path), "--steps", "2", "--eval_rows", "8",
                           "--test_rows", "4"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    batch = plan["batch"]
    assert plan["precision"] == "bf16" and plan["peak_flops"] == 989e12 and batch % 8 == 0 and batch >= 8
    config = model_config("t5-v1_1-base", 32128)
    lengths = (plan["input_len"], plan["label_len"], plan["target_len"])
    assert plan["label_len"] % 8 == 0 and lengths[0] == 512 and lengths[2] == 128
    for b, fits in ((batch, True), (batch + 8, False)):
        assert all(gpu_check.planned_bytes(config, s, "bf16", b, *lengths) <= 0.8 * memory
                   for s in gpu_check.LAYOUTS.values()) == fits
    assert plan["planned_bytes"]["zero3"] == estimate.memory_per_rank(
        config, 3, 1, False, "bf16", batch, 512, plan["label_len"], rationale_dec_len=128).total
    env = (tmp_path / "plan.env").read_text()
    assert "ZERO2_JSON=ds_configs/zero2.json" in env and f"BATCH={batch}" in env
    assert (tmp_path / "data" / "svamp_tree1" / "llm" / "train_CoT_0.json").is_file()
    assert gpu_check.HEADER in capsys.readouterr().out
