"""Building a run: :func:`setup` turns the flags into a :class:`Run`, everything a run needs that does not change
while it trains.

In order: the accelerator (refusing, before anything is written, to train from scratch over an earlier run's
checkpoints); the data (tokenizer, memory-mapped tables, the training rows' token lengths); the batch, fitted to
the data before anything is built from the flags (:func:`fit_batch_to_data`); the collator; the model inside its
objective, with the optimizer and the lr schedule, prepared by Accelerate (DDP or a DeepSpeed engine).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.utils import DummyScheduler, set_seed

from mindmirror.config import TrainConfig
from mindmirror.core import checkpoint, elastic, runtime
from mindmirror.core.collate import Collator, grouping_lengths
from mindmirror.core.flops import sample_flops
from mindmirror.core.objective import DistillationObjective
from mindmirror.core.optim import build_optimizer, lr_lambda
from mindmirror.core.runtime import peak_memory_mb
from mindmirror.data.loader import TOKEN_COLUMNS, load_data, token_lengths
from mindmirror.evaluation import evaluate
from mindmirror.model import load_model, load_tokenizer

if TYPE_CHECKING:
    from collections.abc import Callable

    from accelerate import Accelerator
    from accelerate.scheduler import AcceleratedScheduler
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

    from mindmirror.data.registry import BuildReport

    Scheduler = torch.optim.lr_scheduler.LambdaLR | AcceleratedScheduler  # the loop's schedule, or DeepSpeed's own

log = logging.getLogger("mindmirror")


@dataclass
class Run:
    """What :func:`setup` builds: everything a run needs that does not change while it trains."""

    cfg: TrainConfig  # the flags, the micro-batch fitted to the data
    accelerator: Accelerator
    out: Path
    tokenizer: PreTrainedTokenizerBase
    tables: dict[str, Dataset]  # "train", "valid", "test"
    report: BuildReport  # the data build's report (skipped questions)
    objective: torch.nn.Module  # the prepared DistillationObjective (a DDP module or a DeepSpeed engine)
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper
    scheduler: Scheduler
    layout: elastic.Layout
    train_rows: Dataset  # the training table's token columns, read a micro-batch at a time
    lengths: np.ndarray  # each training row's tokens, for length grouping
    target_tokens: np.ndarray  # each training row's target tokens: (answer, rationale), for the step's global counts
    input_tokens: np.ndarray  # each training row's input tokens (both tasks'), for tokens/s
    step_flops: Callable[[list[int]], int]  # rows -> model FLOPs of a step (both tasks, forward + backward)
    collate: Collator
    alpha: float
    global_batch: int  # questions per optimizer step, over all ranks
    steps_per_epoch: int
    total_steps: int
    precision: str
    parameters: int
    metric_kind: str
    requested: dict  # the flags as given (the batch may since be fitted to the data)
    figures: dict  # setup's own measurements: data load time, memory before and after the build, weights' dtype

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def t5(self) -> T5ForConditionalGeneration:
        """The student model inside the prepared objective (partitioned under ZeRO-3)."""
        return self.accelerator.unwrap_model(self.objective).t5


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, data, batch, collator, model, optimizer and schedule. Refuses, before writing anything, to
    train from scratch over an earlier run's checkpoints."""
    accelerator = runtime.build_accelerator(cfg)
    runtime.set_cpu_threads()
    out = Path(cfg.output_dir)
    if not cfg.resume:  # never train from scratch over an earlier run's checkpoints or best/: stop before writing
        checkpoint.refuse_to_overwrite(accelerator, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    requested = asdict(cfg)
    set_seed(cfg.seed)
    world = accelerator.num_processes

    # ---- data, then the batch fitted to it: every later part is built from the fitted flags ----
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.from_pretrained, cfg.random_init)
    t_data = time.time()
    tables, report = load_data(cfg, tokenizer, accelerator,
                               limits={"valid": cfg.max_eval_samples, "test": cfg.max_test_samples})
    data_s = time.time() - t_data
    if accelerator.is_main_process:
        log.info(report.summary(cfg.dataset))
    row_lengths = token_lengths(tables["train"])  # rows stay in the memory-mapped table; only lengths live in memory
    lengths = grouping_lengths(row_lengths)
    cfg, global_batch = fit_batch_to_data(cfg, len(lengths), world)
    steps_per_epoch = len(lengths) // global_batch
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    collate = build_collator(cfg, accelerator, tokenizer.pad_token_id)

    # ---- model, optimizer, schedule ----
    mem_before_model = peak_memory_mb()  # the scaling study sets the model's share against the estimate
    ds_config = runtime.deepspeed_config(accelerator)
    objective, optimizer, scheduler, parameters = build_and_prepare(cfg, accelerator, ds_config, tokenizer,
                                                                    global_batch, total_steps)
    mem_built = peak_memory_mb()  # the model's and DeepSpeed's share, before any step (summary.json)
    stage = runtime.zero_stage(ds_config)
    precision = str(runtime.ds_precision(ds_config) or accelerator.mixed_precision)
    t5 = accelerator.unwrap_model(objective).t5
    if accelerator.is_main_process:
        log.info(f"model {cfg.from_pretrained}: {parameters / 1e6:.2f}M parameters; {world} process(es), "
                 f"ZeRO stage {stage}, {accelerator.mixed_precision} precision; global batch {global_batch} "
                 f"questions; {steps_per_epoch} steps/epoch, {total_steps} steps")
    accelerator.init_trackers("mindmirror", config={k: v for k, v in asdict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})
    with_rationale = cfg.model_type != "standard"
    target_tokens, input_tokens = row_tokens(row_lengths, with_rationale)
    return Run(
        cfg=cfg, accelerator=accelerator, out=out, tokenizer=tokenizer, tables=tables, report=report,
        objective=objective, optimizer=optimizer, scheduler=scheduler,
        layout=elastic.Layout(world, stage, ds_config is not None, precision),
        train_rows=tables["train"].select_columns([c for c in TOKEN_COLUMNS if c in row_lengths]), lengths=lengths,
        target_tokens=target_tokens, input_tokens=input_tokens, step_flops=flops_counter(t5.config, row_lengths),
        collate=collate, alpha=cfg.alpha if with_rationale else 1.0, global_batch=global_batch,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, precision=precision, parameters=parameters,
        metric_kind=evaluate.metric_kind(cfg.dataset, cfg.model_type), requested=requested,
        figures={"data_s": data_s, "mem_before_model": mem_before_model, "mem_built": mem_built,
                 "param_dtype": str(next(t5.parameters()).dtype).removeprefix("torch.")})


