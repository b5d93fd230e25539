"""The stand-ins of mindmirror.speedups compute what the stock T5 pieces compute: the dropout keeps 1 - p of its
input, scaled, from torch's seed; the norm and the GELU match transformers' own to float rounding; the cross-entropy
is torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.t5.modeling_t5 import T5LayerNorm

from mindmirror.model import load_model, load_tokenizer
from mindmirror.speedups import ATTENTION, Dropout, RMSNorm, attention, keep_mask, token_cross_entropy


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_mask_keeps_one_minus_p_and_follows_torchs_seed(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400, 1001]), p)  # an odd count: the last 32-bit draw is half used
    assert mask.dtype == torch.bool and mask.shape == (400, 1001)
    assert mask.float().mean().item() == pytest.approx(1 - p, abs=0.003)  # ~10 standard deviations at p=0.5
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size([400, 1001]), p), mask)  # seeding torch repeats the mask
    assert not torch.equal(keep_mask(torch.Size([400, 1001]), p), mask)  # and the next draw is another one
    assert keep_mask(torch.Size([64]), 0.0).all() and not keep_mask(torch.Size([64]), 1.0 - 1e-12).any()


def test_dropout_scales_what_it_keeps_and_passes_the_gradient_through_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(50, 64, requires_grad=True)
    dropout = Dropout(0.25).train()
    y = dropout(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_token_cross_entropy_is_torchs_and_its_gradient_too():
    torch.manual_seed(2)
    logits, targets, weights = torch.randn(37, 1000) * 4, torch.randint(1000, (37,)), torch.rand(37)

    def loss_and_grad(cross_entropy):
        x = logits.clone().requires_grad_()
        losses = cross_entropy(x, targets)
        (losses * weights).sum().backward()
        return losses.detach(), x.grad

    ours, ours_grad = loss_and_grad(token_cross_entropy)
    theirs, theirs_grad = loss_and_grad(lambda x, t: F.cross_entropy(x, t, reduction="none"))
    assert torch.equal(ours, theirs)  # the same log-softmax, read at the targets
    assert torch.allclose(ours_grad, theirs_grad, rtol=1e-6, atol=1e-8)
    assert (ours_grad.sum(1)).abs().max() < 1e-6  # softmax * g less g at the target: each row sums to zero
    x = logits.clone().requires_grad_()
    losses = token_cross_entropy(x, targets).sum()
    losses.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        losses.backward()  # its saved tensor became the gradient: a second pass fails loudly, never silently


def test_rms_norm_is_t5s_norm():
    torch.manual_seed(2)
    stock, fused = T5LayerNorm(96, eps=1e-6), T5LayerNorm(96, eps=1e-6)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        fused.weight.copy_(stock.weight)
    fused.__class__ = RMSNorm
    x = torch.randn(7, 11, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = stock(x), fused(x2)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stock.weight.grad, fused.weight.grad, rtol=1e-5, atol=1e-5)
    fused.to(torch.bfloat16)  # a half-precision weight takes T5's own path
    stock.to(torch.bfloat16)
    assert torch.equal(fused(x.detach()), stock(x.detach()))


def test_the_model_gets_every_stand_in_and_keeps_its_outputs(tmp_path):
    tok = load_tokenizer("", "t5-v1_1-small", True)
    torch.manual_seed(3)
    stock = load_model("tiny", tok, True, speedups=False).eval()
    torch.manual_seed(3)
    fast = load_model("tiny", tok, True).eval()
    kinds = {type(m) for m in fast.modules()}
    assert RMSNorm in kinds and T5LayerNorm not in kinds and NewGELUActivation not in kinds
    assert all(type(m) is not torch.nn.Dropout for m in fast.modules())
    assert fast.config._attn_implementation == ATTENTION and stock.config._attn_implementation == "sdpa"
    fast.save_pretrained(tmp_path)  # an export names no attention of mindmirror's: it loads where none is registered
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    ids = torch.randint(3, 100, (3, 9))
    a = stock(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    b = fast(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


class _Attention(torch.nn.Module):
    is_causal = False


@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_the_math_kernels_with_the_dropout_of_keep_mask(causal):
    """In training on CPU: softmax(scores + position bias where the mask allows) dropped by keep_mask's mask,
    times the values, with the gradients of that formula; in evaluation: transformers' sdpa itself, to the bit."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(3, 2, 5, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, requires_grad=True)
    mask = None if causal else torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()[:, None, None]
    module = _Attention().train()
    module.is_causal = causal
    torch.manual_seed(5)
    out, _ = attention(module, q, k, v, mask, dropout=0.4, scaling=1.0, position_bias=bias)
    out.square().sum().backward()
    ours = [out.detach(), q.grad, bias.grad]
    torch.manual_seed(5)
    keep = keep_mask(torch.Size([3, 2, 5, 5]), 0.4)  # the draw attention made
    allowed = torch.ones(5, 5).tril().bool() if causal else mask
    q.grad = bias.grad = None
    scores = (q @ k.transpose(2, 3) + torch.where(allowed, bias, torch.finfo(torch.float32).min)).softmax(-1)
    ref = (scores * keep / 0.6 @ v).transpose(1, 2)
    ref.square().sum().backward()
    for a, b in zip(ours, [ref.detach(), q.grad, bias.grad], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    module.eval()  # no dropout: sdpa_attention_forward, the same call
    assert torch.equal(attention(module, q, k, v, mask, dropout=0.0, scaling=1.0, position_bias=bias)[0],
                       sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=1.0, position_bias=bias)[0])
