"""Analytic size, FLOP and memory figures for the T5 students (t5-v1_1 style), from a config alone.

Everything here reads only these config attributes: ``d_model``, ``d_kv``, ``d_ff``, ``num_heads``,
``num_layers``, ``num_decoder_layers``, ``vocab_size``, ``relative_attention_num_buckets``,
``feed_forward_proj``, ``tie_word_embeddings`` (overridden by transformers 5's ``scale_decoder_outputs``
where present, see :func:`tied_lm_head`) and ``dropout_rate`` for activation memory, so a
``transformers.T5Config`` or any stand-in object works and nothing is built or downloaded.

FLOPs are matmul FLOPs (``2*m*n*k`` per product), exactly what ``torch.utils.flop_counter.FlopCounterMode``
counts for transformers' *eager* T5 attention: the embedding look-ups, the relative position bias, norms,
softmax and the loss count nothing. Attention scores and ``probs @ V`` are counted in full (the eager
kernel computes the masked half of the causal decoder too). Training FLOPs are 3x forward (the backward
of every matmul is two matmuls of the same size); gradient-checkpointing recomputation is *not* counted,
so MFU from these figures is model FLOPs utilisation.

Memory follows the ZeRO paper's accounting of model states plus the tensors autograd saves for the
backward pass; see :func:`memory_per_rank` for the conventions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

GIB = 2 ** 30
INDEX_BYTES = 8  # int64 token ids, position buckets and target indices saved for the backward pass
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
# architecture helpers


def _inner(c) -> int:
    return c.num_heads * c.d_kv


def _decoder_layers(c) -> int:
    n = getattr(c, "num_decoder_layers", None)
    return c.num_layers if n is None else n


def _gated(c) -> bool:
    return str(c.feed_forward_proj).startswith("gated-")


def _act(c) -> str:
    if getattr(c, "dense_act_fn", None):  # what the model runs (mindmirror.speedups.fused_gelu sets it)
        return c.dense_act_fn
    act = str(c.feed_forward_proj).split("-")[-1]
    return "gelu_new" if act == "gelu" and _gated(c) else act  # what T5Config does for "gated-gelu"


def _ffn_matrices(c) -> int:
    return 3 if _gated(c) else 2


def tied_lm_head(config) -> bool:
    """Whether ``lm_head`` shares the embedding matrix (original T5) rather than having its own (t5-v1_1).

    transformers 5's ``T5Config`` always sets ``tie_word_embeddings = True`` and records the checkpoint's
    own choice as ``scale_decoder_outputs`` (False for t5-v1_1, whose ``lm_head`` mindmirror unties, see
    :func:`mindmirror.model.untie_lm_head`), so that attribute decides when present.
    """
    scale = getattr(config, "scale_decoder_outputs", None)
    return bool(config.tie_word_embeddings if scale is None else scale)


# ---------------------------------------------------------------------------------------------
# parameters


def parameter_count(config) -> int:
    """Exact parameter count of ``T5ForConditionalGeneration(config)`` with its own ``lm_head``.

    Shared embedding (encoder and decoder use it), per layer q/k/v/o without bias, ``wi_0``/``wi_1``/``wo``
    (``wi``/``wo`` ungated), one RMS-norm weight per sub-layer and one final norm per stack, the relative
    attention bias (buckets x heads) in the first self-attention layer of each stack, cross-attention in
    the decoder, and ``lm_head`` unless :func:`tied_lm_head`.
    """
    d, inner, ff = config.d_model, _inner(config), config.d_ff
    attention = 4 * d * inner
    ffn = _ffn_matrices(config) * d * ff
    encoder = config.num_layers * (attention + ffn + 2 * d) + d
    decoder = _decoder_layers(config) * (2 * attention + ffn + 3 * d) + d
    bias = config.relative_attention_num_buckets * config.num_heads
    embeddings = config.vocab_size * d * (1 if tied_lm_head(config) else 2)
    return encoder + decoder + 2 * bias + embeddings


# ---------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(config, enc_len: int, dec_len: int, target_tokens: int | None = None, batch: int = 1) -> int:
    """Matmul FLOPs of one forward of one task on ``batch`` rows padded to ``enc_len``/``dec_len``.

    Encoder: q/k/v/o projections, ``Q K^T`` and ``P V`` over all ``enc_len x enc_len`` pairs, FFN.
    Decoder: the same for self-attention (full ``dec_len x dec_len``, as the eager kernel computes it),
    cross-attention (q/o on decoder tokens, k/v on encoder tokens, ``dec_len x enc_len`` scores) and FFN;
    ``lm_head`` on ``target_tokens`` positions only (default ``batch * dec_len``), as
    :class:`~mindmirror.objective.DistillationObjective` projects only real targets.
    Equals ``FlopCounterMode``'s count for an eager-attention forward. (With ``sdpa``, transformers'
    default, CUDA kernels are counted the same, but on CPU the fused ``_scaled_dot_product_flash_attention_for_cpu``
    used for cross-attention has no FLOP formula and FlopCounterMode silently counts 0 for it.)
    """
    d, inner, ff, h, dk = config.d_model, _inner(config), config.d_ff, config.num_heads, config.d_kv
    e, t = batch * enc_len, batch * dec_len
    targets = t if target_tokens is None else target_tokens
    ffn_mats = _ffn_matrices(config)

    def scores(q_len: int, k_len: int) -> int:  # Q K^T and P V
        return 2 * (2 * batch * h * q_len * k_len * dk)

    encoder_layer = 2 * e * d * inner * 4 + scores(enc_len, enc_len) + 2 * e * d * ff * ffn_mats
    decoder_layer = (2 * t * d * inner * 4 + scores(dec_len, dec_len)
                     + 2 * t * d * inner * 2 + 2 * e * d * inner * 2 + scores(dec_len, enc_len)
                     + 2 * t * d * ff * ffn_mats)
    return (config.num_layers * encoder_layer + _decoder_layers(config) * decoder_layer
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
    return sum(3 * forward_flops(config, e, d, t) for e, d, t in zip(encs, decs, targets))


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


# ---------------------------------------------------------------------------------------------
# activation memory


def _ffn_saved(c, dropout: bool) -> int:
    """How many ``tokens x d_ff`` tensors the FFN saves (excluding dropout masks)."""
    act = _act(c)
    if act == "gelu_new":  # 0.5*x*(1+tanh(...)) in Python: x, tanh, 0.5*x, 1+tanh, the GELU output
        return 7 if _gated(c) else 5  # + wi_1 output and the product (wo's input) when gated
    if act == "relu":  # relu saves its output, which is also the gate's / wo's input
        return 3 if _gated(c) else 1 + dropout
    return 4 if _gated(c) else 2  # an activation that saves its input (F.gelu, silu, ...)


def _task_activations(c, batch: int, enc_len: int, dec_len: int, targets: int, size: int, mask_size: int,
                      dropout: bool) -> dict[str, int]:
    """Saved-for-backward bytes of one task (encoder + decoder + head), split for checkpointing."""
    d, inner, ff, h, vocab = c.d_model, _inner(c), c.d_ff, c.num_heads, c.vocab_size
    upcast = 4 if size != 4 else 0  # RMSNorm saves an fp32 copy of a half-precision input
    e, t = batch * enc_len, batch * dec_len
    drop = int(dropout)

    def norm(n: int, out_saved: bool = True) -> int:  # input (+fp32 copy), normalised, output; rsqrt (fp32)
        return n * d * (2 * size + upcast + size * out_saved) + 4 * n

    def attention(q_len: int, k_len: int) -> int:
        n_q, n_k, pairs = batch * q_len, batch * k_len, batch * h * q_len * k_len
        saved = norm(n_q)  # its output feeds q, and k and v too unless cross-attention (they read the encoder)
        saved += (2 * n_q + 2 * n_k) * inner * size  # contiguous q, k, v copies for the bmm; o's input
        saved += pairs * size  # softmax output
        saved += drop * (pairs * (mask_size + size) + n_q * d)  # probs dropout (F.dropout); output dropout
        return saved

    def ffn(n: int) -> int:
        return norm(n) + n * ff * (_ffn_saved(c, dropout) * size + drop) + drop * n * d

    enc_block = attention(enc_len, enc_len) + ffn(e)
    dec_block = attention(dec_len, dec_len) + attention(dec_len, enc_len) + ffn(t)  # self, cross, FFN
    n_dec = _decoder_layers(c)
    # outside the blocks: token ids and embedding dropout, bucket ids, final norms (the encoder's output
    # is saved once for every cross-attention k/v), and the loss's inputs
    outside = (e + t) * INDEX_BYTES + drop * (e + t) * d
    outside += norm(e) + drop * e * d + norm(t, out_saved=False) + drop * t * d
    # the target positions (index_select's index), lm_head input, fp32 logits, targets; nll_loss's total weight
    outside += targets * (INDEX_BYTES + d * size + vocab * 4 + INDEX_BYTES) + 4
    buckets = (enc_len ** 2 + dec_len ** 2) * INDEX_BYTES
    # what checkpointed blocks keep: each block's input, the shared position biases and the masks
    kept = (c.num_layers * e + n_dec * t) * d * size
    kept += h * (enc_len ** 2 + dec_len ** 2 + dec_len * enc_len) * size
    kept += batch * (enc_len ** 2 + dec_len ** 2 + dec_len * enc_len) * size
    return {"full": c.num_layers * enc_block + n_dec * dec_block + outside + buckets,
            "checkpointed": outside + kept, "block": max(enc_block + enc_len ** 2 * INDEX_BYTES,
                                                         dec_block + dec_len ** 2 * INDEX_BYTES)}


def activation_bytes(config, micro_batch: int, enc_len: int, dec_len: int, precision: str = "bf16",
                     rationale: bool = True, rationale_enc_len: int | None = None,
                     rationale_dec_len: int | None = None, target_tokens: int | None = None,
                     rationale_target_tokens: int | None = None, gradient_checkpointing: bool = False,
                     dropout_mask_bytes: int = 1) -> int:
    """Bytes autograd keeps for the backward of one training micro-batch of the distillation objective.

    Both tasks run in one forward, so the answer task (``enc_len``/``dec_len``) and the rationale task
    (``rationale_enc_len``/``rationale_dec_len``, default the answer's) are alive together. Targets default
    to every decoder position. The model is transformers' eager T5 (see the module docstring); per layer:
    norm inputs/outputs (plus an fp32 copy under bf16) and rsqrt, contiguous q/k/v copies and o's input,
    softmax output ``b*h*Lq*Lk``, the FFN's GELU intermediates, dropout masks when ``dropout_rate > 0``
    (1 byte per element for the dropout modules, :class:`mindmirror.speedups.Dropout` on CPU and ``F.dropout``
    on CUDA; ``dropout_mask_bytes`` for the attention-probability dropout, which calls ``F.dropout``: 1 on
    CUDA, the compute dtype's size on CPU, where it saves a float mask), plus the lm_head input and fp32
    log-softmax of the targets only.

    ``precision``: "fp32" (4-byte tensors) or "bf16", meaning a bf16 model as DeepSpeed runs it (2-byte
    tensors, fp32 norm statistics and log-softmax). With ``gradient_checkpointing`` (transformers checkpoints
    each T5 block) the figure is what stays alive (each block's input, shared biases/masks, everything outside
    the blocks) plus one block's activations, recomputed at a time in the backward pass.

    Not modelled (by reading the code, not measured): transformers' default ``sdpa`` attention (what
    :func:`mindmirror.model.load_model` builds) keeps, on CUDA, a float bias-mask ``b*h*Lq*Lk`` per layer and
    the kernel output instead of the softmax output and dropout masks, so with dropout the eager figure is
    the larger; Accelerate's bf16 autocast (stage 0) keeps an fp32 residual stream, fp32 softmax/GELU
    intermediates and a bf16 copy of each Linear input, so it saves more than "bf16" here; transient
    gradient buffers of the backward pass (e.g. the logits' gradient) come on top of any of these.
    """
    size = {"fp32": 4, "bf16": 2}[precision]
    dropout = getattr(config, "dropout_rate", 0.0) > 0
    tasks = [(enc_len, dec_len, target_tokens)]
    if rationale:
        r_enc = enc_len if rationale_enc_len is None else rationale_enc_len
        r_dec = dec_len if rationale_dec_len is None else rationale_dec_len
        tasks.append((r_enc, r_dec, rationale_target_tokens))
    parts = [_task_activations(config, micro_batch, e, d, micro_batch * d if t is None else t, size,
                               dropout_mask_bytes, dropout) for e, d, t in tasks]
    if not gradient_checkpointing:
        return sum(p["full"] for p in parts)
    return sum(p["checkpointed"] for p in parts) + max(p["block"] for p in parts)


# ---------------------------------------------------------------------------------------------
# memory per rank


@dataclass
class MemoryEstimate:
    """Bytes on one GPU by kind; ``total`` is their sum; ``cpu_offloaded`` is host memory, not in total."""

    params: int
    grads: int
    optimizer: int
    activations: int
    cpu_offloaded: int = 0
    total: int = field(init=False)

    def __post_init__(self):
        self.total = self.params + self.grads + self.optimizer + self.activations

    def gib(self) -> dict[str, float]:
        """Every field in GiB."""
        names = ("params", "grads", "optimizer", "activations", "total", "cpu_offloaded")
        return {name: getattr(self, name) / GIB for name in names}


def _largest_gathered_unit(c) -> int:
    """Parameters ZeRO-3 gathers at once: the largest of one decoder block and an embedding matrix."""
    d, inner = c.d_model, _inner(c)
    block = 8 * d * inner + _ffn_matrices(c) * d * c.d_ff + 3 * d
    return max(block, c.vocab_size * d)


def memory_per_rank(config, zero_stage: int, world_size: int, offload: bool, precision: Literal["bf16", "fp32"],
                    micro_batch: int, enc_len: int, dec_len: int, rationale: bool = True,
                    gradient_checkpointing: bool = False, **activation_kwargs) -> MemoryEstimate:
    """Per-GPU memory of training with Adam(W) under DDP (stage 0) or DeepSpeed ZeRO ``zero_stage``.

    Model states per parameter (the ZeRO paper's accounting; N = ``world_size``):

    * fp32: parameters 4 B, gradients 4 B, Adam moments 8 B.
    * bf16, ZeRO 1-3 (DeepSpeed bf16): bf16 parameters 2 B, bf16 gradients 2 B, optimizer 12 B = fp32
      master weights 4 B + Adam moments 8 B.
    * bf16, stage 0 (Accelerate's autocast DDP): fp32 parameters 4 B plus the bf16 weight copies autocast
      makes and autograd keeps for the backward 2 B, fp32 gradients 4 B, Adam 8 B; so at world size 1 it is
      2 B/param above ZeRO's 16 B. Under fp32 and bf16, stage 0 with N > 1 adds DDP's gradient buckets
      (another copy of the gradients: ``gradient_as_bucket_view`` is off).
    * ZeRO-1 divides the optimizer states by N, ZeRO-2 also the gradients, ZeRO-3 also the parameters;
      ZeRO-3 then holds one gathered unit at a time (the largest of one decoder block and an embedding
      matrix) on top of its shard. Communication buffers, prefetching and fragmentation are not modelled.
    * ``offload`` (``offload_optimizer`` to CPU, as ds_configs/zero*_offload.json): the optimizer states move
      to ``cpu_offloaded``; with ZeRO-3 the parameter shard moves too (``offload_param``), leaving only the
      gathered unit on the GPU. Gradients stay counted on the GPU.

    Activations are :func:`activation_bytes` for one micro-batch (extra keyword arguments go there).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, not {zero_stage}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, not {precision!r}")
    if offload and zero_stage == 0:
        raise ValueError("offloading needs DeepSpeed ZeRO (stage 1-3)")
    n, p = world_size, parameter_count(config)
    if zero_stage == 0:
        param_b, grad_b, optim_b = (4 + 2, 4, 8) if precision == "bf16" else (4, 4, 8)
        params, grads, optimizer = p * param_b, p * grad_b * (2 if n > 1 else 1), p * optim_b
    else:
        param_b, grad_b, optim_b = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
        params = p * param_b if zero_stage < 3 else -(-p // n) * param_b
        grads = p * grad_b if zero_stage < 2 else -(-p // n) * grad_b
        optimizer = -(-p // n) * optim_b
    cpu = 0
    if offload:
        cpu, optimizer = optimizer, 0
        if zero_stage == 3:
            cpu, params = cpu + params, 0
    if zero_stage == 3:
        params += _largest_gathered_unit(config) * param_b
    activations = activation_bytes(config, micro_batch, enc_len, dec_len, precision, rationale=rationale,
                                   gradient_checkpointing=gradient_checkpointing, **activation_kwargs)
    return MemoryEstimate(params, grads, optimizer, activations, cpu_offloaded=cpu)


def plan_fits(estimate: MemoryEstimate, device_memory_bytes: int, headroom: float = 0.9) -> bool:
    """Whether the estimate fits in ``headroom`` (default 90%) of a device's memory."""
    return estimate.total <= headroom * device_memory_bytes


def smallest_world_size(config, zero_stage: int, offload: bool, precision: str, device_memory_bytes: int,
                        micro_batch: int = 1, enc_len: int = 1024, dec_len: int = 256, max_world_size: int = 1024,
                        **kwargs) -> int | None:
    """The smallest power-of-two world size (up to ``max_world_size``) whose per-rank estimate fits in 90%
    of ``device_memory_bytes``, or None if none does (e.g. stage 0, which replicates everything).

    The default lengths are the trainer's truncation limits (``max_input_length``, ``max_target_length``)
    for both tasks; other keyword arguments go to :func:`memory_per_rank`.
    """
    n = 1
    while n <= max_world_size:
        estimate = memory_per_rank(config, zero_stage, n, offload, precision, micro_batch, enc_len, dec_len,
                                   **kwargs)
        if plan_fits(estimate, device_memory_bytes):
            return n
        n *= 2
    return None
