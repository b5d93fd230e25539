"""Faster stand-ins for pieces of the stock transformers T5 and of torch, the same functions in less time.

``mindmirror.model.load_model`` applies them (``speedups=False`` keeps the stock model, as the
benchmark's baseline does). Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.models.t5.modeling_t5 import T5LayerNorm

ATTENTION = "mindmirror_sdpa"  # the attention implementation fast_attention registers and selects


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


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean mask of ``shape`` whose entries are True (kept) with probability ``1 - p`` (to within 2**-32).

    Drawn as 32-bit integers from numpy's PCG64, seeded by one draw from torch's default generator, so seeding
    and resuming work as with torch's own draws: PCG64 makes 64 bits in ~2 ns, against ~3.6 ns for each of
    torch's CPU ``random_`` integers (mt19937, one thread) and ~5 ns for ``bernoulli_``."""
    n = math.prod(shape)
    seed = int(torch.randint(2 ** 63 - 1, (), dtype=torch.int64))
    bits = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 1) // 2)
    draws = torch.from_numpy(bits.view(np.int32)[:n]).view(shape)  # uniform over [-2**31, 2**31)
    return draws >= min(round(p * 2 ** 32) - 2 ** 31, 2 ** 31 - 1)  # dropped: the lowest p of that range


class MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` (``keep`` boolean) as one pass over ``x`` in each direction, where autograd's
    ``x.mul(keep).mul_(scale)`` makes two: 1.9 instead of 2.9 ms forward and backward for 1.3M elements on 2 cores.
    Equal to the bit (``keep`` is 0 or 1, so the product with it is exact)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, keep, value=scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from :func:`keep_mask` (torch's CPU ``bernoulli_`` took 12% of a
    t5-v1_1-small training step on 2 cores), applied by :class:`MaskedScale` and kept for the backward pass as 1
    byte per element instead of 4. On GPU it is plain ``F.dropout``."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        if self.p >= 1:
            return x * 0
        return MaskedScale.apply(x, keep_mask(x.shape, self.p), 1 / (1 - self.p))


def fast_dropout(model):
    """Swap every ``nn.Dropout`` of ``model`` for :class:`Dropout` (same probability)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, Dropout(child.p, child.inplace))
    return model


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None,
              is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention, except when a T5 attention trains on CPU with dropout: there the same
    function as torch's math kernel (the position bias and the mask added to the scores, softmax, dropout, the
    values) in fewer passes. The math kernel scales the queries and keys by the square root of a scale of 1,
    checks every row for all-masked scores (none is: the mask holds the dtype's minimum, not -inf) and draws its
    dropout with ``bernoulli_`` into a float tensor that it divides and multiplies; here the mask is added in place
    to the scores and the dropout is :class:`Dropout`'s (:func:`keep_mask`, :class:`MaskedScale`). Without dropout
    the output and gradients equal the kernel's to the bit in our checks. Elsewhere (evaluation, GPU) it is
    ``sdpa_attention_forward`` itself."""
    if not (module.training and dropout > 0 and query.device.type == "cpu" and position_bias is not None) \
            or getattr(module, "num_key_value_groups", 1) > 1 or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_bias=position_bias, is_causal=is_causal, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal  # as sdpa_attention_forward decides
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling is not None and scaling != 1.0:
        scores = scores.mul_(scaling)
    scores = scores.add_(create_position_bias_mask(position_bias, attention_mask, is_causal, query, key))
    probs = torch.softmax(scores, dim=-1)
    probs = MaskedScale.apply(probs, keep_mask(probs.shape, dropout), 1 / (1 - dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def fast_attention(model):
    """Select :func:`attention` for a model that uses ``sdpa`` (registered with transformers under
    :data:`ATTENTION`, with sdpa's masks; the choice is not saved with the model's config)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return model
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    return model


class RMSNorm(T5LayerNorm):
    """T5's layer norm (a root-mean-square norm, no mean subtracted, no bias) through torch's fused ``rms_norm``
    where the weight is fp32: the same function (forward equal to the last bit on CPU in our checks) as T5's seven
    tensor ops, with fewer tensors kept for the backward pass. A bf16 or fp16 weight takes T5's own path, which
    rounds the normalised input to the weight's dtype before scaling it."""

    def forward(self, hidden_states):
        if self.weight.dtype != torch.float32:
            return super().forward(hidden_states)
        return F.rms_norm(hidden_states.float(), self.weight.shape, self.weight, self.variance_epsilon)


def fused_rms_norm(model):
    """Make every ``T5LayerNorm`` of ``model`` an :class:`RMSNorm` (same weight, same epsilon)."""
    for module in model.modules():
        if type(module) is T5LayerNorm:
            module.__class__ = RMSNorm
    return model


class TokenCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, targets, reduction="none")`` (rows x vocabulary logits, every target a real token),
    equal in the forward to the bit and in the gradient to within an ulp, in about half the time and memory passes.

    torch's cross-entropy backward first zero-fills a logits-sized gradient of the log-probabilities and scatters
    the targets' gradients into it (``nll_loss_backward``), then reads it and the saved log-probabilities to write
    the logits' gradient (``log_softmax_backward``): three passes over a 1,100 x 32,128 tensor at batch 16. Here the
    gradient is written into the saved log-probabilities themselves, ``softmax * g`` less ``g`` at each target:
    one exponential and one scaling pass, in place (nothing else holds that tensor)."""

    @staticmethod
    def forward(ctx, logits, targets):
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, targets)
        return log_probs.gather(1, targets[:, None]).squeeze(1).neg()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        log_probs, targets = ctx.saved_tensors  # a second backward through this graph fails autograd's version check
        grad = grad[:, None].to(log_probs.dtype)
        logits_grad = log_probs.exp_().mul_(grad)
        return logits_grad.scatter_add_(1, targets[:, None], grad.neg()), None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each row of ``logits`` at its target (:class:`TokenCrossEntropy`)."""
    return TokenCrossEntropy.apply(logits, targets)
