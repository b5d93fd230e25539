"""Analytic parameter, FLOP and memory figures, checked against built models, FlopCounterMode and the
tensors autograd really saves."""

import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from mindmirror import estimate
from mindmirror.estimate import (
    MemoryEstimate,
    activation_bytes,
    forward_flops,
    memory_per_rank,
    mfu,
    parameter_count,
    peak_flops,
    plan_fits,
    sample_flops,
    smallest_world_size,
    tied_lm_head,
    training_flops,
)
from mindmirror.model import SIZES, load_model, load_tokenizer, model_config, untie_lm_head
from mindmirror.objective import DistillationObjective

# Parameter counts of the published google/t5-v1_1 checkpoints (vocabulary 32128, untied lm_head).
PUBLISHED = {"t5-v1_1-small": 76_961_152, "t5-v1_1-base": 247_577_856, "t5-v1_1-large": 783_150_080}
GB = 10 ** 9


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU work: one thread keeps these tests from competing with anything else on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("", "tiny", random_init=False)


def t5_for(size, tok):
    """A randomly initialised student with eager attention (what the formulas describe)."""
    model = load_model(size, tok)  # vocabulary sized to the tokenizer: cheap to build and run
    model.set_attn_implementation("eager")
    return model.train()


def task_batch(rows, enc_len, dec_len, vocab, seed, ignored=3):
    """One task's tensors; the last ``ignored`` targets of row 1 are padding (-100), the end of row 0's input too."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, enc_len), generator=g)
    attention_mask = torch.ones(rows, enc_len, dtype=torch.long)
    attention_mask[0, enc_len - 5:] = 0
    decoder_input_ids = torch.randint(3, vocab, (rows, dec_len), generator=g)
    labels = decoder_input_ids.clone()
    labels[1, dec_len - ignored:] = -100
    return input_ids, attention_mask, decoder_input_ids, labels


# ---------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize("size", ["tiny", "t5-v1_1-small"])
def test_parameter_count_equals_the_built_model(size, tok):
    model = load_model(size, tok)  # random init, untied lm_head, vocabulary sized to the tokenizer
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_equals_an_untied_transformers_model(size):
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):
        model = untie_lm_head(T5ForConditionalGeneration(model_config(size, 32000)))
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_checkpoints(size):
    assert parameter_count(model_config(size, 32100)) == PUBLISHED[size]  # 32100 rounds up to 32128


def test_transformers_5_configs_say_tied_but_t5_v1_1_is_not():
    config = model_config("t5-v1_1-small", 32100)
    assert config.tie_word_embeddings is True  # transformers 5 forces it; scale_decoder_outputs is the real flag
    assert tied_lm_head(config) is False
    stand_in = SimpleNamespace(**{k: getattr(config, k) for k in ("d_model", "d_kv", "d_ff", "num_heads",
                                                                  "num_layers", "num_decoder_layers", "vocab_size",
                                                                  "relative_attention_num_buckets",
                                                                  "feed_forward_proj")})
    stand_in.tie_word_embeddings = True  # no scale_decoder_outputs: tie_word_embeddings decides
    assert parameter_count(stand_in) == PUBLISHED["t5-v1_1-small"] - 32128 * 512


# ---------------------------------------------------------------------------------------------
# FLOPs

MINIMAL = dict(d_model=8, d_kv=2, num_heads=2, d_ff=16, num_layers=1, num_decoder_layers=1, vocab_size=32,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               dropout_rate=0.0)


def test_forward_flops_by_hand_for_a_minimal_config():
    # d_model 8, 2 heads of d_kv 2 (inner 4), d_ff 16, one encoder and one decoder layer, vocabulary 32;
    # one row, 5 encoder and 3 decoder tokens. Every matmul (m x k) @ (k x n) costs 2*m*n*k.
    enc_qkvo = 4 * (2 * 5 * 8 * 4)  # q, k, v, o on 5 tokens: 4 x 320
    enc_scores = 2 * (2 * 2 * 5 * 5 * 2)  # Q K^T and P V: 2 heads x 5 x 5 x d_kv 2, twice
    enc_ffn = 3 * (2 * 5 * 8 * 16)  # wi_0, wi_1, wo
    dec_self_qkvo = 4 * (2 * 3 * 8 * 4)
    dec_self_scores = 2 * (2 * 2 * 3 * 3 * 2)  # the full 3 x 3, as the eager kernel computes it
    dec_cross_qo = 2 * (2 * 3 * 8 * 4)  # q and o on the 3 decoder tokens
    dec_cross_kv = 2 * (2 * 5 * 8 * 4)  # k and v on the 5 encoder tokens
    dec_cross_scores = 2 * (2 * 2 * 3 * 5 * 2)
    dec_ffn = 3 * (2 * 3 * 8 * 16)
    lm_head = 2 * 3 * 8 * 32
    by_hand = (enc_qkvo + enc_scores + enc_ffn + dec_self_qkvo + dec_self_scores + dec_cross_qo + dec_cross_kv
               + dec_cross_scores + dec_ffn + lm_head)
    assert by_hand == 11_536
    config = SimpleNamespace(**MINIMAL)
    assert forward_flops(config, 5, 3) == by_hand
    assert forward_flops(config, 5, 3, target_tokens=1) == by_hand - 2 * 2 * 8 * 32  # lm_head on 1 target only
    assert training_flops(config, 5, 3) == 3 * by_hand
    assert forward_flops(config, 5, 3, batch=4) == 4 * by_hand


def counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_flops_equal_flop_counter_mode_for_a_plain_t5_forward():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(**MINIMAL, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).train()
    model.set_attn_implementation("eager")
    ids, mask, dec, _ = task_batch(2, 5, 3, 32, seed=1)
    flops = counted(lambda: model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec))
    assert flops == forward_flops(config, 5, 3, batch=2)  # lm_head on every decoder position


def test_flop_counter_mode_agrees_on_the_distillation_objective(tok):
    model = DistillationObjective(t5_for("tiny", tok))
    config, rows, enc_len, dec_len = model.t5.config, 4, 32, 16
    batch = task_batch(rows, enc_len, dec_len, 500, seed=2, ignored=6)
    targets = int((batch[3] != -100).sum())
    assert targets == rows * dec_len - 6

    assert counted(lambda: model.token_loss_sum(*batch)) == forward_flops(config, enc_len, dec_len, targets, rows)
    # Forward + backward is exactly 3x forward, so no tolerance: every matmul has both operands requiring
    # grad (activations all descend from the trainable embedding), so its backward is two matmuls of the
    # same size, and the embedding, norm, softmax and loss backward are not matmuls. (With sdpa on CUDA
    # FlopCounterMode would count fused attention's backward as 2.5x its forward, a little above 3x.)
    assert counted(lambda: model.token_loss_sum(*batch).backward()) == training_flops(config, enc_len, dec_len,
                                                                                       targets, rows)


def test_sample_and_per_token_flops_add_up():
    config = model_config("t5-v1_1-base", 32100)
    answer, rationale = forward_flops(config, 100, 8), forward_flops(config, 120, 60)
    assert sample_flops(config, 100, 8, 120, 60) == 3 * (answer + rationale)
    assert sample_flops(config, 100, 8, training=False) == answer
    assert training_flops(config, [100, 120], [8, 60]) == 3 * (answer + rationale)
    assert training_flops(config, [100, 120], 8, target_tokens=[8, 1]) == 3 * (
        answer + forward_flops(config, 120, 8, target_tokens=1))
    assert training_flops(config, 100, 8) == 3 * answer
    # Each token passes through one of the two stacks, so with equal lengths and short sequences a token
    # costs 3 x the parameters that do matmuls (all but the input embedding), not a decoder-only model's 6 x.
    matmul_params = parameter_count(config) - config.vocab_size * config.d_model
    assert training_flops(config, 8, 8) / (8 + 8) == pytest.approx(3 * matmul_params, rel=0.005)


def test_peak_flops_from_device_names_and_the_environment(monkeypatch):
    monkeypatch.delenv(estimate.PEAK_FLOPS_ENV, raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A10G") == 125e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40S") == 362e12  # not taken for an L4
    assert peak_flops("Tesla V100-SXM2-32GB", dtype="fp16") == 125e12
    assert peak_flops("Tesla V100-SXM2-32GB") is None  # no bf16
    assert peak_flops("cpu") is None and peak_flops("Some Future GPU") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops() is None and peak_flops("cuda:0") is None  # CPU
    monkeypatch.setenv(estimate.PEAK_FLOPS_ENV, "2.5e12")
    assert peak_flops() == 2.5e12 and peak_flops("NVIDIA H100 80GB HBM3") == 2.5e12  # the override always wins
    assert mfu(1.25e12, peak_flops()) == 0.5
    assert mfu(1e12, None) is None


# ---------------------------------------------------------------------------------------------
# memory: model states


def model_states(e: MemoryEstimate) -> int:
    """Parameters + gradients + optimizer states on the GPU."""
    return e.params + e.grads + e.optimizer


def test_zero_stages_shrink_model_states_per_rank():
    config = model_config("t5-v1_1-large", 32100)
    p = parameter_count(config)
    args = dict(micro_batch=2, enc_len=64, dec_len=32)
    for precision in ("fp32", "bf16"):
        states = [model_states(memory_per_rank(config, s, 8, False, precision, **args)) for s in range(4)]
        assert states[0] > states[1] > states[2] > states[3], precision
        activations = {memory_per_rank(config, s, 8, False, precision, **args).activations for s in range(4)}
        assert len(activations) == 1  # ZeRO partitions model states, not activations
    # At world size 1 nothing is partitioned: 16 bytes per parameter either way, except that ZeRO-3 also
    # holds a gathered unit and autocast DDP keeps bf16 copies of the fp32 weights (2 bytes).
    gathered = estimate._largest_gathered_unit(config)
    fp32 = [model_states(memory_per_rank(config, s, 1, False, "fp32", **args)) for s in range(4)]
    assert fp32 == [16 * p] * 3 + [16 * p + 4 * gathered]
    bf16 = [model_states(memory_per_rank(config, s, 1, False, "bf16", **args)) for s in range(4)]
    assert bf16 == [18 * p, 16 * p, 16 * p, 16 * p + 2 * gathered]
    zero1 = memory_per_rank(config, 1, 8, False, "bf16", **args)
    assert (zero1.params, zero1.grads, zero1.optimizer) == (2 * p, 2 * p, 12 * -(-p // 8))


def test_offload_moves_optimizer_states_and_zero3_parameters_to_the_host():
    config = model_config("t5-v1_1-xl", 32100)
    args = dict(world_size=4, precision="bf16", micro_batch=1, enc_len=64, dec_len=32)
    on_gpu, offloaded = (memory_per_rank(config, 2, offload=o, **args) for o in (False, True))
    assert offloaded.optimizer == 0 and offloaded.cpu_offloaded == on_gpu.optimizer > 0
    assert (offloaded.params, offloaded.grads) == (on_gpu.params, on_gpu.grads)
    assert offloaded.total == on_gpu.total - on_gpu.optimizer
    on_gpu, offloaded = (memory_per_rank(config, 3, offload=o, **args) for o in (False, True))
    gathered = 2 * estimate._largest_gathered_unit(config)
    assert offloaded.params == gathered and offloaded.optimizer == 0
    assert offloaded.cpu_offloaded == on_gpu.optimizer + on_gpu.params - gathered
    assert on_gpu.cpu_offloaded == 0
    with pytest.raises(ValueError):
        memory_per_rank(config, 0, offload=True, **args)


def test_smallest_world_size_for_xxl_on_80gb_gpus():
    config = model_config("t5-v1_1-xxl", 32100)
    zero3 = smallest_world_size(config, 3, False, "bf16", 80 * GB)
    assert zero3 is not None and zero3 & (zero3 - 1) == 0  # a power of two
    args = dict(offload=False, precision="bf16", micro_batch=1, enc_len=1024, dec_len=256)
    assert plan_fits(memory_per_rank(config, 3, zero3, **args), 80 * GB)
    assert zero3 == 1 or not plan_fits(memory_per_rank(config, 3, zero3 // 2, **args), 80 * GB)
    assert smallest_world_size(config, 0, False, "bf16", 80 * GB) is None  # DDP replicates 11B parameters
    assert smallest_world_size(config, 3, True, "bf16", 80 * GB) <= zero3
    assert smallest_world_size(config, 3, False, "bf16", 80 * GB, gradient_checkpointing=True) <= zero3


def test_plan_fits_leaves_ten_percent():
    estimate_ = MemoryEstimate(params=40, grads=20, optimizer=20, activations=10)
    assert estimate_.total == 90
    assert plan_fits(estimate_, 100) and not plan_fits(estimate_, 99)
    assert estimate_.gib()["total"] == 90 / 2 ** 30


# ---------------------------------------------------------------------------------------------
# memory: activations, against what autograd really keeps

ANSWER, RATIONALE, ROWS = (32, 16), (32, 48), 4  # (encoder, decoder) lengths of the two tasks


def distillation_batch(vocab=500):
    answer = task_batch(ROWS, *ANSWER, vocab, seed=3)
    rationale = task_batch(ROWS, *RATIONALE, vocab, seed=4)
    return answer + rationale


def estimated(config, precision, checkpointing=False):
    """The estimate for ``distillation_batch`` on CPU, where attention dropout saves a mask of the compute dtype."""
    size = {"fp32": 4, "bf16": 2}[precision]
    return activation_bytes(config, ROWS, *ANSWER, precision, rationale_enc_len=RATIONALE[0],
                            rationale_dec_len=RATIONALE[1], target_tokens=ROWS * ANSWER[1] - 3,
                            rationale_target_tokens=ROWS * RATIONALE[1] - 3,
                            gradient_checkpointing=checkpointing, dropout_mask_bytes=size)


def saved_bytes(model, batch):
    """Bytes of the tensors autograd saves during one forward, once per storage, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*batch)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("size", ["tiny", "t5-v1_1-small"])
