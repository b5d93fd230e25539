"""What keeps per-rank memory down under ZeRO, in real processes on CPU (gloo): a size-named model built
partitioned under ZeRO-3 (and initialised like a whole one), the best-model test run through the sharded
model, and ZeRO-2 exports copied by the main process alone. The memory itself is measured, not asserted
(docs/benchmarks.md, "ZeRO-3 memory per rank")."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, accelerate_cmd, launch_env, log_lines, run_train

pytestmark = pytest.mark.slow
BATCH = ["--batch_size", "4"]  # per rank: 2 processes, a global batch of 8


def run_zero3_init(tmp_path, args: list[str], deepspeed_json) -> subprocess.CompletedProcess:
    """The trainer in 2 ZeRO-3 processes with Accelerate's ``zero3_init_flag`` on (its default under ZeRO-3;
    conftest launches with it off, so that ZeRO-3 runs start from the weights of the runs they are compared to)."""
    cmd = accelerate_cmd(2, deepspeed_json("zero3", stage3_param_persistence_threshold=0))  # partition a tiny model
    cmd[cmd.index("--zero3_init_flag") + 1] = "true"
    proc = subprocess.run(cmd + args, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"trainer exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def built_shares(out) -> list[tuple[int, int]]:
    """(held, total) parameter elements of each rank's model right after it was built (from the run's log.txt)."""
    lines = log_lines(out, "built partitioned: holds")
    return [tuple(int(w) for w in line.split("holds ")[1].split(" parameter")[0].split(" of ")) for line in lines]


def predictions(path) -> list[str]:
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def evaluated(model, tmp_path):
    """mindmirror-eval's greedy test predictions and accuracy of an export, on one process (unsharded)."""
    from mindmirror.eval_cli import main

    out = tmp_path / f"eval-{model.name}"
    main([str(model), "--self_eval_samples", "0", "--rationale_max_len", "4", "--output_dir", str(out)])
    result = json.loads((out / f"eval_{model.name}_test.json").read_text())
    return predictions(out / f"eval_{model.name}_test_predictions.jsonl"), result["accuracy"]


def test_zero3_builds_partitioned_and_tests_the_best_model_through_the_shards(tmp_path, deepspeed_json,
                                                                             monkeypatch):
    run_zero3_init(tmp_path, FAST + BATCH + ["--max_steps", "4", "--eval_steps", "2", "--output_dir", "out"],
                   deepspeed_json)
    shares = built_shares(tmp_path / "out")
    assert len(shares) == 2
    for held, total in shares:  # never whole on a rank: about half each, all of it between them
        assert held < 0.6 * total
    assert sum(held for held, _ in shares) >= shares[0][1]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    # best/ is older than the training model's last weights, so the test really reads the export.
    assert summary["best_step"] < summary["final_step"]
    monkeypatch.setenv("MINDMIRROR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # where the run was started (its config names relative folders)
    expected, accuracy = evaluated(out / "best", tmp_path)
    assert predictions(out / "predictions.jsonl") == expected
    assert summary["test_accuracy"] == accuracy
    assert evaluated(out / "final", tmp_path)[0] != expected


def test_zero3_built_model_is_initialised_like_a_whole_one(tmp_path, deepspeed_json):
    """At lr 0 the exported weights are the initial ones: a 2-process ZeRO-3 build (partitioned) against a
    1-process build, seed alike. The random streams differ, so each tensor's distribution is compared."""
    frozen = ["--max_steps", "1", "--lr", "0", "--max_eval_samples", "2", "--max_test_samples", "2"]
    run_zero3_init(tmp_path, FAST + BATCH + frozen + ["--output_dir", "zero3"], deepspeed_json)
    assert len(built_shares(tmp_path / "zero3")) == 2
    run_train(tmp_path, FAST + ["--batch_size", "8"] + frozen + ["--output_dir", "whole"])
    sharded = load_file(str(tmp_path / "zero3" / "final" / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    assert sharded.keys() == whole.keys()
    for name, w in whole.items():
        s, n = sharded[name].float(), w.numel()
        if w.std() == 0:  # layer norms: ones
            assert torch.equal(s, w), name
            continue
        # Four standard errors of a normal sample's std and mean. The stock torch init left in place (what T5's
        # init run on empty ZeRO shards leaves) is off by 40% or more in every tensor T5 initialises otherwise.
        assert abs(s.std() / w.std() - 1) < 4 / math.sqrt(n), name
        assert abs(s.mean() - w.mean()) < 4 * w.std() * math.sqrt(2 / n), name


def test_zero2_export_holds_the_engine_weights(tmp_path, deepspeed_json):
    """The main process alone copies the weights; the export is what the code wrote when every rank copied
    them (``accelerator.get_state_dict``: the engine's module state dict, which DeepSpeed also saves)."""
    run_train(tmp_path, FAST + BATCH + ["--max_steps", "2", "--max_eval_samples", "4", "--max_test_samples", "4",
                                        "--output_dir", "out"], nproc=2, deepspeed_json=deepspeed_json("zero2"))
    module = torch.load(tmp_path / "out" / "checkpoints" / "step_2" / "pytorch_model" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # restored from `shared` on load
    for export in ("best", "final"):
        exported = load_file(str(tmp_path / "out" / export / "model.safetensors"))
        assert set(exported) == {k.removeprefix("t5.") for k in module} - tied
        for name, tensor in exported.items():
            assert tensor.dtype == module[f"t5.{name}"].dtype and torch.equal(tensor, module[f"t5.{name}"]), name
