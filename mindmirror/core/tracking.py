"""What a run records as it goes: the sums of a log window (:class:`LogWindow`) and the one writer of
``metrics.jsonl`` and the trackers (:class:`MetricsLog`): every training, evaluation and test line goes through
it, so the file and the trackers (TensorBoard, wandb, ...) hold the same values."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mindmirror.core.build import Run
from mindmirror.core.flops import mfu
from mindmirror.core.objective import combine
from mindmirror.core.runtime import peak_memory_mb

if TYPE_CHECKING:
    from accelerate import Accelerator


class MetricsLog:
    """Lines of ``metrics.jsonl`` (the main process, once :meth:`open` names the file) and the trackers' values
    (Accelerate logs them on the main process)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.file = None

    def open(self, path: Path) -> None:
        self.file = open(path, "a")  # noqa: SIM115  (one handle for every line of the run, until close())

    def write(self, record: dict) -> None:
        """One line: ``step``, ``split`` (``train`` when absent) and its values."""
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.accelerator.log({f"{record.get('split', 'train')}/{k}": v for k, v in record.items()
                              if isinstance(v, (int, float)) and k not in ("step", "split")}, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class LogWindow:
    """What is summed between two log lines: this rank's loss sums (on the device, read only at log time),
    the steps' global target-token counts (host integers), tokens seen by all ranks, model FLOPs and steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums, self.counts = torch.zeros(2, device=self.device), np.zeros(2, dtype=np.int64)
        self.tokens = self.flops = self.steps = 0
        self.t0 = time.time()

    def add(self, sums: torch.Tensor, counts: np.ndarray, tokens: int, flops: int) -> None:
        self.sums += sums
        self.counts += counts
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def record(self, run: Run, step: int, lr: float, grad_norm: float, peak: float | None) -> dict:
        """The log line of the window (each task's loss averaged over every rank's tokens, and the objective's
        combination of them); starts a new window."""
        sums = run.accelerator.reduce(self.sums, reduction="sum").cpu()
        counts = torch.tensor(self.counts, dtype=torch.float32)
        means = sums / counts.clamp(min=1)
        label, rationale, loss = torch.cat([means, combine(sums, counts, run.alpha).reshape(1)]).tolist()
        elapsed = time.time() - self.t0
        record = {"step": step, "loss": loss, "label_loss": label,
                  "rationale_loss": rationale, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": self.tokens / elapsed, "samples_per_s": self.steps * run.global_batch / elapsed,
                  "model_flops_per_s": self.flops / elapsed, "peak_mem_mb": peak_memory_mb()}
        achieved = mfu(self.flops / elapsed / run.world, peak)
        if achieved is not None:
            record["mfu"] = achieved
        self.reset()
        return record
