"""A training step never waits on the device (issue 22, finding 5): between logging steps the loop's step
functions read nothing back from the device. Counted in a real one-process run of the loop on CPU, inside the
step functions only (collation, the stop vote, the step, the log line), with a ``TorchDispatchMode`` counting
``aten._local_scalar_dense`` (what ``.item()``, ``float()``, ``bool()`` and ``int()`` of a tensor dispatch to)
and a ``TorchFunctionMode`` counting the calls that copy a tensor to the host (``.cpu()``, ``.tolist()``,
``.numpy()``). On CPU no copy really happens; these are the calls that would wait for a GPU.

Left out, by identity: AdamW's step counters, which live on the host unless the optimizer is fused or
capturable (their ``.item()`` reads host memory on a GPU too)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FAST, launch_env

pytestmark = pytest.mark.slow

PROBE = r'''
import json, sys
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from mindmirror.core import build, loop
from mindmirror.config import parse_args

if sys.argv[1] == "foreach":  # a non-fused AdamW (as a run saved by one resumes), in place of the trainer's fused
    build_default = build.build_optimizer

    def build_foreach(cfg, model, ds_config):
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                  for g in build_default(cfg, model, ds_config).param_groups]
        return torch.optim.AdamW(groups, foreach=True)

    build.build_optimizer = build_foreach


def adam_step_counter(t) -> bool:
    """One of AdamW's step counts, which stay on the host unless it is fused or capturable."""
    return not optimizer.defaults.get("fused") and t.device.type == "cpu" and t.dim() == 0 and \
        any(s.get("step") is t for s in optimizer.state.values())


class Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not adam_step_counter(args[0]):
            self.n += 1
        return func(*args, **(kwargs or {}))


class Copies(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy):
            self.n += 1
        return func(*args, **(kwargs or {}))


class Bar:
    def set_postfix(self, **_):
        pass


run = build.setup(parse_args(sys.argv[2:]))
trainer = loop.Trainer(run)
optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
per_step = []
with trainer:
    trainer.start()
    for rows in trainer.epoch_rows():
        reads, copies = Reads(), Copies()
        with reads, copies:
            batch = trainer.collate_step(rows)
            assert not trainer.stop_agreed()
            trainer.train_step(batch)
            trainer.maybe_log(Bar())
            trainer.vote_on_stop()
        per_step.append({"step": trainer.state.step, "reads": reads.n, "copies": copies.n})
print("RESULT", json.dumps({"per_step": per_step, "finite": all(bool(torch.isfinite(p).all())
                                                                for p in run.objective.parameters()),
                            "schedule_steps": run.scheduler.last_epoch, "nonfinite": trainer.state.nonfinite_steps}))
'''

LOGGING = 3
ARGS = FAST + ["--batch_size", "8", "--max_steps", "6", "--eval_steps", "0", "--logging_steps", str(LOGGING)]


def probe(tmp_path, optimizer: str) -> tuple[dict, list[dict]]:
    out = tmp_path / optimizer
    # Step 2's loss is NaN: a skipped step whose skip a step without reads notices only at the log line.
    proc = subprocess.run([sys.executable, "-c", PROBE, optimizer] + ARGS + ["--output_dir", str(out)], cwd=tmp_path,
                          env=launch_env(tmp_path) | {"MINDMIRROR_FAULT_NAN_STEPS": "2"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return result, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_the_skip(result, metrics):
    """Step 2 was skipped and counted, nothing non-finite reached the weights, the schedule was held for it."""
    assert result["nonfinite"] == 1 and result["finite"]
    assert [m["step"] for m in metrics if "nonfinite_skipped" in m] == [2]
    assert result["schedule_steps"] == 5  # 6 steps, one skipped
    assert [m["step"] for m in metrics if "loss" in m] == [3, 6]


def test_no_host_read_between_logging_steps(tmp_path):
    """With the trainer's fused AdamW a non-finite step is skipped on the device, and the loop reads the steps'
    finiteness and gradient norm at the log line: 0 reads and 0 copies in every other step."""
    result, metrics = probe(tmp_path, "default")
    for s in result["per_step"]:
        if s["step"] % LOGGING:
            assert s["reads"] == 0 and s["copies"] == 0, result["per_step"]
        else:  # the log line: the losses' sum over ranks, the flags, the norm
            assert 0 < s["reads"] + s["copies"] <= 4, result["per_step"]
    check_the_skip(result, metrics)


def test_a_non_fused_optimizer_reads_only_the_finiteness_before_its_step(tmp_path):
    """torch's foreach AdamW (a run saved by one resumes with it) cannot skip a step on the device: the loop
    reads the norm's finiteness before stepping, and nothing else."""
    result, metrics = probe(tmp_path, "foreach")
    for s in result["per_step"]:
        if s["step"] % LOGGING:
            assert s["reads"] == 1 and s["copies"] == 0, result["per_step"]
    check_the_skip(result, metrics)
