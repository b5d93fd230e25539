"""Table tests of the trainer's pure helpers: the lr schedule, AdamW's parameter groups, what the DeepSpeed
JSON says and how its "auto" sizes are filled, the cost of each stage of a chain of runs, and the key-value
table the tools print. Every expected value is written out by hand (or by an independent formula here), so a
wrong formula shared by every layout fails these tables even where the layouts agree with one another."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from accelerate.utils import DummyOptim
from transformers import T5Config, T5ForConditionalGeneration

from mindmirror.config import TrainConfig, position_bias_lr_scale
from mindmirror.core.optim import build_optimizer, lr_lambda, no_decay, param_groups
from mindmirror.core.runtime import bucket_elements, ds_precision, fill_deepspeed_sizes, zero_stage
from mindmirror.model import untie_lm_head
from mindmirror.runfiles import earlier_stages, format_table, stage_cost

SQRT2_2 = math.sqrt(2) / 2  # cos(pi / 4)


def cfg_of(**kwargs) -> TrainConfig:
    return TrainConfig(output_dir="/tmp/x", **kwargs)


# ---------------------------------------------------------------- lr schedule

@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("ratio, total, warmup", [
    (0.0, 50, 0),
    (0.05, 100, 5),
    (0.1, 25, 2),  # 2.5 steps: truncated, not rounded
    (0.2, 25, 5),
    (0.3, 10, 3),
    (0.5, 3, 1),  # 1.5
    (0.04, 20, 0),  # 0.8: no warm-up at all
    (1.0, 10, 10),
])
def test_warmup_steps(scheduler, ratio, total, warmup):
    assert lr_lambda(cfg_of(lr_scheduler=scheduler, warmup_ratio=ratio), total)[1] == warmup


# total 25, warm-up 5 (ratio 0.2): the warm-up climbs (step + 1) / 6, the decay covers 20 steps.
WARM = [(0, 1 / 6), (2, 3 / 6), (4, 5 / 6)]  # first, middle and last warm-up step
SCHEDULE_25_W5 = {
    "constant": WARM + [(5, 1.0), (10, 1.0), (15, 1.0), (24, 1.0), (25, 1.0), (40, 1.0)],
    "linear": WARM + [(5, 1.0),  # first step after the warm-up: progress 0
                      (10, 0.75),  # progress 1/4
                      (15, 0.5),  # middle of the decay
                      (24, 0.05),  # last step: progress 19/20
                      (25, 0.0),  # the end
                      (30, 0.0), (40, 0.0)],  # past the end: clamped at 0
    "cosine": WARM + [(5, 1.0),
                      (10, 0.5 + SQRT2_2 / 2),  # 0.5 * (1 + cos(pi / 4))
                      (15, 0.5),  # 0.5 * (1 + cos(pi / 2))
                      (20, 0.5 - SQRT2_2 / 2),  # 0.5 * (1 + cos(3 pi / 4))
                      (24, 0.5 * (1 - math.cos(math.pi / 20))),  # cos(19 pi / 20) = -cos(pi / 20)
                      (25, 0.0),
                      # Past the end the cosine is not clamped: it climbs again, as Hugging Face's
                      # get_cosine_schedule_with_warmup does (the loop never steps past the end).
                      (30, 0.5 - SQRT2_2 / 2)],  # progress 5/4
}
# total 10, no warm-up: the decay starts at step 0 and covers 10 steps.
SCHEDULE_10_W0 = {
    "constant": [(0, 1.0), (5, 1.0), (9, 1.0), (10, 1.0), (12, 1.0)],
    "linear": [(0, 1.0), (1, 0.9), (5, 0.5), (9, 0.1), (10, 0.0), (12, 0.0)],
    "cosine": [(0, 1.0), (5, 0.5), (9, 0.5 * (1 - math.cos(math.pi / 10))), (10, 0.0),
               (15, 0.5)],  # progress 3/2: cos(3 pi / 2) = 0
}
# total 4, warm-up 1 (ratio 0.25): the warm-up's single step is half the peak; the decay covers 3 steps.
SCHEDULE_4_W1 = {
    "constant": [(0, 0.5), (1, 1.0), (3, 1.0), (4, 1.0)],
    "linear": [(0, 0.5), (1, 1.0), (2, 2 / 3), (3, 1 / 3), (4, 0.0), (5, 0.0)],
    "cosine": [(0, 0.5), (1, 1.0), (2, 0.75), (3, 0.25), (4, 0.0)],  # cos(pi / 3) = 1/2, cos(2 pi / 3) = -1/2
}
# total 10, all of it warm-up (ratio 1): (step + 1) / 11 throughout, the peak is never reached.
SCHEDULE_10_W10 = {name: [(0, 1 / 11), (5, 6 / 11), (9, 10 / 11)] for name in ["constant", "linear", "cosine"]}
SCHEDULE_CASES = [
    pytest.param(scheduler, ratio, total, step, expected, id=f"{scheduler}-r{ratio}-t{total}-s{step}")
    for ratio, total, table in [(0.2, 25, SCHEDULE_25_W5), (0.0, 10, SCHEDULE_10_W0), (0.25, 4, SCHEDULE_4_W1),
                                (1.0, 10, SCHEDULE_10_W10)]
    for scheduler, points in table.items()
    for step, expected in points
]


@pytest.mark.parametrize("scheduler, ratio, total, step, expected", SCHEDULE_CASES)
def test_lr_factor(scheduler, ratio, total, step, expected):
    factor, _ = lr_lambda(cfg_of(lr_scheduler=scheduler, warmup_ratio=ratio), total)
    assert factor(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_lr_factor_warms_up_then_never_exceeds_peak(scheduler):
    """Shape, by an independent formula: the warm-up rises strictly, (step + 1) / (warmup + 1), and no step of
    the run exceeds the peak or goes below 0."""
    total = 40
    factor, warmup = lr_lambda(cfg_of(lr_scheduler=scheduler, warmup_ratio=0.25), total)
    assert warmup == 10
    assert [factor(s) for s in range(warmup)] == pytest.approx([(s + 1) / 11 for s in range(warmup)])
    assert all(0.0 <= factor(s) <= 1.0 for s in range(total + 1))
    decay = [factor(s) for s in range(warmup, total + 1)]
    if scheduler == "constant":
        assert decay == [1.0] * len(decay)
    else:
        assert all(a > b for a, b in itertools.pairwise(decay)) and decay[0] == 1.0 and decay[-1] == pytest.approx(0.0)


# ---------------------------------------------------------------- AdamW's parameter groups

@pytest.mark.parametrize("name, excluded", [
    ("bias", True),
    ("encoder.bias", True),
    ("linear.bias", True),
    ("encoder.block.0.layer.1.DenseReluDense.wo.bias", True),
    ("layer_norm.weight", True),
    ("layer_norm.bias", True),
    ("final_layer_norm.weight", True),
    ("encoder.block.0.layer.0.layer_norm.weight", True),
    ("decoder.final_layer_norm.weight", True),
    ("linear.weight", False),
    ("shared.weight", False),
    ("lm_head.weight", False),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", False),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),  # an embedding: decayed
    ("decoder.block.0.layer.2.DenseReluDense.wi_0.weight", False),
    ("bias_proj.weight", False),
])
def test_no_decay(name, excluded):
    assert no_decay(name) is excluded


def built_t5() -> T5ForConditionalGeneration:
    """As built. transformers 5 ties ``lm_head`` to ``shared`` whatever ``tie_word_embeddings`` says."""
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                               num_decoder_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                                               tie_word_embeddings=False))


def tiny_t5() -> T5ForConditionalGeneration:
    """The trainer's t5-v1_1 layout: ``lm_head`` has its own matrix (listed last by named_parameters())."""
    return untie_lm_head(built_t5())


