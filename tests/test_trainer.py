"""The trainer in real processes on CPU (gloo): equivalence across process counts, accumulation and
ZeRO stages, exact resume, signals, exports and the non-finite guard. No mocks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, launch_env, log_lines, read_metrics, run_train, train_losses

pytestmark = pytest.mark.slow
STEPS = ["--max_steps", "6", "--eval_steps", "3"]
TOL = 2e-5  # fp32 on CPU: summation order differs between DDP, ZeRO and accumulation


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b, rel=2e-5, atol=1e-3):
    """Final weights agree: each tensor to ``rel`` in relative norm, and no element off by ``atol``.

    Not elementwise to the losses' 2e-5: after a few Adam steps a parameter whose gradient is near zero
    (a rarely seen embedding row) moves by about lr * m / (sqrt(v) + eps), which turns summation-order
    noise in its gradient into elementwise differences of up to a few 1e-4. A wrong shard or a missed
    update moves whole tensors by far more than ``rel``."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k].float(), wb[k].float()
        diff = (x - y).abs().max().item()
        relative = ((x - y).norm() / x.norm().clamp(min=1e-12)).item()
        assert relative <= rel and diff <= atol, f"{k}: relative difference {relative:.1e}, max {diff:.1e}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process, micro-batch 8, no accumulation: the reference the other layouts must match."""
    tmp = tmp_path_factory.mktemp("baseline")
    proc = run_train(tmp, FAST + STEPS + ["--batch_size", "8", "--output_dir", str(tmp / "out")])
    (tmp / "console.txt").write_text(proc.stdout + proc.stderr)
    return tmp / "out"


def test_the_console_is_quiet_and_log_txt_has_the_full_record(baseline):
    console = (baseline.parent / "console.txt").read_text()
    for shown in ("svamp_tree1: train", "model tiny:", "valid accuracy", "test question 1:", "student's rationale:",
                  "test accuracy (best model)"):
        assert shown in console, shown
    assert "[RANK" not in console and "warn" not in console.lower(), console[-3000:]
    full = (baseline / "log.txt").read_text()
    assert "[RANK 0] Saving current state" in full and "WARNING" in full  # accelerate's notes and warnings
    assert "svamp_tree1: train" in full and "model tiny:" in full  # and mindmirror's own lines
    assert full.count(": valid accuracy") == console.count(": valid accuracy") == 2  # each evaluation, shown once
    # The export says what is tied: t5-v1_1's output projection is its own.
    assert json.loads((baseline / "final" / "config.json").read_text())["tie_word_embeddings"] is False


