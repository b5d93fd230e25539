"""Faster stand-ins for two pieces of the stock transformers T5, the same functions in less time.

``mindmirror.model.load_model`` applies both (``speedups=False`` keeps the stock model, as the
benchmark's baseline does). Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation


def fused_gelu(model):
    """Run t5-v1_1's ``gelu_new`` (tanh GELU written as five Python-level tensor ops) as torch's one
    fused kernel, ``gelu(approximate="tanh")``: the same function to float rounding, in less time and
    with two saved tensors per FFN instead of five. The config records the change, so exports load
    with it."""
    if getattr(model.config, "dense_act_fn", None) != "gelu_new":
        return model
    for module in model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = GELUTanh()
    model.config.dense_act_fn = "gelu_pytorch_tanh"
    return model


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is drawn as 24-bit integers: torch's CPU ``bernoulli_`` took 12% of
    a t5-v1_1-small training step on 2 cores, this about half of that. The keep probability is
    ``1 - p`` to within 2**-24, the mask is kept for the backward pass as 1 byte per element instead
    of 4, and it comes from torch's default generator, so seeding and resuming work as before. On GPU
    it is plain ``F.dropout``."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        if self.p >= 1:
            return x * 0
        keep = torch.empty(x.shape, dtype=torch.int32).random_(0, 2 ** 24) >= int(self.p * 2 ** 24)
        return x.mul(keep).mul_(1 / (1 - self.p))


def fast_dropout(model):
    """Swap every ``nn.Dropout`` of ``model`` for :class:`Dropout` (same probability)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, Dropout(child.p, child.inplace))
    return model
