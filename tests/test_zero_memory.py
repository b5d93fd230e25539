"""What keeps per-rank memory down under ZeRO, in real processes on CPU (gloo): a size-named model built
partitioned under ZeRO-3 (and initialised like a whole one), parameters released as the backward goes (one pass
of the model per micro-batch, the trainer's sizes), the best-model test run through the sharded model, exports
streamed a module at a time, and ZeRO-2 exports copied by the main process alone. The memory itself is
measured, not asserted (docs/benchmarks.md, "ZeRO-3 memory per rank")."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, accelerate_cmd, launch_env, log_lines, run_train

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
    from mindmirror.evaluation.eval_cli import main

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
    # fp32 weights: the masters are the partitions themselves, not a second copy (runtime.share_fp32_masters)
    assert len(log_lines(out, "fp32 master weights are the parameter partitions")) == 2
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


GATHER_PROBE = r'''
import json, os, sys
import torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import T5ForConditionalGeneration
from mindmirror.core.collate import Collator
from mindmirror.config import TrainConfig
from mindmirror.model import model_config, untie_lm_head
from mindmirror.core.objective import DistillationObjective, combine
from mindmirror.core.runtime import fill_deepspeed_sizes

deepspeed.init_distributed("gloo")
config = model_config("tiny", 640)
g = torch.Generator().manual_seed(0)
def seq(n):
    return torch.randint(3, 600, (n,), generator=g).tolist() + [1]
rows = [{"input_ids": seq(20), "labels": seq(3), "expl_input_ids": seq(22), "rationale_ids": seq(30)} for _ in range(4)]
for stacked in (False, True):
    torch.manual_seed(0)
    model = DistillationObjective(untie_lm_head(T5ForConditionalGeneration(config)).train())
    total = sum(p.numel() for p in model.parameters())
    ds = json.loads(sys.argv[2])
    fill_deepspeed_sizes(ds, TrainConfig(batch_size=4), 4, total, config.d_model)  # the trainer's sizes
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    params, peak = list(engine.module.parameters()), [0]

    def gathered(*_):
        peak[0] = max(peak[0], sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE))

    def after_forward(module, inputs, output):  # and, through the output's gradient, in the backward
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: gathered())

    for m in engine.module.modules():
        m.register_forward_hook(after_forward)
    batch = Collator(0, True, stacked=stacked)(rows)
    counts = batch.pop("token_counts").float()
    for step in range(3):  # the trace is complete (prefetching and the reuse rule on) from the second step
        peak[0] = 0
        engine.backward(combine(engine(**batch), counts, 0.5))
        engine.step()
    decoder = sum(p.numel() for n, p in model.t5.decoder.named_parameters() if "embed_tokens" not in n)
    print("PEAK", json.dumps({"stacked": stacked, "backward": peak[0], "total": total, "decoder": decoder}), flush=True)
'''


def test_zero3_releases_parameters_as_the_backward_goes(tmp_path):
    """A ZeRO-3 engine (one process, fp32, gloo) with the trainer's sizes on the distillation objective: the most
    parameter elements held gathered during a backward, from DeepSpeed's own status flags, nothing kept whole
    anyway (persistence threshold 0). A module called twice per forward ends every backward gathered: each call
    resets its count of pending gradients, so after the second call's backward its first call's backward never
    brings the count to 0 and it is never released. The layout outside ZeRO-3 runs the decoder once per task, so
    at least the decoder stays gathered; one pass (the stacked batch the trainer uses under ZeRO-3) releases as it
    goes. (At world size 1 a gather aliases the shard, so this counts the bookkeeping, which is the same at any
    world size.)"""
    from mindmirror.tools.launching import free_port

    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds.pop("bf16")
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1,
              gradient_clipping=1.0, optimizer={"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}})
    proc = subprocess.run([sys.executable, "-c", GATHER_PROBE, str(free_port()), json.dumps(ds)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**launch_env(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = {r["stacked"]: r for r in (json.loads(line[5:]) for line in proc.stdout.splitlines()
                                       if line.startswith("PEAK "))}
    assert peaks[False]["decoder"] <= peaks[False]["backward"] < peaks[False]["total"]  # the decoder, called twice
    assert peaks[True]["backward"] < 0.15 * peaks[True]["total"]  # one pass: a few modules at a time


GENERATION_PROBE = r'''
import contextlib, json, os, sys
import torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from transformers import T5ForConditionalGeneration
from mindmirror.model import model_config, untie_lm_head
from mindmirror.core.objective import DistillationObjective
from mindmirror.core.runtime import zero3_generation

deepspeed.init_distributed("gloo")
torch.manual_seed(0)
model = DistillationObjective(untie_lm_head(T5ForConditionalGeneration(model_config("tiny", 640))))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=json.loads(sys.argv[2]))
coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
t5 = engine.module.t5.eval()
ids = torch.randint(3, 600, (4, 20), generator=torch.Generator().manual_seed(0))
for hooks in (False, True):
    texts = []
    with zero3_generation(engine, t5) if hooks else contextlib.nullcontext(), torch.no_grad():
        for batch in range(2):
            out = t5.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, synced_gpus=True)
            texts.append(out.tolist())
            complete = coordinator.is_complete_trace()  # after a batch: the trace it prefetches from
    print("GEN", json.dumps({"hooks": hooks, "complete": complete, "out": texts}), flush=True)
'''


def test_zero3_generation_prefetches_from_a_trace(tmp_path):
    """Generation under ZeRO-3 (one process, gloo) with :func:`mindmirror.core.runtime.zero3_generation`: each
    generated token is a step of DeepSpeed's parameter trace, so the trace is complete and parameters are
    prefetched from it; called on the engine's child model without it, the whole generation is one step that
    matches no trace (no prefetch). The outputs are the same."""
    from mindmirror.tools.launching import free_port

    ds = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    proc = subprocess.run([sys.executable, "-c", GENERATION_PROBE, str(free_port()), json.dumps(ds)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=launch_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["hooks"]: r for r in (json.loads(line[4:]) for line in proc.stdout.splitlines()
                                    if line.startswith("GEN "))}
    assert runs[True]["complete"] and not runs[False]["complete"]
    assert runs[True]["out"] == runs[False]["out"]