def test_baseline_writes_the_output_contract(baseline):
    summary = json.loads((baseline / "summary.json").read_text())
    for key in ("final_step", "final_loss", "best_valid_accuracy", "test_accuracy", "train_samples_per_s", "wall_s",
                "world_size", "zero_stage", "mixed_precision"):
        assert key in summary, key
    assert summary["final_step"] == 6 and summary["world_size"] == 1 and summary["zero_stage"] == 0
    train = [m for m in read_metrics(baseline) if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, 7))
    for key in ("loss", "label_loss", "rationale_loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(isinstance(m[key], float) for m in train), key
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [m for m in read_metrics(baseline) if m.get("split") == "valid"]
    assert [m["step"] for m in evals] == [3, 6]
    assert any(m.get("split") == "test" for m in read_metrics(baseline))
    for export in ("best", "final"):
        assert (baseline / export / "model.safetensors").exists()
        assert (baseline / export / "tokenizer_config.json").exists()
    assert (baseline / "checkpoints" / "step_6" / "trainer_state.json").exists()
    assert (baseline / "predictions.jsonl").read_text().count("\n") == summary["rows"]["test"]
    assert any(p.name.startswith("events") for p in (baseline / "tb").rglob("*")) is False  # --report_to none


def test_accumulation_and_ddp_match_one_big_batch(baseline, tmp_path):
    run_train(tmp_path, FAST + STEPS + ["--batch_size", "4", "--grad_accum_steps", "2", "--output_dir", "accum"])
    run_train(tmp_path, FAST + STEPS + ["--batch_size", "4", "--output_dir", "ddp"], nproc=2)
    reference = train_losses(baseline)
    for out in ("accum", "ddp"):
        assert train_losses(tmp_path / out) == pytest.approx(reference, abs=TOL), out
        assert_same_weights(baseline / "final", tmp_path / out / "final")


def evaluated(model, tmp_path) -> list[dict]:
    """mindmirror-eval's greedy predictions (answers and rationales) of an export or a checkpoint."""
    from mindmirror.evaluation.eval_cli import main

    out = tmp_path / f"eval-{model.name}"
    main([str(model), "--self_eval_samples", "0", "--rationale_max_len", "16", "--output_dir", str(out)])
    return [json.loads(line) for line in (out / f"eval_{model.name}_test_predictions.jsonl").open()]


def loaded_weights(model):
    """The weights mindmirror-eval loads from an export or a checkpoint."""
    from mindmirror.config import TrainConfig
    from mindmirror.evaluation import eval_cli

    kind, run = eval_cli.locate(model)
    config = TrainConfig(**{k: v for k, v in eval_cli.run_config(run).items() if k != "output_dir"})
    t5, _ = eval_cli.load(model, kind, run, config, "cpu", bf16=False)
    return t5.state_dict()


def assert_same_loaded_weights(a, b):
    wa, wb = loaded_weights(a), loaded_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_eval_reads_a_checkpoint_as_the_export_of_the_same_step(baseline, tmp_path, monkeypatch):
    monkeypatch.setenv("MINDMIRROR_CACHE", str(tmp_path / "cache"))
    assert_same_loaded_weights(baseline / "checkpoints" / "step_6", baseline / "final")
    from_export = evaluated(baseline / "final", tmp_path)
    assert len(from_export) == json.loads((baseline / "summary.json").read_text())["rows"]["test"]
    assert evaluated(baseline / "checkpoints" / "step_6", tmp_path) == from_export
    result = json.loads((tmp_path / "eval-step_6" / "eval_step_6_test.json").read_text())
    assert result["step"] == 6 and result["self_eval_samples"] == 0 and result["judge_trained"] is False


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_matches_ddp(baseline, tmp_path, deepspeed_json, stage, monkeypatch):
    run_train(tmp_path, FAST + STEPS + ["--batch_size", "4", "--output_dir", "out"], nproc=2,
              deepspeed_json=deepspeed_json(stage))
    assert train_losses(tmp_path / "out") == pytest.approx(train_losses(baseline), abs=TOL)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["zero_stage"] == int(stage[-1]) and summary["world_size"] == 2
    assert_same_weights(baseline / "final", tmp_path / "out" / "final")
    # mindmirror-eval consolidates the checkpoint's ZeRO shards into the model the export holds.
    monkeypatch.setenv("MINDMIRROR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # where the run was started (its config names relative folders)
    assert_same_loaded_weights(tmp_path / "out" / "checkpoints" / "step_6", tmp_path / "out" / "final")
    assert evaluated(tmp_path / "out" / "checkpoints" / "step_6", tmp_path) == \
        evaluated(tmp_path / "out" / "final", tmp_path)
    if stage == "zero3":
        held = log_lines(tmp_path / "out", "ZeRO-3 holds")
        assert len(held) == 2
        for line in held:  # each rank holds about half of the parameters: really partitioned
            mine, total = (int(w) for w in line.split("holds ")[1].split(" parameter")[0].split(" of "))
            assert mine < 0.6 * total
        # The consolidated export loads in plain transformers and generates what the sharded model did.
        from transformers import AutoTokenizer, T5ForConditionalGeneration

        final = tmp_path / "out" / "final"
        tok, t5 = AutoTokenizer.from_pretrained(final), T5ForConditionalGeneration.from_pretrained(final).eval()
        seen = [json.loads(line) for line in (tmp_path / "out" / "valid_predictions.jsonl").read_text().splitlines()]
        for row in seen[:6]:
            ids = tok("predict: " + row["input"], return_tensors="pt").input_ids
            text = tok.decode(t5.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0],
                              skip_special_tokens=True).strip()
            assert text == row["prediction"]


def test_zero3_with_cpu_offload_matches_ddp(baseline, tmp_path, deepspeed_json):
    run_train(tmp_path, FAST + STEPS + ["--batch_size", "4", "--output_dir", "out"], nproc=2,
              deepspeed_json=deepspeed_json("zero3_offload"))
    # DeepSpeed's CPU Adam differs from torch's AdamW in rounding only.
    assert train_losses(tmp_path / "out") == pytest.approx(train_losses(baseline), abs=1e-4)


@pytest.mark.parametrize("layout", ["single", "ddp", "zero2"])
def test_resume_after_sigkill_is_exact(baseline, tmp_path, deepspeed_json, layout):
    nproc = 1 if layout == "single" else 2
    batch = ["--batch_size", "8" if nproc == 1 else "4"]
    ds = deepspeed_json("zero2") if layout == "zero2" else None
    args = FAST + STEPS + batch + ["--save_steps", "2", "--output_dir", "out"]
    killed = run_train(tmp_path, args, nproc=nproc, deepspeed_json=ds, check=False,
                       env={"MINDMIRROR_FAULT_KILL_AT_STEP": "6"})
    assert killed.returncode != 0
    assert not (tmp_path / "out" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_2", "step_4"]
    run_train(tmp_path, args + ["--resume"], nproc=nproc, deepspeed_json=ds)
    # Every step's loss (steps 5-6 logged by the resumed run) and the final weights are the baseline's.
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "out") if "loss" in m}
    assert [losses[s] for s in range(1, 7)] == pytest.approx(train_losses(baseline), abs=TOL)
    assert_same_weights(baseline / "final", tmp_path / "out" / "final")


