"""The FLOPs of the T5 students' training and the peak they are measured against: what the trainer's log lines
count (``model_flops_per_s``, ``mfu``) and what ``mindmirror.tools.estimate`` and the scaling study use.

FLOPs are matmul FLOPs (``2*m*n*k`` per product), exactly what ``torch.utils.flop_counter.FlopCounterMode``
counts for transformers' *eager* T5 attention: the embedding look-ups, the relative position bias, norms,
softmax and the loss count nothing. Attention scores and ``probs @ V`` are counted in full (the eager
kernel computes the masked half of the causal decoder too). Training FLOPs are 3x forward (the backward
of every matmul is two matmuls of the same size); gradient-checkpointing recomputation is *not* counted,
so MFU from these figures is model FLOPs utilisation. Only a config's attributes are read (``d_model``,
``d_kv``, ``d_ff``, ``num_heads``, ``num_layers``, ``num_decoder_layers``, ``vocab_size``,
``feed_forward_proj``), so a ``transformers.T5Config`` or any stand-in object works.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

PEAK_FLOPS_ENV = "MINDMIRROR_PEAK_FLOPS"

# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s from NVIDIA's data sheets; "fp32" is the plain
# (non-tensor-core) rate that fp32 matmuls get with torch's default allow_tf32=False. Order matters:
# the first name fragment found in the device name wins.
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIE", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM ("H100 80GB HBM3")
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # also GH200
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),  # A10 data sheet; A10G too
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2; no bf16 tensor cores
)


# ---------------------------------------------------------------------------------------------
# what the count reads from a config


def inner_dim(c) -> int:
    """The attention's inner width: ``num_heads x d_kv``."""
    return c.num_heads * c.d_kv


def decoder_layers(c) -> int:
    """The decoder's layers (``num_layers`` where the config gives no ``num_decoder_layers``)."""
    n = getattr(c, "num_decoder_layers", None)
    return c.num_layers if n is None else n


def gated(c) -> bool:
    """Whether the feed-forward is gated (t5-v1_1's ``gated-gelu``: ``wi_0`` and ``wi_1``)."""
    return str(c.feed_forward_proj).startswith("gated-")


def ffn_matrices(c) -> int:
    """The feed-forward's matrices in one layer: three gated, two plain."""
    return 3 if gated(c) else 2


# ---------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(config, enc_len: int, dec_len: int, target_tokens: int | None = None, batch: int = 1) -> int:
    """Matmul FLOPs of one forward of one task on ``batch`` rows padded to ``enc_len``/``dec_len``.

    Encoder: q/k/v/o projections, ``Q K^T`` and ``P V`` over all ``enc_len x enc_len`` pairs, FFN.
    Decoder: the same for self-attention (full ``dec_len x dec_len``, as the eager kernel computes it),
    cross-attention (q/o on decoder tokens, k/v on encoder tokens, ``dec_len x enc_len`` scores) and FFN;
    ``lm_head`` on ``target_tokens`` positions only (default ``batch * dec_len``), as
    :class:`~mindmirror.core.objective.DistillationObjective` projects only real targets.
    Equals ``FlopCounterMode``'s count for an eager-attention forward. (With ``sdpa``, transformers'
    default, CUDA kernels are counted the same, but on CPU the fused ``_scaled_dot_product_flash_attention_for_cpu``
    used for cross-attention has no FLOP formula and FlopCounterMode silently counts 0 for it.)
    """
    d, inner, ff, h, dk = config.d_model, inner_dim(config), config.d_ff, config.num_heads, config.d_kv
    e, t = batch * enc_len, batch * dec_len
    targets = t if target_tokens is None else target_tokens
    ffn_mats = ffn_matrices(config)

    def scores(q_len: int, k_len: int) -> int:  # Q K^T and P V
        return 2 * (2 * batch * h * q_len * k_len * dk)

    encoder_layer = 2 * e * d * inner * 4 + scores(enc_len, enc_len) + 2 * e * d * ff * ffn_mats
    decoder_layer = (2 * t * d * inner * 4 + scores(dec_len, dec_len)
                     + 2 * t * d * inner * 2 + 2 * e * d * inner * 2 + scores(dec_len, enc_len)
                     + 2 * t * d * ff * ffn_mats)
    return (config.num_layers * encoder_layer + decoder_layers(config) * decoder_layer
            + 2 * targets * d * config.vocab_size)


def _as_list(value, n: int) -> list:
    if isinstance(value, Sequence):
        return list(value)
    return [value] * n


def training_flops(config, enc_lens: int | Sequence[int], dec_lens: int | Sequence[int],
                   target_tokens: int | Sequence[int] | None = None, batch: int = 1) -> int:
    """Forward + backward matmul FLOPs: 3x :func:`forward_flops` (backward = 2x forward).

    With ints: one padded batch of ``batch`` rows. With sequences: one entry per row at its own (unpadded)
    lengths, summed; ``target_tokens`` then gives each row's real targets (default: its ``dec_len``).
    """
    if not isinstance(enc_lens, Sequence) and not isinstance(dec_lens, Sequence):
        return 3 * forward_flops(config, enc_lens, dec_lens, target_tokens, batch)
    n = len(enc_lens) if isinstance(enc_lens, Sequence) else len(dec_lens)
    encs, decs, targets = _as_list(enc_lens, n), _as_list(dec_lens, n), _as_list(target_tokens, n)
    if not len(encs) == len(decs) == len(targets):
        raise ValueError("enc_lens, dec_lens and target_tokens must have the same length")
    return sum(3 * forward_flops(config, e, d, t) for e, d, t in zip(encs, decs, targets, strict=True))


def sample_flops(config, enc_len: int, dec_len: int, rationale_enc_len: int = 0, rationale_dec_len: int = 0,
                 training: bool = True) -> int:
    """FLOPs of one distillation sample: the answer task plus, when its lengths are > 0, the rationale task.

    All decoder positions are taken as real targets; ``training`` gives forward + backward, else forward.
    """
    flops = forward_flops(config, enc_len, dec_len)
    if rationale_enc_len > 0 and rationale_dec_len > 0:
        flops += forward_flops(config, rationale_enc_len, rationale_dec_len)
    return 3 * flops if training else flops


def peak_flops(device: str | None = None, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one accelerator for ``dtype`` ("bf16", "fp16", "tf32", "fp32"), or None.

    ``MINDMIRROR_PEAK_FLOPS`` (FLOP/s, a float) always wins. Otherwise ``device`` is a device name such as
    ``"NVIDIA H100 80GB HBM3"`` or a torch device string (``"cuda:1"``; default: the current CUDA device when
    there is one), matched against known NVIDIA parts; CPUs, unknown devices and unsupported dtypes (bf16
    on V100) give None.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        return float(override)
    if device is None or device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        device = torch.cuda.get_device_name(device)
    name = device.upper()
    for fragment, peaks in _PEAKS:
        if fragment in name:
            return peaks.get(dtype)
    return None


def mfu(achieved_flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak, or None when the peak is unknown."""
    if not peak or peak <= 0:
        return None
    return achieved_flops_per_s / peak
