"""The benchmark's per-step time split (mindmirror.tools.stepclock) on a small hand-written loop: each phase lands
where it happened, the phases add up to the step, host reads are counted once each, and nothing stays
wrapped afterwards."""

from __future__ import annotations

import time

import pytest
import torch
from accelerate import Accelerator

from mindmirror.tools.stepclock import PHASES, StepClock


class Collate:
    def __call__(self, n):
        time.sleep(0.02)
        return torch.randn(n, 8)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 1)

    def forward(self, x):
        time.sleep(0.01)
        return self.linear(x).square().mean()


def test_each_phase_is_timed_where_it_happens_and_the_wrappers_come_off():
    originals = (torch.Tensor.item, torch.Tensor.__bool__, torch.autograd.backward, Accelerator.clip_grad_norm_)
    accelerator, model = Accelerator(cpu=True), Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    collate = Collate()
    with StepClock() as clock:
        clock.wrap(Collate, "__call__", "data")
        clock.wrap(Model, "forward", "forward")
        for _ in range(5):
            loss = model(collate(4))
            loss.backward()
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            assert loss.item() >= 0  # one host read a step
            if bool(loss > -1):  # and a second, through bool
                time.sleep(0.015)  # the loop's own work after the optimizer: "other"
    assert (torch.Tensor.item, torch.Tensor.__bool__, torch.autograd.backward, Accelerator.clip_grad_norm_) \
        == originals
    assert len(clock.step_ends) == 5

    split = clock.split(skip=1)  # 3 whole steps after the first one's end
    assert split["data"] >= 0.02 and split["forward"] >= 0.01 and split["other"] >= 0.015
    assert all(split[phase] > 0 for phase in PHASES)
    assert sum(split[phase] for phase in PHASES) == pytest.approx(split["step"])
    assert split["host_reads"] == 2
    assert 0 < split["host_read_s"] < split["step"]


def test_too_few_steps_to_time_is_an_error():
    clock = StepClock()
    clock.step_ends = [1.0, 2.0]
    with pytest.raises(ValueError, match="2 optimizer steps recorded"):
        clock.split(skip=1)