ATT = ["q", "k", "v", "o"]
T5_DECAYED = (["shared.weight"]
              + [f"encoder.block.0.layer.0.SelfAttention.{x}.weight" for x in ATT]
              + ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
              + [f"encoder.block.0.layer.1.DenseReluDense.{x}.weight" for x in ["wi_0", "wi_1", "wo"]]
              + [f"decoder.block.0.layer.0.SelfAttention.{x}.weight" for x in ATT]
              + ["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
              + [f"decoder.block.0.layer.1.EncDecAttention.{x}.weight" for x in ATT]
              + [f"decoder.block.0.layer.2.DenseReluDense.{x}.weight" for x in ["wi_0", "wi_1", "wo"]]
              + ["lm_head.weight"])
T5_NOT_DECAYED = ["encoder.block.0.layer.0.layer_norm.weight", "encoder.block.0.layer.1.layer_norm.weight",
                  "encoder.final_layer_norm.weight",
                  "decoder.block.0.layer.0.layer_norm.weight", "decoder.block.0.layer.1.layer_norm.weight",
                  "decoder.block.0.layer.2.layer_norm.weight", "decoder.final_layer_norm.weight"]


class HandMade(torch.nn.Module):
    """Registered out of alphabetical order, decayed and not decayed interleaved, so that the order of each
    group is pinned to ``named_parameters()``."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)  # linear.weight, linear.bias
        self.encoder = torch.nn.Module()
        self.encoder.bias = torch.nn.Parameter(torch.zeros(4))
        self.final_layer_norm = torch.nn.Module()
        self.final_layer_norm.weight = torch.nn.Parameter(torch.ones(4))
        self.head = torch.nn.Linear(4, 2, bias=False)
        self.layer_norm = torch.nn.LayerNorm(4)  # layer_norm.weight, layer_norm.bias
        self.frozen = torch.nn.Linear(2, 2)  # frozen.weight, frozen.bias
        self.frozen.requires_grad_(False)
        self.embed = torch.nn.Embedding(5, 4)


HAND_DECAYED = ["linear.weight", "head.weight", "embed.weight"]
HAND_NOT_DECAYED = ["linear.bias", "encoder.bias", "final_layer_norm.weight", "layer_norm.weight", "layer_norm.bias"]
HAND_FROZEN = {"frozen.weight", "frozen.bias"}

T5_FROZEN = {"shared.weight", "encoder.final_layer_norm.weight"}


@pytest.mark.parametrize("build, frozen, decayed, not_decayed", [
    pytest.param(tiny_t5, set(), T5_DECAYED, T5_NOT_DECAYED, id="t5"),
    pytest.param(tiny_t5, T5_FROZEN, [n for n in T5_DECAYED if n not in T5_FROZEN],
                 [n for n in T5_NOT_DECAYED if n not in T5_FROZEN], id="t5-partly-frozen"),
    pytest.param(HandMade, set(), HAND_DECAYED, HAND_NOT_DECAYED, id="hand-made"),
])
def test_param_groups(build, frozen, decayed, not_decayed):
    model = build()
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    groups = param_groups(model, cfg_of(position_bias_lr_scale=1.0))
    assert len(groups) == 2
    assert [n for n, _ in groups[0]] == decayed
    assert [n for n, _ in groups[1]] == not_decayed
    # The pairs carry the model's own parameter objects; every trainable one is in exactly one group.
    params = dict(model.named_parameters())
    assert all(p is params[n] for group in groups for n, p in group)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(n for group in groups for n, _ in group) == sorted(trainable)
    frozen_now = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen_now & {n for group in groups for n, _ in group}


def test_hand_made_frozen_params_are_in_neither_group():
    model = HandMade()
    names = {n for group in param_groups(model, cfg_of()) for n, _ in group}
    assert {n for n, _ in model.named_parameters()} == names | HAND_FROZEN
    assert not names & HAND_FROZEN


def test_tied_t5_embedding_is_listed_once():
    """A tied lm_head shares ``shared.weight``: named_parameters() lists it once, and so do the groups."""
    model = built_t5()
    assert model.lm_head.weight is model.shared.weight
    decayed, not_decayed = param_groups(model, cfg_of(position_bias_lr_scale=1.0))
    assert [n for n, _ in decayed] == [n for n in T5_DECAYED if n != "lm_head.weight"]
    assert [n for n, _ in not_decayed] == T5_NOT_DECAYED


@pytest.mark.parametrize("build, decayed, not_decayed", [
    pytest.param(tiny_t5, T5_DECAYED, T5_NOT_DECAYED, id="t5"),
    pytest.param(HandMade, HAND_DECAYED, HAND_NOT_DECAYED, id="hand-made"),
])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.1])
def test_build_optimizer_adamw(build, decayed, not_decayed, weight_decay):
    model = build()
    cfg = cfg_of(weight_decay=weight_decay, lr=2e-4, position_bias_lr_scale=1.0)
    opt = build_optimizer(cfg, model, None)
    assert isinstance(opt, torch.optim.AdamW)
    params = dict(model.named_parameters())
    g0, g1 = opt.param_groups
    assert g0["weight_decay"] == weight_decay and g1["weight_decay"] == 0.0
    assert g0["lr"] == g1["lr"] == 2e-4
    assert [id(p) for p in g0["params"]] == [id(params[n]) for n in decayed]
    assert [id(p) for p in g1["params"]] == [id(params[n]) for n in not_decayed]


@pytest.mark.parametrize("ds_config", [{"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
                                       {"optimizer": {}, "zero_optimization": {"stage": 3}}])
def test_build_optimizer_deepspeed_placeholder(ds_config):
    model = HandMade()
    opt = build_optimizer(cfg_of(weight_decay=0.05, lr=1e-3), model, ds_config)  # no position bias: two groups
    assert isinstance(opt, DummyOptim)
    assert opt.lr == 1e-3 and opt.weight_decay == 0.05
    params = dict(model.named_parameters())
    g0, g1 = opt.params
    assert g0["weight_decay"] == 0.05 and g1["weight_decay"] == 0.0
    assert [id(p) for p in g0["params"]] == [id(params[n]) for n in HAND_DECAYED]
    assert [id(p) for p in g1["params"]] == [id(params[n]) for n in HAND_NOT_DECAYED]


@pytest.mark.parametrize("flags, scale", [
    ({}, 10.0),  # tiny is built from its config: random weights
    ({"init_from": "runs/stage1/best"}, 1.0),  # loaded weights (--init_from, --continue_train)
    ({"from_pretrained": "google/t5-v1_1-base"}, 1.0),  # pretrained
    ({"from_pretrained": "google/t5-v1_1-base", "random_init": True}, 10.0),
    ({"from_pretrained": "google/t5-v1_1-base", "position_bias_lr_scale": 3.0}, 3.0),  # as given
    ({"position_bias_lr_scale": 1.0}, 1.0),
])
def test_position_bias_lr_scale_is_automatic_for_random_weights(flags, scale):
    assert position_bias_lr_scale(cfg_of(**flags)) == scale


@pytest.mark.parametrize("ds_config", [None, {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}])
def test_position_bias_tables_get_their_own_group_and_rate(ds_config):
    """With a scale other than 1 the relative position-bias tables leave the decayed group for a third one at
    lr x scale with no decay; every other parameter stays where it was, in the same order."""
    model = tiny_t5()
    bias = ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    decayed, not_decayed, tables = param_groups(model, cfg_of(position_bias_lr_scale=4.0))
    assert [n for n, _ in tables] == bias
    assert [n for n, _ in decayed] == [n for n in T5_DECAYED if n not in bias]
    assert [n for n, _ in not_decayed] == T5_NOT_DECAYED
    opt = build_optimizer(cfg_of(position_bias_lr_scale=4.0, lr=1e-3, weight_decay=0.1), model, ds_config)
    groups = opt.params if isinstance(opt, DummyOptim) else opt.param_groups
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(4e-3) and groups[2]["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    assert [id(p) for p in groups[2]["params"]] == [id(params[n]) for n in bias]
    assert "lr" not in groups[0] or groups[0]["lr"] == 1e-3


def test_the_schedule_scales_the_position_bias_rate_with_the_others():
    model = tiny_t5()
    cfg = cfg_of(position_bias_lr_scale=10.0, lr=1e-3, warmup_ratio=0.5, lr_scheduler="linear")
    opt = build_optimizer(cfg, model, None)
    factor, _ = lr_lambda(cfg, 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for _ in range(4):
        opt.step()
        scheduler.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == lrs[1] and lrs[2] == pytest.approx(10 * lrs[0]) and 0 < lrs[0] < 1e-3


@pytest.mark.parametrize("ds_config", [{}, {"zero_optimization": {"stage": 2}}, {"scheduler": {"type": "WarmupLR"}}])
def test_build_optimizer_deepspeed_json_without_optimizer_is_adamw(ds_config):
    assert isinstance(build_optimizer(cfg_of(), HandMade(), ds_config), torch.optim.AdamW)


# ---------------------------------------------------------------- the DeepSpeed JSON

@pytest.mark.parametrize("ds_config, expected", [
    (None, None),
    ({}, None),
    ({"zero_optimization": {"stage": 2}}, "no"),  # both absent
    ({"bf16": {}}, "no"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"bf16": {"enabled": "true"}}, "bf16"),
    ({"bf16": {"enabled": False}}, "no"),
    ({"bf16": {"enabled": "false"}}, "no"),
    ({"bf16": {"enabled": "auto"}}, "no"),  # Accelerate resolves "auto" from mixed_precision before this is read
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"fp16": {"enabled": "true"}}, "fp16"),
    ({"fp16": {"enabled": False}}, "no"),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": True}}, "fp16"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": False}}, "bf16"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bf16"),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "no"),
])
def test_ds_precision(ds_config, expected):
    assert ds_precision(ds_config) == expected


@pytest.mark.parametrize("ds_config, expected", [
    (None, 0),
    ({}, 0),
    ({"bf16": {"enabled": True}}, 0),
    ({"zero_optimization": {}}, 0),
    ({"zero_optimization": {"stage": 0}}, 0),
    ({"zero_optimization": {"stage": 1}}, 1),
    ({"zero_optimization": {"stage": 2, "overlap_comm": True}}, 2),
    ({"zero_optimization": {"stage": 3}}, 3),
])
def test_zero_stage(ds_config, expected):
    assert zero_stage(ds_config) == expected


@pytest.mark.parametrize("parameters, d_model, expected", [
    (0, 16, 256),  # lower clamp: d_model squared
    (1_000, 16, 256),  # a sixteenth (62) is below d_model squared
    (4_096, 16, 256),  # a sixteenth is exactly d_model squared
    (4_112, 16, 257),  # one above it
    (4_127, 16, 257),  # a sixteenth is rounded down
    (77_000_000, 512, 4_812_500),  # t5-small-like: a sixteenth
    (783_150_080, 1024, 48_946_880),  # t5-large-like: a sixteenth
    (8_000_000_000, 4096, 500_000_000),  # a sixteenth is exactly the cap
    (8_000_000_016, 4096, 500_000_000),  # upper clamp, just
    (11_000_000_000, 1024, 500_000_000),  # upper clamp
    (0, 30_000, 500_000_000),  # d_model squared (9e8) clamped too
    (0, 22_360, 499_969_600),  # d_model squared just below the cap
])
def test_bucket_elements(parameters, d_model, expected):
    got = bucket_elements(parameters, d_model)
    assert got == expected and type(got) is int


AUTO_ZERO3 = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto"}}


@pytest.mark.parametrize("ds_config, batch_size, max_grad_norm, global_batch, parameters, d_model, expected", [
    pytest.param(AUTO_ZERO3, 4, 0.7, 32, 77_000_000, 512,
                 {"gradient_clipping": 0.7, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 32,
                  "zero_optimization": {"stage": 3, "reduce_bucket_size": 4_812_500,
                                        "stage3_prefetch_bucket_size": 4_812_500,
                                        "stage3_param_persistence_threshold": "auto",  # not this function's
                                        # absent keys sized like the buckets, not DeepSpeed's 1e9 (ZERO3_SCALED)
                                        "stage3_max_live_parameters": 4_812_500,
                                        "stage3_max_reuse_distance": 4_812_500, "sub_group_size": 4_812_500}},
                 id="all-auto"),
    pytest.param(AUTO_ZERO3, 2, 0.0, 4, 1_000, 16,  # clipping off; the bucket's lower clamp
                 {"gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
                  "zero_optimization": {"stage": 3, "reduce_bucket_size": 256, "stage3_prefetch_bucket_size": 256,
                                        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 256,
                                        "stage3_max_reuse_distance": 256, "sub_group_size": 256}},
                 id="auto-small-model"),
    pytest.param({"gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                  "zero_optimization": {"stage": 2, "reduce_bucket_size": 200_000_000}}, 8, 1.0, 64, 77_000_000, 512,
                 {"gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 8, "train_batch_size": 64,
                  "zero_optimization": {"stage": 2, "reduce_bucket_size": 200_000_000}},
                 id="explicit-numbers-kept"),
    pytest.param({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1e7, "stage3_prefetch_bucket_size": "auto",
                                        "stage3_max_reuse_distance": 1e9}},  # a number the JSON names is kept
                 1, 1.0, 2, 11_000_000_000, 1024,
                 {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2,
                  "zero_optimization": {"stage": 3, "reduce_bucket_size": 1e7,
                                        "stage3_prefetch_bucket_size": 500_000_000, "stage3_max_reuse_distance": 1e9,
                                        "stage3_max_live_parameters": 500_000_000, "sub_group_size": 500_000_000}},
                 id="mixed-upper-clamp"),
    pytest.param({"train_micro_batch_size_per_gpu": 16, "train_batch_size": 128}, 3, 1.0, 24, 10, 16,
                 # the batch sizes are always the trainer's (no DataLoader goes through prepare())
                 {"train_micro_batch_size_per_gpu": 3, "train_batch_size": 24},
                 id="batch-sizes-overwritten-no-zero-section"),
    pytest.param({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, 5, 1.0, 10, 10, 16,
                 {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                  "train_micro_batch_size_per_gpu": 5, "train_batch_size": 10},
                 id="no-auto-keys"),
])
def test_fill_deepspeed_sizes(ds_config, batch_size, max_grad_norm, global_batch, parameters, d_model, expected):
    ds_config = json.loads(json.dumps(ds_config))  # a fresh copy: the function fills it in place
    result = fill_deepspeed_sizes(ds_config, cfg_of(batch_size=batch_size, max_grad_norm=max_grad_norm),
                                  global_batch, parameters, d_model)
    assert result is None
    assert ds_config == expected


# ---------------------------------------------------------------- stages of a chain of runs

@pytest.mark.parametrize("summary, expected", [
    ({"experiment": "distill b1", "model_type": "task_prefix_tree1", "final_step": 120, "wall_s": 33.5},
     {"experiment": "distill b1", "final_step": 120, "wall_s": 33.5}),
    ({"model_type": "task_prefix_tree2", "final_step": 7, "wall_s": 1.0},  # older summaries: no experiment
     {"experiment": "task_prefix_tree2", "final_step": 7, "wall_s": 1.0}),
    ({"final_step": 0, "wall_s": 0.0}, {"experiment": None, "final_step": 0, "wall_s": 0.0}),
    ({"experiment": "x", "final_step": 3, "wall_s": 2.5, "test_accuracy": 0.5, "stages": [{"final_step": 1}],
      "parameters": 10}, {"experiment": "x", "final_step": 3, "wall_s": 2.5}),  # nothing else is carried
])
def test_stage_cost(summary, expected):
    assert stage_cost(summary) == expected


A_SUMMARY = {"experiment": "stage1", "model_type": "task_prefix_tree1", "final_step": 100, "wall_s": 50.0,
             "test_accuracy": 0.4}
OLD_STAGES = [{"experiment": "s0", "final_step": 10, "wall_s": 5.0},
              {"experiment": "s1", "final_step": 20, "wall_s": 6.0}]


@pytest.mark.parametrize("summary_text, expected", [
    (None, []),  # the export's run folder has no summary.json
    (json.dumps(A_SUMMARY), [{"experiment": "stage1", "final_step": 100, "wall_s": 50.0}]),  # no "stages"
    (json.dumps({**A_SUMMARY, "stages": []}), [{"experiment": "stage1", "final_step": 100, "wall_s": 50.0}]),
    (json.dumps({**A_SUMMARY, "stages": OLD_STAGES}), OLD_STAGES),
    (json.dumps({"model_type": "task_prefix_tree1", "final_step": 9, "wall_s": 1.5}),
     [{"experiment": "task_prefix_tree1", "final_step": 9, "wall_s": 1.5}]),
    ("{not json", []),  # unreadable
    ("", []),
    ("\xff\xfe garbage", []),
    (json.dumps({"model_type": "task_prefix_tree1"}), []),  # not a finished run's summary
    (json.dumps([A_SUMMARY]), []),
])
@pytest.mark.parametrize("export", ["best", "final"])
def test_earlier_stages(tmp_path, summary_text, expected, export):
    run = tmp_path / "runA"
    (run / export).mkdir(parents=True)
    if summary_text is not None:
        (run / "summary.json").write_text(summary_text, encoding="latin-1")
    assert earlier_stages(str(run / export)) == expected
    assert earlier_stages(str(run / export) + "/") == expected  # a trailing slash names the same export


def test_earlier_stages_without_init_from_or_folder(tmp_path):
    assert earlier_stages("") == []
    assert earlier_stages(str(tmp_path / "missing" / "best")) == []
    (tmp_path / "summary.json").mkdir()  # a folder where the file should be: unreadable
    assert earlier_stages(str(tmp_path / "best")) == []


def test_chain_of_three_runs(tmp_path):
    """As the loop writes it: ``stages = earlier_stages(init_from) + [stage_cost(summary)]``, run by run."""
    def finish(name, init_from, **summary):
        summary["stages"] = earlier_stages(init_from) + [stage_cost(summary)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        return summary

    a = finish("A", "", experiment="tree1", model_type="task_prefix_tree1", final_step=100, wall_s=60.0)
    assert a["stages"] == [{"experiment": "tree1", "final_step": 100, "wall_s": 60.0}]
    b = finish("B", str(tmp_path / "A" / "best"), model_type="task_prefix_tree2", final_step=40, wall_s=25.0)
    assert b["stages"] == [{"experiment": "tree1", "final_step": 100, "wall_s": 60.0},
                           {"experiment": "task_prefix_tree2", "final_step": 40, "wall_s": 25.0}]
    c = finish("C", str(tmp_path / "B" / "final"), experiment="tree3", final_step=5, wall_s=2.0)
    assert c["stages"] == [{"experiment": "tree1", "final_step": 100, "wall_s": 60.0},
                           {"experiment": "task_prefix_tree2", "final_step": 40, "wall_s": 25.0},
                           {"experiment": "tree3", "final_step": 5, "wall_s": 2.0}]
    assert sum(s["final_step"] for s in c["stages"]) == 145
    assert sum(s["wall_s"] for s in c["stages"]) == 87.0


def test_chain_from_a_run_without_stages(tmp_path):
    """A stage-1 summary written before "stages" existed still counts as one stage."""
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "summary.json").write_text(json.dumps({"model_type": "task_prefix_tree1", "final_step": 30,
                                                             "wall_s": 12.0}))
    b = {"experiment": "tree2", "final_step": 10, "wall_s": 4.0}
    assert earlier_stages(str(tmp_path / "A" / "best")) + [stage_cost(b)] == [
        {"experiment": "task_prefix_tree1", "final_step": 30, "wall_s": 12.0},
        {"experiment": "tree2", "final_step": 10, "wall_s": 4.0}]


# ---------------------------------------------------------------- the printed table

@pytest.mark.parametrize("rows, expected", [
    ([("steps", 10)], "\n  steps  10\n"),
    ([("steps", 10), ("final train loss", "0.1234"), ("wall time", "12 s")],
     "\n"
     "  steps             10\n"
     "  final train loss  0.1234\n"
     "  wall time         12 s\n"),
    ([("a", 1.5), ("bb", None), ("", "x"), ("cccc", [1, 2])],
     "\n"
     "  a     1.5\n"
     "  bb    None\n"
     "        x\n"
     "  cccc  [1, 2]\n"),
    ([("longest name first", 0), ("x", "")],
     "\n"
     "  longest name first  0\n"
     "  x                   \n"),
])
def test_format_table(rows, expected):
    assert format_table(rows) == expected


@pytest.mark.parametrize("names", [["a"], ["ab", "a"], ["one", "three", "seventeen", "x"], ["é", "ab"]])
def test_format_table_values_start_in_one_column(names):
    lines = format_table([(n, "V") for n in names]).split("\n")
    assert lines[0] == "" and lines[-1] == ""
    width = max(len(n) for n in names)
    assert [line.index("V") for line in lines[1:-1]] == [2 + width + 2] * len(names)