def test_corrupt_newest_checkpoint_falls_back_to_previous(baseline, tmp_path):
    args = FAST + STEPS + ["--batch_size", "8", "--save_steps", "2", "--output_dir", "out"]
    run_train(tmp_path, args, check=False, env={"MINDMIRROR_FAULT_KILL_AT_STEP": "6"})
    newest = tmp_path / "out" / "checkpoints" / "step_4" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash or a full disk
    proc = run_train(tmp_path, args + ["--resume"])
    assert "step_4 is not usable" in proc.stderr + proc.stdout
    assert "resumed from step 2" in proc.stderr + proc.stdout
    assert_same_weights(baseline / "final", tmp_path / "out" / "final")


def test_sigterm_saves_and_exits_with_the_documented_code(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "train" / "main.py")] + FAST + [
        "--batch_size", "8", "--max_steps", "400", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=launch_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          (out / "metrics.jsonl").read_text().count('"loss"') >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    from mindmirror.core.loop import EXIT_PREEMPTED

    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and 3 <= int(saved[0].split("_")[1]) < 400
    assert not (out / "final").exists()


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    run_train(tmp_path, FAST + STEPS + ["--batch_size", "8", "--output_dir", "out"],
              env={"MINDMIRROR_FAULT_NAN_STEPS": "3"})
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["final_step"] == 6
    assert any(m.get("nonfinite_skipped") == 1 and m["step"] == 3 for m in read_metrics(tmp_path / "out"))
    assert all(v == v for v in train_losses(tmp_path / "out")[3:])  # no NaN leaked into the weights
    # The skipped step does not advance the schedule: step 4 trains at the lr step 3 would have used.
    lr = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "out") if "lr" in m}
    assert lr[4] == lr[3] and lr[3] != lr[2] and lr[5] != lr[4]


def test_repeated_nonfinite_losses_stop_with_a_checkpoint(tmp_path):
    flags = FAST + STEPS + ["--batch_size", "8", "--max_nonfinite_steps", "2", "--output_dir", "out"]
    proc = run_train(tmp_path, flags, env={"MINDMIRROR_FAULT_NAN_STEPS": "3,4"}, check=False)
    assert proc.returncode == 1
    assert "mindmirror: error: 2 non-finite steps in a row" in proc.stderr
    # Step 3 was skipped (no update) and step 4 stopped the run: the saved state is after step 3.
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step_3"]


def test_two_stages_self_evaluation_then_cot(tmp_path):
    stage1 = FAST + ["--max_steps", "3", "--batch_size", "8", "--dataset", "svamp_tree2", "--max_test_samples", "50",
                     "--model_type", "task_prefix_tree2", "--subsample", "0.005", "--output_dir", "stage1"]
    run_train(tmp_path, stage1)
    assert json.loads((tmp_path / "stage1" / "summary.json").read_text())["model_type"] == "task_prefix_tree2"
    run_train(tmp_path, FAST + ["--max_steps", "3", "--batch_size", "8", "--init_from", "stage1/best",
                                "--output_dir", "stage2"])
    # Stage 2 starts from stage 1's weights, not from a fresh initialisation.
    from transformers import T5ForConditionalGeneration

    first = T5ForConditionalGeneration.from_pretrained(tmp_path / "stage1" / "best").shared.weight
    scratch = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert scratch["init_from"] == "stage1/best"
    second = T5ForConditionalGeneration.from_pretrained(tmp_path / "stage2" / "final").shared.weight
    assert (second - first).abs().max() < 0.1  # three small steps away from stage 1


def test_gradient_checkpointing_changes_memory_not_results(baseline, tmp_path):
    run_train(tmp_path, FAST + STEPS + ["--batch_size", "8", "--gradient_checkpointing", "--output_dir", "out"])
    assert train_losses(tmp_path / "out") == pytest.approx(train_losses(baseline), abs=TOL)


def test_two_nodes_through_multinode_script_match_one_process(baseline, tmp_path):
    """launch/multinode.sh on two "nodes" of one machine (one process each) trains as one job."""
    from conftest import free_port

    env = launch_env(tmp_path) | {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                                  "GPUS_PER_NODE": "1", "ACCELERATE_USE_CPU": "true"}
    args = FAST + STEPS + ["--batch_size", "4", "--output_dir", str(tmp_path / "out")]
    nodes = [subprocess.Popen(["bash", str(REPO / "launch" / "multinode.sh")] + args, cwd=tmp_path,
                              env=env | {"NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-4000:]
    assert "node 1 of 2" in outputs[1][1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert train_losses(tmp_path / "out") == pytest.approx(train_losses(baseline), abs=TOL)
