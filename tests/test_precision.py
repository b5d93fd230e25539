"""bf16 and DeepSpeed numerics that must hold on GPUs, shown with real processes on CPU: a bf16 export reloads
in fp32 for a stage-2 run, the shipped DeepSpeed configs accumulate gradients in fp32, and a DeepSpeed JSON that
names its own scheduler follows the loop's schedule per optimizer step at world size 2."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import FAST, REPO, read_metrics, run_train
from mindmirror.config import TrainConfig
from mindmirror.core.optim import lr_lambda

pytestmark = pytest.mark.slow


def test_shipped_deepspeed_configs_accumulate_gradients_in_fp32():
    """DeepSpeed otherwise accumulates in the model's dtype (bf16) while DDP accumulates in fp32."""
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        assert config["bf16"]["enabled"] is True, path.name
        assert config["data_types"] == {"grad_accum_dtype": "fp32"}, path.name


def test_a_bf16_deepspeed_export_trains_in_fp32_as_stage_2(tmp_path):
    # Stage 1: the shipped ZeRO-2 config as it is (bf16), with accumulation, so its exports hold bf16 weights.
    run_train(tmp_path, FAST + ["--max_steps", "2", "--batch_size", "4", "--grad_accum_steps", "2",
                                "--output_dir", "stage1"], deepspeed_json=REPO / "ds_configs" / "zero2.json")
    stage1 = json.loads((tmp_path / "stage1" / "summary.json").read_text())
    assert stage1["mixed_precision"] == "bf16" and stage1["zero_stage"] == 2
    assert {t.dtype for t in load_file(str(tmp_path / "stage1" / "best" / "model.safetensors")).values()} == \
        {__import__("torch").bfloat16}
    # Stage 2 under plain Accelerate bf16 autocast: AdamW must update fp32 weights, not the export's bf16 ones.
    run_train(tmp_path, FAST + ["--max_steps", "2", "--batch_size", "4", "--bf16", "--init_from",
                                str(tmp_path / "stage1" / "best"), "--output_dir", "stage2"])
    stage2 = json.loads((tmp_path / "stage2" / "summary.json").read_text())
    assert stage2["param_dtype"] == "float32" and stage2["mixed_precision"] == "bf16"


def test_a_deepspeed_scheduler_follows_the_loops_schedule_at_world_size_2(tmp_path, deepspeed_json):
    path = deepspeed_json("zero2")
    config = json.loads(path.read_text())
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto",
        "warmup_type": "linear"}}
    path.write_text(json.dumps(config))
    steps, lr = 8, 3e-3
    run_train(tmp_path, FAST + ["--max_steps", str(steps), "--batch_size", "4", "--lr", str(lr), "--lr_scheduler",
                                "linear", "--warmup_ratio", "0.25", "--output_dir", "out"], nproc=2,
              deepspeed_json=path)
    logged = [m["lr"] for m in read_metrics(tmp_path / "out") if "lr" in m]
    factor, warmup = lr_lambda(TrainConfig(lr_scheduler="linear", warmup_ratio=0.25), steps)
    assert len(logged) == steps and warmup == 2
    # After the warm-up (whose shape DeepSpeed defines its own way) the two schedules agree step for step; a
    # schedule that decays world-size times too fast reaches 0 at step 5 instead of after step 8.
    assert logged[warmup:] == pytest.approx([lr * factor(s) for s in range(warmup, steps)], rel=1e-6)
    assert logged[-1] > 0