def test_activation_estimate_matches_saved_tensors(size, precision, tok):
    t5 = t5_for(size, tok)
    if precision == "bf16":
        t5 = t5.to(torch.bfloat16)  # as DeepSpeed's bf16 mode runs it (no autocast)
    assert (t5.config.dropout_rate > 0) == (size != "tiny")  # small exercises the dropout masks
    measured = saved_bytes(DistillationObjective(t5), distillation_batch())
    # Exact but for scalars; the brief allowed 25%.
    assert estimated(t5.config, precision) == pytest.approx(measured, rel=1e-4)


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive (parameters excluded)."""

    def __init__(self, exclude):
        super().__init__()
        self.exclude, self.live = exclude, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.exclude and ptr not in self.live and storage.nbytes():
                    self.live[ptr] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, ptr, None)
        return out


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("size", ["tiny", "t5-v1_1-small"])
def test_gradient_checkpointing_keeps_what_the_estimate_says(size, tok):
    t5 = t5_for(size, tok)
    t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, batch = DistillationObjective(t5), distillation_batch()
    # Checkpointed blocks save their tensors through torch's own hooks, so count what stays alive instead.
    with LiveStorages({p.untyped_storage().data_ptr() for p in model.parameters()}) as live:
        out = model(*batch)
    inputs = sum(t.untyped_storage().nbytes() for t in batch[0::4] + batch[2::4])  # token ids, kept for backward
    kept = sum(live.live.values()) + inputs
    del out

    config = t5.config
    full, checkpointed = estimated(config, "fp32"), estimated(config, "fp32", checkpointing=True)
    assert checkpointed < full / 3
    # the estimate = what stays alive + one block's activations, recomputed at a time in the backward pass
    drop = config.dropout_rate > 0
    one_block = max(estimate._task_activations(config, ROWS, enc, dec, ROWS * dec - 3, 4, 4, drop)["block"]
                    for enc, dec in (ANSWER, RATIONALE))
    assert checkpointed - one_block == pytest.approx(kept, rel=1e-3)
