"""Where a training step's time goes: the benchmark's per-step split of any training loop into data, forward,
backward, clipping, optimizer and the rest, plus the host reads of tensors made along the way.

:class:`StepClock` wraps timers around the calls every loop it measures makes, in the process that trains: the
collator (data), the model's forward (forward), ``torch.autograd.backward`` (backward), Accelerate's
``clip_grad_norm_`` (clip), and torch's global optimizer-step hooks (optimizer; the end of each step's window).
What is left of a step's window is "other": the loop's own bookkeeping, the lr schedule, ``zero_grad``, logging
and, for a loop that fetches rows outside its collator, that fetching. Host reads (``item``, ``tolist``, ``bool``,
``int`` and ``float`` of a tensor) are counted and timed where they happen, so their time is part of the phase
they happen in; on a CPU they cost only the call, on a GPU each waits for the device to finish what is queued.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

PHASES = ("data", "forward", "backward", "clip", "optimizer", "other")
READS = ("item", "tolist", "__bool__", "__int__", "__float__")


class StepClock:
    """Collects ``(phase, start, end)`` intervals from the wrappers it installs; :meth:`split` turns them into
    per-step seconds. Use as a context manager (the wrappers are removed on exit)."""

    def __init__(self):
        self.intervals: list[tuple[str, float, float]] = []
        self.step_ends: list[float] = []
        self.reads: list[tuple[float, float]] = []
        self._undo: list = []
        self._in_read = False

    def wrap(self, owner, name: str, phase: str) -> None:
        """Time every call of ``owner.name`` (a class's method or a module's function) as ``phase``."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.intervals.append((phase, start, time.perf_counter()))

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def _wrap_read(self, name: str) -> None:
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, **kwargs):
            if self._in_read:  # a read inside a read (tolist of a 0-d tensor calls item ...) counts once
                return original(tensor, *args, **kwargs)
            self._in_read, start = True, time.perf_counter()
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._in_read = False
                self.reads.append((start, time.perf_counter()))

        setattr(torch.Tensor, name, read)
        self._undo.append(lambda: setattr(torch.Tensor, name, original))

    def __enter__(self) -> StepClock:
        import accelerate

        self.wrap(torch.autograd, "backward", "backward")
        self.wrap(accelerate.Accelerator, "clip_grad_norm_", "clip")
        starts: list[float] = []
        pre = register_optimizer_step_pre_hook(lambda *a: starts.append(time.perf_counter()))

        def post(*a):
            end = time.perf_counter()
            self.intervals.append(("optimizer", starts.pop(), end))
            self.step_ends.append(end)

        post_handle = register_optimizer_step_post_hook(post)
        self._undo += [pre.remove, post_handle.remove]
        for name in READS:
            self._wrap_read(name)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def split(self, skip: int = 0) -> dict[str, float]:
        """Mean seconds per step of each phase over the steps after the first ``skip`` (a step's window runs from
        the end of the previous optimizer step to the end of its own), with ``host_reads`` (mean reads per step)
        and ``host_read_s`` (their mean seconds per step, inside the phases)."""
        ends = self.step_ends
        windows = list(zip(ends[skip:-1], ends[skip + 1:], strict=True))
        if not windows:
            raise ValueError(f"{len(ends)} optimizer steps recorded: too few to time after skipping {skip}")
        per_step = []
        for start, end in windows:
            inside = [(phase, b - a) for phase, a, b in self.intervals if start < b <= end]
            row = {phase: sum(d for p, d in inside if p == phase) for phase in PHASES[:-1]}
            row["other"] = (end - start) - sum(row.values())
            reads = [b - a for a, b in self.reads if start < b <= end]
            row["host_reads"], row["host_read_s"] = len(reads), sum(reads)
            row["step"] = end - start
            per_step.append(row)
        return {key: statistics.fmean(row[key] for row in per_step) for key in per_step[0]}