def build_collator(cfg: TrainConfig, accelerator: Accelerator, pad_id: int) -> Collator:
    """Rows -> padded tensors, pinned on GPU. Under ZeRO-3 both tasks' rows go through the model in one pass (a
    module called twice stays gathered)."""
    on_gpu = accelerator.device.type == "cuda"
    return Collator(pad_id, cfg.model_type != "standard", cfg.pad_to_multiple_of or (8 if on_gpu else 1),
                    pin_memory=on_gpu, stacked=runtime.is_zero3(accelerator))


def build_and_prepare(cfg: TrainConfig, accelerator: Accelerator, ds_config: dict | None,
                      tokenizer: PreTrainedTokenizerBase, global_batch: int, total_steps: int
                      ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Scheduler, int]:
    """The objective around the student model, AdamW and the lr schedule, prepared by Accelerate (``ds_config``:
    the launch's DeepSpeed JSON, its "auto" sizes filled here; None without DeepSpeed), and the model's
    parameter count: ``(objective, optimizer, scheduler, parameters)``."""
    zero3 = runtime.is_zero3(accelerator)
    # ZeRO-3 with Accelerate's zero3_init_flag (its default under ZeRO-3) builds a size-named model partitioned, so no
    # rank ever holds it whole; with the flag off it is built whole, with the initial weights of a run without ZeRO.
    partitioned = zero3 and accelerator.state.deepspeed_plugin.is_zero3_init_enabled()
    model = DistillationObjective(load_model(cfg.from_pretrained, tokenizer, cfg.random_init, cfg.init_from,
                                             cfg.vocab_size, partitioned=partitioned))
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.t5.parameters())
    if partitioned:
        log.info(f"rank {accelerator.process_index}: built partitioned: holds {held_elements(model.t5)} of "
                 f"{parameters} parameter elements")
    model.config = model.t5.config  # DeepSpeed's "auto" sizes read config.hidden_size
    if cfg.gradient_checkpointing:
        model.t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ds_config is not None:
        runtime.fill_deepspeed_sizes(ds_config, cfg, global_batch, parameters, model.config.d_model)
    optimizer = build_optimizer(cfg, model, ds_config)
    factor, warmup = lr_lambda(cfg, total_steps)
    if ds_config and "scheduler" in ds_config:  # DeepSpeed's own schedule, stepped by its engine
        # Accelerate divides an "auto" total_num_steps by the process count (it expects data-loader batches of all
        # ranks), but the engine steps the schedule once per optimizer step: give it optimizer steps x processes.
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps * accelerator.num_processes,
                                   warmup_num_steps=warmup)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        # Built on the prepared optimizer (a DummyOptim has no param groups) and stepped by this loop
        # once per optimizer step; prepare() would step it once per process.
        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        accelerator.register_for_checkpointing(scheduler)
    if zero3:
        freed = runtime.share_fp32_masters(model)
        if freed:
            log.info(f"rank {accelerator.process_index}: ZeRO-3's fp32 master weights are the parameter partitions "
                     f"({freed / 2**20:.0f} MiB not copied)")
        # Show that parameters really are partitioned: each rank holds a share.
        log.info(f"rank {accelerator.process_index}: ZeRO-3 holds {held_elements(accelerator.unwrap_model(model).t5)} "
                 f"of {parameters} parameter elements")
    return model, optimizer, scheduler, parameters


