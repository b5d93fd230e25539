"""Analytic size and memory figures for the T5 students (t5-v1_1 style), from a config alone; their FLOPs,
which the trainer counts too, are :mod:`mindmirror.core.flops`'s.

Everything here reads only these config attributes: ``d_model``, ``d_kv``, ``d_ff``, ``num_heads``,
``num_layers``, ``num_decoder_layers``, ``vocab_size``, ``relative_attention_num_buckets``,
``feed_forward_proj``, ``tie_word_embeddings`` (overridden by transformers 5's ``scale_decoder_outputs``
where present, see :func:`tied_lm_head`) and ``dropout_rate`` for activation memory, so a
``transformers.T5Config`` or any stand-in object works and nothing is built or downloaded.

Memory per rank is the model states, communication and gathered-parameter buffers as DeepSpeed 0.19's code
allocates them for the trainer's DeepSpeed JSONs (never below DeepSpeed's own estimators), plus the tensors
autograd saves for the backward pass; see :func:`memory_per_rank`. ``python -m mindmirror.tools.estimate``
prints the planner against DeepSpeed's estimators.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mindmirror.core.flops import decoder_layers, ffn_matrices, gated, inner_dim
from mindmirror.runfiles import markdown_table

GIB = 2 ** 30
INDEX_BYTES = 8  # int64 token ids, position buckets and target indices saved for the backward pass


# ---------------------------------------------------------------------------------------------
# architecture helpers (the rest: core.flops's inner_dim, decoder_layers, gated, ffn_matrices)


def _act(c) -> str:
    if getattr(c, "dense_act_fn", None):  # what the model runs (mindmirror.speedups.fused_gelu sets it)
        return c.dense_act_fn
    act = str(c.feed_forward_proj).split("-")[-1]
    return "gelu_new" if act == "gelu" and gated(c) else act  # what T5Config does for "gated-gelu"


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
    d, inner, ff = config.d_model, inner_dim(config), config.d_ff
    attention = 4 * d * inner
    ffn = ffn_matrices(config) * d * ff
    encoder = config.num_layers * (attention + ffn + 2 * d) + d
    decoder = decoder_layers(config) * (2 * attention + ffn + 3 * d) + d
    bias = config.relative_attention_num_buckets * config.num_heads
    embeddings = config.vocab_size * d * (1 if tied_lm_head(config) else 2)
    return encoder + decoder + 2 * bias + embeddings


# ---------------------------------------------------------------------------------------------
# activation memory


def _ffn_saved(c, dropout: bool) -> int:
    """How many ``tokens x d_ff`` tensors the FFN saves (excluding dropout masks)."""
    act = _act(c)
    if act == "gelu_new":  # 0.5*x*(1+tanh(...)) in Python: x, tanh, 0.5*x, 1+tanh, the GELU output
        return 7 if gated(c) else 5  # + wi_1 output and the product (wo's input) when gated
    if act == "relu":  # relu saves its output, which is also the gate's / wo's input
        return 3 if gated(c) else 1 + dropout
    return 4 if gated(c) else 2  # an activation that saves its input (F.gelu, silu, ...)


def _pass_activations(c, size: int, mask_size: int, dropout: bool, batch: int, enc_len: int,
                      decoders: list[tuple[int, int, int]]) -> dict[str, int]:
    """Saved-for-backward bytes of one encoder pass over ``batch`` rows of ``enc_len`` tokens and of the decoder
    passes ``decoders`` (``(rows, dec_len, targets)`` each, attending to as many encoder rows), their targets
    going through the head; split for checkpointing."""
    d, inner, ff, h, vocab = c.d_model, inner_dim(c), c.d_ff, c.num_heads, c.vocab_size
    upcast = 4 if size != 4 else 0  # RMSNorm saves an fp32 copy of a half-precision input
    drop = int(dropout)

    def norm(n: int, out_saved: bool = True) -> int:  # input (+fp32 copy), normalised, output; rsqrt (fp32)
        return n * d * (2 * size + upcast + size * out_saved) + 4 * n

    def attention(rows: int, q_len: int, k_len: int) -> int:
        n_q, n_k, pairs = rows * q_len, rows * k_len, rows * h * q_len * k_len
        saved = norm(n_q)  # its output feeds q, and k and v too unless cross-attention (they read the encoder)
        saved += (2 * n_q + 2 * n_k) * inner * size  # contiguous q, k, v copies for the bmm; o's input
        saved += pairs * size  # softmax output
        saved += drop * (pairs * (mask_size + size) + n_q * d)  # probs dropout (F.dropout); output dropout
        return saved

    def ffn(n: int) -> int:
        return norm(n) + n * ff * (_ffn_saved(c, dropout) * size + drop) + drop * n * d

    # the encoder: its blocks; outside them its token ids and embedding dropout, bucket ids, final norm and
    # dropout (its output is saved once for every cross-attention k/v); checkpointed blocks keep each block's
    # input, the shared position bias and the mask
    e = batch * enc_len
    enc_block = attention(batch, enc_len, enc_len) + ffn(e)
    outside = e * INDEX_BYTES + drop * e * d + norm(e) + drop * e * d
    full = c.num_layers * enc_block + outside + enc_len ** 2 * INDEX_BYTES  # the buckets: recomputed if checkpointed
    kept = c.num_layers * e * d * size + (h + batch) * enc_len ** 2 * size
    block = enc_block + enc_len ** 2 * INDEX_BYTES
    n_dec = decoder_layers(c)
    for rows, dec_len, targets in decoders:
        t = rows * dec_len
        dec_block = attention(rows, dec_len, dec_len) + attention(rows, dec_len, enc_len) + ffn(t)  # self, cross, FFN
        # token ids, embedding dropout, final norm and dropout; the target positions (index_select's index),
        # lm_head input, fp32 logits, targets; nll_loss's total weight
        dec_outside = t * INDEX_BYTES + drop * t * d + norm(t, out_saved=False) + drop * t * d
        dec_outside += targets * (INDEX_BYTES + d * size + vocab * 4 + INDEX_BYTES) + 4
        full += n_dec * dec_block + dec_outside + dec_len ** 2 * INDEX_BYTES
        outside += dec_outside
        kept += n_dec * t * d * size + (h + rows) * (dec_len ** 2 + dec_len * enc_len) * size
        block = max(block, dec_block + dec_len ** 2 * INDEX_BYTES)
    return {"full": full, "checkpointed": outside + kept, "block": block}


def activation_bytes(config, micro_batch: int, enc_len: int, dec_len: int, precision: str = "bf16",
                     rationale: bool = True, rationale_enc_len: int | None = None,
                     rationale_dec_len: int | None = None, target_tokens: int | None = None,
                     rationale_target_tokens: int | None = None, gradient_checkpointing: bool = False,
                     dropout_mask_bytes: int = 1, stacked: bool = False) -> int:
    """Bytes autograd keeps for the backward of one training micro-batch of the distillation objective.

    Both tasks run in one forward, so the answer task (``enc_len``/``dec_len``) and the rationale task
    (``rationale_enc_len``/``rationale_dec_len``, default the answer's) are alive together. By default (what the
    trainer runs under DDP and ZeRO-1/2, :class:`mindmirror.core.objective.DistillationObjective`) both tasks'
    questions run as one encoder pass of ``2 x micro_batch`` rows at the longer encoder length, and each task's
    decoder as a pass of ``micro_batch`` rows at its own length. ``stacked`` (with the rationale task) is the
    batch the trainer runs under ZeRO-3 (:class:`mindmirror.core.collate.Collator`'s ``stacked``): the decoders, too,
    run as one pass of ``2 x micro_batch`` rows at the longer decoder length; only the real targets reach the
    head. Targets default
    to every decoder position of the task's own length. The model is transformers' eager T5 (see the module
    docstring); per layer: norm inputs/outputs (plus an fp32 copy under bf16) and rsqrt, contiguous q/k/v copies
    and o's input, softmax output ``b*h*Lq*Lk``, the FFN's GELU intermediates, dropout masks when ``dropout_rate > 0``
    (1 byte per element for the dropout modules, :class:`mindmirror.speedups.Dropout` on CPU and ``F.dropout``
    on CUDA; ``dropout_mask_bytes`` for the attention-probability dropout, which in eager T5 calls ``F.dropout``: 1
    on CUDA, the compute dtype's size on CPU, where it saves a float mask; the trainer's CPU attention,
    :func:`mindmirror.speedups.attention`, keeps 1 byte), plus the lm_head input and fp32
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
    b = micro_batch
    targets = b * dec_len if target_tokens is None else target_tokens
    if not rationale:
        enc_rows, decoders = b, [(b, dec_len, targets)]
    else:
        enc_len = max(enc_len, enc_len if rationale_enc_len is None else rationale_enc_len)  # one encoder pass
        enc_rows, r_dec = 2 * b, dec_len if rationale_dec_len is None else rationale_dec_len
        r_targets = b * r_dec if rationale_target_tokens is None else rationale_target_tokens
        decoders = [(2 * b, max(dec_len, r_dec), targets + r_targets)] if stacked else \
            [(b, dec_len, targets), (b, r_dec, r_targets)]
    part = _pass_activations(config, size, dropout_mask_bytes, dropout, enc_rows, enc_len, decoders)
    return part["checkpointed"] + part["block"] if gradient_checkpointing else part["full"]


# ---------------------------------------------------------------------------------------------
# the parameters DeepSpeed sees


def _parameter_tensors(c) -> list[tuple[str, int, int]]:
    """``(kind, elements, how many)`` for every parameter tensor of the model; they add up to
    :func:`parameter_count`. Kinds: ``embedding``, ``lm_head``, ``matrix`` (attention and FFN weights),
    ``bias`` (relative position buckets), ``norm`` (RMS-norm weights)."""
    d, inner, ff = c.d_model, inner_dim(c), c.d_ff
    n_enc, n_dec = c.num_layers, decoder_layers(c)
    tensors = [("embedding", c.vocab_size * d, 1), ("matrix", d * inner, 4 * n_enc + 8 * n_dec),
               ("matrix", d * ff, ffn_matrices(c) * (n_enc + n_dec)),
               ("bias", c.relative_attention_num_buckets * c.num_heads, 2),
               ("norm", d, (2 * n_enc + 1) + (3 * n_dec + 1))]
    if not tied_lm_head(c):
        tensors.append(("lm_head", c.vocab_size * d, 1))
    return tensors


def largest_layer_params(config) -> int:
    """The most parameters one module holds itself, as DeepSpeed's ``model_to_params`` counts a model's
    "largest layer" for ``estimate_zero3_model_states_mem_needs``: in T5 every module with parameters holds
    one tensor, so the largest tensor (the embedding or ``lm_head``: vocabulary x ``d_model``)."""
    return max(n for _, n, _ in _parameter_tensors(config))


def _count(config, kinds=None, at_most: int | None = None) -> int:
    """Parameters of the given kinds (default all); only tensors of at most ``at_most`` elements if given."""
    return sum(n * k for kind, n, k in _parameter_tensors(config)
               if (kinds is None or kind in kinds) and (at_most is None or n <= at_most))


# ---------------------------------------------------------------------------------------------
# DeepSpeed's settings, as the trainer resolves them

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
# deepspeed/runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE: the bucket in which the engine all-reduces the BF16
# optimizer's gradient buffers (it flushes once the tensors added exceed it)
MEMORY_OPT_ALLREDUCE_SIZE = 500_000_000
_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def shipped_deepspeed_config(zero_stage: int, offload: bool = False) -> dict:
    """The project's ``ds_configs/zero{stage}[_offload].json`` (what the launch configs and the scaling study
    use), or ``{}`` (DeepSpeed's defaults) where the checkout has none."""
    path = DS_CONFIGS / (f"zero{zero_stage}_offload.json" if offload else f"zero{zero_stage}.json")
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class ZeroSettings:
    """The sizes and switches of a DeepSpeed JSON that decide its buffers, "auto" resolved as the trainer does:
    ``reduce_bucket_size`` and ``stage3_prefetch_bucket_size`` by :func:`mindmirror.core.runtime.bucket_elements`
    (``fill_deepspeed_sizes``), and so ``stage3_max_reuse_distance`` of a ZeRO-3 JSON, "auto" or left out
    (``runtime.ZERO3_SCALED``); ``stage3_param_persistence_threshold`` by Accelerate (10 x ``d_model``);
    other missing keys take DeepSpeed 0.19's defaults (deepspeed/runtime/zero/config.py)."""

    reduce_bucket: int
    allgather_bucket: int
    prefetch_bucket: int
    persistence_threshold: int
    max_reuse_distance: int
    overlap_comm: bool
    contiguous_gradients: bool
    grad_accum_bytes: int | None  # data_types.grad_accum_dtype; None: the model's dtype
    comm_bytes: int | None  # communication_data_type; None: the model's dtype


def zero_settings(ds_config: dict, zero_stage: int, parameters: int, d_model: int) -> ZeroSettings:
    """:class:`ZeroSettings` of ``ds_config`` for a model of ``parameters`` and ``d_model``."""
    zero = ds_config.get("zero_optimization", {})

    def size(key: str, default: float, auto: int | None = None) -> int:
        value = zero.get(key, default)
        if value == "auto":
            value = default if auto is None else auto
        return int(float(value))

    from mindmirror.core.runtime import bucket_elements  # the trainer's rule for "auto" buckets (one home)

    bucket = bucket_elements(parameters, d_model)
    scaled = bucket if zero.get("stage") == 3 else None  # fill_deepspeed_sizes sizes these only in a ZeRO-3 JSON
    accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
    comm = ds_config.get("communication_data_type")
    overlap = zero.get("overlap_comm")
    return ZeroSettings(
        reduce_bucket=size("reduce_bucket_size", 5e8, bucket),
        allgather_bucket=size("allgather_bucket_size", 5e8),
        prefetch_bucket=size("stage3_prefetch_bucket_size", 5e7, bucket),
        persistence_threshold=size("stage3_param_persistence_threshold", 1e5, 10 * d_model),
        max_reuse_distance=size("stage3_max_reuse_distance", 1e9 if scaled is None else scaled, scaled),
        overlap_comm=zero_stage == 3 if overlap in (None, "auto") else bool(overlap),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        grad_accum_bytes=None if accum is None else _BYTES[str(accum).lower()],
        comm_bytes=None if comm is None else _BYTES[str(comm).lower()])


# ---------------------------------------------------------------------------------------------
# memory per rank

KINDS = ("params", "grads", "optimizer", "buffers", "late", "host")


@dataclass
class MemoryEstimate:
    """Bytes on one GPU by kind, and ``terms``: the breakdown, ``(kind, what, bytes)`` each.

    ``params``, ``grads`` and ``optimizer`` are the model states (what DeepSpeed's own estimators count);
    ``buffers`` are communication, prefetch and gathered-parameter buffers alive together with the
    activations; ``late`` is what is alive beyond the model states at the end of the backward pass and in
    the optimizer step, when the activations are gone. ``total`` = model states + max(buffers + activations,
    late). ``cpu_offloaded`` is host memory, not in ``total``.
    """

    params: int
    grads: int
    optimizer: int
    activations: int
    cpu_offloaded: int = 0
    buffers: int = 0
    late: int = 0
    terms: list[tuple[str, str, int]] = field(default_factory=list)
    total: int = field(init=False)

    def __post_init__(self):
        self.total = self.model_states + max(self.buffers + self.activations, self.late)

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer states on the GPU."""
        return self.params + self.grads + self.optimizer

    @property
    def without_activations(self) -> int:
        """The total with no activations: model states + the larger of ``buffers`` and ``late``; the figure
        to set against DeepSpeed's estimators, which count no activations either."""
        return self.model_states + max(self.buffers, self.late)

    def gib(self) -> dict[str, float]:
        """Every field in GiB."""
        names = ("params", "grads", "optimizer", "buffers", "late", "activations", "total", "cpu_offloaded")
        return {name: getattr(self, name) / GIB for name in names}

    def describe(self) -> str:
        """The breakdown as a Markdown table, one row per term (GiB)."""
        rows = [(kind, what, f"{nbytes / GIB:.3f}") for kind, what, nbytes in self.terms]
        rows.append(("", "total: model states + max(buffers + activations, late)", f"{self.total / GIB:.3f}"))
        return markdown_table(("kind", "term", "GiB"), rows)


def _zero3_gathered(c, p_gathered: int, s: ZeroSettings, aliased: bool) -> int:
    """Parameter elements ZeRO-3 holds gathered (whole) at once, during the forward and backward and still at the
    end of the backward, from DeepSpeed 0.19's release rules (runtime/zero/partitioned_param_coordinator.py and
    parameter_offload.py), ``p_gathered`` being the parameters not kept whole anyway (persistent ones).

    * The trainer calls every module once per forward under ZeRO-3: with the rationale task the collator
      stacks both tasks' rows into one batch (:class:`mindmirror.core.collate.Collator`'s ``stacked``), so each
      module's backward releases it as DeepSpeed means to.
    * A gathered module is not released while it is used again within ``stage3_max_reuse_distance`` (``R``)
      elements of the recorded trace; the prefetcher gathers up to ``stage3_prefetch_bucket_size`` ahead. With
      one forward a module is next used in its own backward, ``2 x`` the parameters after it away: the last
      ``R/2`` stay gathered into the backward (all of them if the model is under ``R/2``), with the largest
      layer and the prefetch bucket beside them. Gradient checkpointing, which runs each block's forward again
      just before its backward, stays within this.
    * At world size 1 a gather is the shard itself (``NoGatherHandle``: no copy; ``aliased``), so nothing
      extra, unless the shard lives on the host (``offload_param``).

    Checked on CPU with a one-process ZeRO-3 engine (tests/test_estimate.py: both tasks stacked, one task, and
    stacked with gradient checkpointing, all within this figure).
    """
    if aliased:
        return 0
    reuse, u = s.max_reuse_distance, largest_layer_params(c)
    if p_gathered <= reuse // 2:
        return p_gathered
    return min(p_gathered, reuse // 2 + u + s.prefetch_bucket)


class _Terms(list):
    """``(kind, what, bytes)`` memory terms in the order they are added; a term of no bytes is left out."""

    def add(self, kind: str, what: str, nbytes: int) -> None:
        if nbytes:
            self.append((kind, what, int(nbytes)))


def _model_terms(c, zero_stage: int, n: int, offload: bool, precision: str,
                 s: ZeroSettings | None) -> list[tuple[str, str, int]]:
    """The non-activation terms of :func:`memory_per_rank`, ``(kind, what, bytes)``."""
    p = parameter_count(c)
    shard = -(-p // n)  # one rank's share (DeepSpeed pads flat groups to a multiple of N: a few elements)
    if zero_stage == 0:
        return _ddp_terms(p, n, precision)
    assert s is not None
    bf16 = precision == "bf16"
    lp = 2 if bf16 else 4  # the model's (and DeepSpeed's low-precision copy's) bytes per element
    acc = s.grad_accum_bytes or lp  # gradient accumulation
    comm = s.comm_bytes or lp  # communication_data_type (default: the model's)
    if zero_stage == 1 and bf16 and acc == 4 and not offload:
        return _bf16_optimizer_terms(c, p, shard, comm)
    if zero_stage in (1, 2):
        return _zero12_terms(c, zero_stage, p, shard, lp, acc, comm, offload, s)
    return _zero3_terms(c, n, p, shard, lp, acc, comm, offload, s)


def _ddp_terms(p: int, n: int, precision: str) -> _Terms:
    """Stage 0: DDP over ``n`` ranks, every rank holding the whole model, its gradients and Adam."""
    terms = _Terms()
    if precision == "bf16":
        terms.add("params", "fp32 parameters, whole", 4 * p)
        terms.add("params", "bf16 copies of the weights that autocast makes and autograd keeps", 2 * p)
    else:
        terms.add("params", "fp32 parameters, whole", 4 * p)
    terms.add("grads", "fp32 gradients, whole", 4 * p)
    if n > 1:
        terms.add("grads", "DDP's gradient buckets (a second copy: gradient_as_bucket_view is off)", 4 * p)
    terms.add("optimizer", "Adam moments (fp32), whole", 8 * p)
    return terms


def _bf16_optimizer_terms(c, p: int, shard: int, comm: int) -> _Terms:
    """ZeRO-1 with bf16 and fp32 accumulation: engine._do_optimizer_sanity_check picks BF16_Optimizer
    (runtime/bf16_optimizer.py), which shards only the fp32 master weights and Adam."""
    terms = _Terms()
    terms.add("params", "bf16 parameters, whole", 2 * p)
    terms.add("grads", "bf16 gradients, whole (autograd's .grad, zeroed and kept between steps)", 2 * p)
    terms.add("grads", "fp32 gradient buffer, whole on every rank (BF16 optimizer: not sharded)", 4 * p)
    terms.add("optimizer", "fp32 master weights, 1/N", 4 * shard)
    terms.add("optimizer", "Adam moments (fp32), 1/N", 8 * shard)
    # After the backward the engine all-reduces the fp32 buffers (buffered_allreduce_fallback): in bf16
    # (communication_data_type), and the two parameter groups' buffers concatenated into one fp32 tensor
    # first unless the decayed group alone exceeds MEMORY_OPT_ALLREDUCE_SIZE.
    terms.add("late", "gradient all-reduce: bf16 copy of the fp32 gradient buffer", comm * p if comm != 4 else 0)
    if p - _count(c, kinds=("norm",)) <= MEMORY_OPT_ALLREDUCE_SIZE:
        terms.add("late", "gradient all-reduce: both groups' fp32 buffers concatenated into one tensor", 4 * p)
    return terms


def _zero12_terms(c, zero_stage: int, p: int, shard: int, lp: int, acc: int, comm: int, offload: bool,
                  s: ZeroSettings) -> _Terms:
    """ZeRO-1 and ZeRO-2: runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer. ``lp``, ``acc``, ``comm``: bytes
    per element of the model, of gradient accumulation and of communication."""
    terms = _Terms()
    name = "bf16" if lp == 2 else "fp32"
    b, u = s.reduce_bucket, largest_layer_params(c)
    on_host = "host" if offload else None
    grad_accum_attribute = acc != lp and zero_stage == 1  # ZeRO-1 keeps an fp32 .grad_accum per parameter
    compact = acc == 4 and lp != 4  # an fp32 gradient partition (_use_compact_grad_partition_buffer)
    terms.add("params", f"{name} parameters, whole", lp * p)
    if zero_stage == 1:
        terms.add("grads", f"{name} gradients, whole (ZeRO-1 keeps every .grad)", lp * p)
        if grad_accum_attribute:
            terms.add("grads", "fp32 gradient accumulators (.grad_accum), whole", 4 * p)
    if offload:
        terms.add("host", "gradient partition, 1/N", acc * shard)
        terms.add("host", f"{name} staging copy of the parameter shard, 1/N", lp * shard)
    else:
        terms.add("grads", f"{'fp32' if compact else name} gradient partition, 1/N", (acc if compact else lp) * shard)
        if zero_stage == 2 and lp == 2:
            terms.add("grads", "16-bit gradients, 1/N, as DeepSpeed's estimator counts them (0.19 keeps no such "
                               "partition under fp32 accumulation: kept so the plan never falls below its figure)",
                      2 * shard)
    terms.add(on_host or "optimizer", "fp32 master weights, 1/N", 4 * shard)
    terms.add(on_host or "optimizer", "Adam moments (fp32), 1/N", 8 * shard)
    # the reduction: gradients are copied into contiguous buckets (two with overlap_comm), which are
    # flattened into one tensor for each all-reduce; the rank's slice is added into the fp32 partition
    reduce_dtype = 4 if grad_accum_attribute else lp
    ipg = (2 if s.overlap_comm else 1) * b * reduce_dtype if s.contiguous_gradients else 0
    flat = b * reduce_dtype + (b * comm if comm != reduce_dtype else 0)
    upcast = min(b, u, shard) * acc if compact and not offload else 0
    one_grad = lp * u  # autograd's gradient of the largest parameter, before it is copied into a bucket
    staging = lp * u if offload else 0  # temp_grad_buffer_for_gpu_offload
    if zero_stage == 2:
        terms.add("buffers", f"reduce buckets ({2 if s.overlap_comm else 1} x reduce_bucket_size {b:,})", ipg)
        terms.add("buffers", "the flattened copy each all-reduce sends, and the fp32 copy of the rank's slice",
                  flat + upcast)
        terms.add("buffers", "autograd's gradient of the largest parameter before it enters a bucket", one_grad)
        terms.add("buffers", "offload: a gradient staging buffer of the largest parameter", staging)
        terms.add("late", "reduce buckets and the last all-reduce's copies (freed at the step)", ipg + flat + upcast)
    else:  # ZeRO-1 reduces once, after the backward (engine.allreduce_gradients -> reduce_gradients)
        terms.add("buffers", f"reduce bucket (reduce_bucket_size {b:,}), allocated in the backward", ipg)
        terms.add("buffers", "offload: a gradient staging buffer of the largest parameter", staging)
        terms.add("late", "reduce bucket and each all-reduce's flattened copy, after the backward",
                  ipg + flat + upcast + staging)
    return terms


def _zero3_terms(c, n: int, p: int, shard: int, lp: int, acc: int, comm: int, offload: bool,
                 s: ZeroSettings) -> _Terms:
    """ZeRO-3: runtime/zero/stage3.py and partition_parameters.py. ``lp``, ``acc``, ``comm``: as for
    :func:`_zero12_terms`."""
    terms = _Terms()
    name = "bf16" if lp == 2 else "fp32"
    b, u = s.reduce_bucket, largest_layer_params(c)
    on_host = "host" if offload else None
    persistent = _count(c, at_most=s.persistence_threshold)  # mark_persistent_parameters: ds_numel <= threshold
    terms.add("host" if offload else "params", f"{name} parameter shard, 1/N", lp * shard)
    terms.add("params", f"parameters of at most stage3_param_persistence_threshold ({s.persistence_threshold:,}) "
                        "elements, whole on every rank", lp * persistent)
    terms.add("params", f"largest layer, gathered whole ({largest_layer_params(c):,} parameters; DeepSpeed's "
                        "estimator counts it at 4 B/param: its weights and its gradient)", lp * u)
    terms.add("grads", "gradient of the gathered layer before it is reduced", lp * u)
    terms.add(on_host or "grads", f"{'fp32' if acc == 4 else name} gradient partitions, 1/N", acc * shard)
    if lp != 4 or offload:  # in fp32 on the GPU the master weights are the shard itself
        terms.add(on_host or "optimizer", "fp32 master weights, 1/N", 4 * shard)
    terms.add(on_host or "optimizer", "Adam moments (fp32), 1/N", 8 * shard)
    gathered = _zero3_gathered(c, p - persistent, s, aliased=n == 1 and not offload)
    ipg = b * comm if s.contiguous_gradients else 0
    scatter = b * comm + (-(-b // n) * acc if acc != comm else 0)  # reduce_scatter_coalesced's copy, fp32 shares
    terms.add("buffers", "further gathered parameters: the prefetch bucket (stage3_prefetch_bucket_size "
                         f"{s.prefetch_bucket:,}) and the layers kept for reuse", lp * max(0, gathered - u))
    terms.add("buffers", f"reduce bucket (reduce_bucket_size {b:,})", ipg)
    terms.add("buffers", "reduce-scatter: the interleaved copy and the rank's fp32 shares", scatter)
    terms.add("late", "parameters still gathered at the end of the backward pass (the layers kept for reuse: see "
                      "_zero3_gathered)", lp * max(0, gathered - u))
    terms.add("late", "reduce bucket and the last reduce-scatter's copies", ipg + scatter)
    return terms


def memory_per_rank(config, zero_stage: int, world_size: int, offload: bool, precision: Literal["bf16", "fp32"],
                    micro_batch: int, enc_len: int, dec_len: int, rationale: bool = True,
                    gradient_checkpointing: bool = False, ds_config: dict | None = None,
                    **activation_kwargs) -> MemoryEstimate:
    """Per-GPU memory of training with AdamW under DDP (stage 0) or DeepSpeed ZeRO ``zero_stage``, every term
    read from DeepSpeed 0.19's code for the configuration the trainer runs (``MemoryEstimate.terms`` names
    each one; N = ``world_size``, P = parameters).

    ``ds_config`` (default: the shipped ``ds_configs/zero{stage}[_offload].json``) gives the buckets and the
    gradient accumulation dtype (:func:`zero_settings`); ``precision`` switches bf16 on or off in it, as the
    scaling study does. The shipped JSONs accumulate gradients in fp32, so under bf16:

    * ZeRO-1 runs DeepSpeed's BF16 optimizer: bf16 parameters and gradients whole (2 + 2 B/param), an fp32
      gradient buffer **whole on every rank** (4 B/param, not divided), fp32 master weights and Adam 12 B/N;
      after the backward the engine all-reduces that buffer in bf16 (2 B/param, and a 4 B/param fp32
      concatenation of the two parameter groups' buffers while the model is under 5e8 parameters).
    * ZeRO-2: bf16 parameters 2 B whole; an **fp32** gradient partition 4 B/N, plus the 2 B/N of 16-bit
      gradients DeepSpeed's estimator counts; 12 B/N master weights and Adam; two reduce buckets
      (``overlap_comm``), the flattened copy each all-reduce sends and the fp32 copy of the rank's slice.
    * ZeRO-3: a bf16 shard 2 B/N, fp32 gradient partitions 4 B/N, 12 B/N master weights and Adam; the largest
      layer gathered at 4 B/param (weights and gradient) as DeepSpeed counts it; small parameters whole on
      every rank; the prefetch bucket and the layers kept for reuse (:func:`_zero3_gathered`: one pass of the
      model per forward, both tasks' rows stacked); the reduce bucket and the reduce-scatter's copies.
    * fp32 (bf16 off): the same optimizers with 4-byte parameters and gradients; ZeRO-1/2 still keep a
      separate fp32 master copy (a clone of the shard), ZeRO-3 does not.
    * The allgather that refreshes parameters after a ZeRO-1/2 step writes into them in place
      (``all_gather_into_tensor``): ``allgather_bucket_size`` allocates nothing.
    * ``offload`` (``offload_optimizer``, and at ZeRO-3 ``offload_param``, as ds_configs/zero*_offload.json):
      master weights, Adam, the gradient partitions (and the ZeRO-3 shard) go to ``cpu_offloaded``.
    * Stage 0 is DDP: fp32 parameters 4 B (+2 B of bf16 weight copies under autocast), gradients 4 B (+4 B of
      DDP buckets when N > 1), Adam 8 B, all whole.

    Not counted: NCCL's own buffers, the allocator's fragmentation and cache, and the CUDA context; hence the
    90% of :func:`plan_fits`. Activations are :func:`activation_bytes` for one micro-batch (extra keyword
    arguments go there), as the trainer batches it: the two tasks as two passes under DDP and ZeRO-1/2, and
    stacked into one pass of 2 x ``micro_batch`` rows under ZeRO-3 (``stacked``).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, not {zero_stage}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, not {precision!r}")
    if offload and zero_stage == 0:
        raise ValueError("offloading needs DeepSpeed ZeRO (stage 1-3)")
    settings = None
    if zero_stage > 0:
        ds = shipped_deepspeed_config(zero_stage, offload) if ds_config is None else ds_config
        settings = zero_settings(ds, zero_stage, parameter_count(config), config.d_model)
    terms = _model_terms(config, zero_stage, world_size, offload, precision, settings)
    sums = {kind: sum(nbytes for k, _, nbytes in terms if k == kind) for kind in KINDS}
    activations = activation_bytes(config, micro_batch, enc_len, dec_len, precision, rationale=rationale,
                                   gradient_checkpointing=gradient_checkpointing, stacked=zero_stage == 3,
                                   **activation_kwargs)
    terms.append(("activations", "tensors autograd keeps for the backward of one micro-batch", activations))
    return MemoryEstimate(sums["params"], sums["grads"], sums["optimizer"], activations,
                          cpu_offloaded=sums["host"], buffers=sums["buffers"], late=sums["late"], terms=terms)


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


# ---------------------------------------------------------------------------------------------
# the planner against DeepSpeed's own estimators

COMPARED_SIZES = ("t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl")
COMPARED_WORLD_SIZES = (1, 8, 64)


def deepspeed_counts(config) -> tuple[int, int]:
    """``(total_params, largest_layer_params)`` of the model the trainer builds from ``config``, counted as
    DeepSpeed's ``model_to_params`` counts them (shared parameters once; the most parameters a module holds
    itself), on a model built on the meta device (nothing allocated)."""
    import torch
    from transformers import T5ForConditionalGeneration

    from mindmirror.model import untie_lm_head

    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
        if not tied_lm_head(config):
            untie_lm_head(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def deepspeed_gpu_bytes(zero_stage: int, world_size: int, total_params: int, largest_layer: int,
                        offload: bool = False) -> int:
    """DeepSpeed's own per-GPU figure (``estimate_zero2_model_states_mem_needs`` for stages 1-2: it has no
    ZeRO-1 estimator; ``estimate_zero3_model_states_mem_needs`` for stage 3), for ``world_size`` GPUs as
    nodes of up to 8."""
    per_node = min(world_size, 8)
    nodes = -(-world_size // per_node)
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(total_params, largest_layer, per_node, nodes,
                                                     cpu_offload=offload, cpu_offload_params=offload)[1]
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(total_params, per_node, nodes, cpu_offload=offload)[1]


def deepspeed_comparison(sizes=COMPARED_SIZES, world_sizes=COMPARED_WORLD_SIZES, vocab_size: int = 32128,
                         stages=(1, 2, 3)) -> list[dict]:
    """One row per size, world size and stage (bf16, the shipped JSONs, no offload): DeepSpeed's figure, the
    planner's model states and its total without activations, in bytes."""
    from mindmirror.model import model_config

    rows = []
    for size in sizes:
        config = model_config(size, vocab_size)
        total, largest = deepspeed_counts(config)
        for n in world_sizes:
            for stage in stages:
                e = memory_per_rank(config, stage, n, False, "bf16", micro_batch=1, enc_len=1, dec_len=1)
                rows.append({"model": size, "world_size": n, "zero": stage,
                             "deepspeed": deepspeed_gpu_bytes(stage, n, total, largest),
                             "model_states": e.model_states, "without_activations": e.without_activations})
    return rows


def deepspeed_table(rows: list[dict] | None = None) -> str:
    """:func:`deepspeed_comparison` as a Markdown table in GiB (``python -m mindmirror.tools.estimate`` prints it)."""
    rows = deepspeed_comparison() if rows is None else rows
    header = ("model", "GPUs", "ZeRO", "DeepSpeed's estimator", "planner: model states", "ratio",
              "planner: + buffers, no activations", "ratio")
    return markdown_table(header, [(r["model"], r["world_size"], r["zero"], f"{r['deepspeed'] / GIB:.2f}",
                                    f"{r['model_states'] / GIB:.2f}", f"{r['model_states'] / r['deepspeed']:.3f}",
                                    f"{r['without_activations'] / GIB:.2f}",
                                    f"{r['without_activations'] / r['deepspeed']:.2f}") for r in rows])


if __name__ == "__main__":
    print(deepspeed_table())