def held_elements(module: torch.nn.Module) -> int:
    """The parameter elements this rank holds of ``module``: its shards of partitioned parameters, the rest whole."""
    return sum(getattr(p, "ds_tensor", p).numel() for p in module.parameters())


def eval_batch_size(cfg: TrainConfig) -> int:
    """Rows generated at once per process at evaluation: ``--eval_batch_size``, or 4 x the micro-batch."""
    return cfg.eval_batch_size or 4 * cfg.batch_size


def fit_batch_to_data(cfg: TrainConfig, rows: int, world: int) -> tuple[TrainConfig, int]:
    """The flags with the micro-batch fitted to ``rows`` training rows, and the global batch (questions per
    optimizer step: micro-batch x accumulation steps x processes). A data set smaller than the global batch
    trains, as the original Trainer does: the micro-batch is clamped so that one step holds every row (with a
    warning), instead of stopping the run."""
    per_row = cfg.grad_accum_steps * world  # micro-batch rows in one optimizer step, over all ranks
    global_batch = cfg.batch_size * per_row
    if rows >= global_batch:
        return cfg, global_batch
    fitted = rows // per_row
    if fitted == 0:
        raise ValueError(f"{rows} training rows cannot be shared by {world} process(es) x {cfg.grad_accum_steps} "
                         "accumulation steps: use fewer processes or a smaller --grad_accum_steps")
    log.warning(f"the global batch ({global_batch} = batch_size x grad_accum_steps x processes) is larger than the "
                f"{rows} training rows: --batch_size {cfg.batch_size} lowered to {fitted} for this run")
    return dataclasses.replace(cfg, batch_size=fitted), fitted * per_row


def row_tokens(row_lengths: dict[str, np.ndarray], with_rationale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each training row's target tokens as ``(answer, rationale)`` (a step's global counts come from them) and
    its input tokens, both tasks' (for tokens/s)."""
    labels = row_lengths["labels"]
    targets = np.stack([labels, row_lengths["rationale_ids"] if with_rationale else np.zeros_like(labels)], axis=1)
    return targets, row_lengths["input_ids"] + (row_lengths["expl_input_ids"] if with_rationale else 0)


def flops_counter(config, row_lengths: dict[str, np.ndarray]) -> Callable[[list[int]], int]:
    """rows -> the model FLOPs of training on them (both tasks, forward + backward, real tokens only), for MFU."""
    rows = len(next(iter(row_lengths.values())))
    columns = [row_lengths.get(c, np.zeros(rows, dtype=np.int64)) for c in TOKEN_COLUMNS]
    of_lengths = functools.lru_cache(maxsize=None)(functools.partial(sample_flops, config))

    def step_flops(indices: list[int]) -> int:
        return sum(of_lengths(*(int(column[i]) for column in columns)) for i in indices)

    return step_flops
