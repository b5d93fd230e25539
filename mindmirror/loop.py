"""The training loop: read it top to bottom.

:func:`train` is the whole run: :func:`setup` builds the accelerator, data, model, optimizer and schedule
into a :class:`Run`; :meth:`Trainer.start` resumes (or starts) a :class:`TrainState`; then for each
optimizer step: stop?, :meth:`Trainer.train_step` (this rank's micro-batches, one clip and step),
``maybe_log``, ``maybe_evaluate`` (stop? before each batch), ``maybe_save``; at the end the ``final/``
export, the test of the ``best/`` export, and ``summary.json``. The loop raises; the command line
(:mod:`mindmirror.cli`) turns errors and a preemption into exit codes and sets up logging.

A step never waits for the device (no device-to-host read) except at logging steps: the step's token counts
come from the rows' lengths, known on every rank; the stop vote is a sum over a CPU (gloo) group, started at
the end of a step and read at the start of the next; a non-finite step is skipped on the device (a fused
AdamW's ``found_inf``, or DeepSpeed's own check) and the loop reads the steps' finiteness and gradient norms
at the next log line. Only a non-fused optimizer (the CPU default, where the device is the host) needs the
finiteness before its step. So the host collates the next step while the device works on this one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import psutil
import torch
from accelerate.utils import DummyScheduler, set_seed
from tqdm.auto import tqdm

from mindmirror import checkpoint, elastic, estimate, evaluate, logs, runfiles, runtime, weights
from mindmirror.collate import Collator, grouping_lengths, rank_micro_batches, step_batches
from mindmirror.config import TrainConfig
from mindmirror.data.loader import TOKEN_COLUMNS, load_data, token_lengths
from mindmirror.data.registry import DATASETS
from mindmirror.model import load_model, load_tokenizer
from mindmirror.objective import DistillationObjective, combine
from mindmirror.optim import build_optimizer, lr_lambda, param_groups
from mindmirror.runtime import Preemption, peak_memory_mb, shut_down

log = logging.getLogger("mindmirror")
EXIT_PREEMPTED = 75  # a signal asked us to stop: state saved; the SLURM template requeues on this code
# Fault injection for tests (harmless when unset, and nothing sets them but the tests): make the loss of
# these (comma-separated) steps NaN; SIGKILL every rank when it is about to run this step; make the
# checkpoint saved on a stop signal take this many seconds longer (a multi-GB save), its files appearing
# only at the end; make every batch of a validation or test evaluation take this many seconds longer (a
# large model's generation).
FAULT_NAN_STEPS, FAULT_KILL_AT_STEP = "MINDMIRROR_FAULT_NAN_STEPS", "MINDMIRROR_FAULT_KILL_AT_STEP"
FAULT_SLOW_SAVE_S, FAULT_SLOW_EVAL_S = "MINDMIRROR_FAULT_SLOW_SAVE_S", "MINDMIRROR_FAULT_SLOW_EVAL_S"
EXAMPLES = 3  # test questions shown with the student's rationale at the end of a run


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the last good state is saved."""


class Preempted(Exception):
    """A stop signal arrived and the state is saved; the command line exits with :data:`EXIT_PREEMPTED`."""

    exit_code = EXIT_PREEMPTED


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint (``trainer_state.json``) and restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # steps done of this epoch's plan
    samples: int = 0  # questions trained on
    best_valid_accuracy: float = -1.0
    best_step: int = -1
    nonfinite_steps: int = 0  # skipped steps in all
    last_eval_step: int = -1
    last_loss: float | None = None  # of the latest log window
    evaluation_pending: bool = False  # a stop signal cut this step's evaluation short: a resumed run repeats it

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Take the known fields of ``saved`` (a checkpoint also records its layout; older ones lack fields)."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclass
class Run:
    """What :func:`setup` builds: everything a run needs that does not change while it trains."""

    cfg: TrainConfig
    accelerator: object
    out: Path
    tokenizer: object
    tables: dict
    report: object  # the data build's report (skipped questions)
    model: object  # the prepared DistillationObjective (DDP or DeepSpeed engine)
    optimizer: object
    scheduler: object
    layout: elastic.Layout
    train_rows: object  # the training table's token columns, read a micro-batch at a time
    lengths: np.ndarray  # each training row's tokens, for length grouping
    target_tokens: np.ndarray  # each training row's target tokens: (answer, rationale), for the step's global counts
    input_tokens: np.ndarray  # each training row's input tokens (both tasks'), for tokens/s
    step_flops: object  # rows -> model FLOPs of a step (both tasks, forward + backward)
    collate: Collator
    alpha: float
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    precision: str
    parameters: int
    metric_kind: str
    requested: dict  # the flags as given (the batch may since be fitted to the data)
    figures: dict  # setup's own measurements: data load time, memory before and after the build

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def t5(self):
        return self.accelerator.unwrap_model(self.model).t5


# ---------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate and export as ``cfg`` says; returns the summary written to ``summary.json``."""
    t_start = time.time()
    preemption = Preemption()
    run = setup(cfg)
    trainer = Trainer(run, preemption)
    with trainer:
        trainer.start()
        bar = tqdm(total=run.total_steps, initial=trainer.state.step, disable=not run.is_main, desc="training",
                   dynamic_ncols=True)
        for rows in trainer.step_rows():
            micro, counts = trainer.collate_step(rows)  # while the device still runs the previous step
            if trainer.stop_agreed():  # a signal reached some rank by the end of the last step (off the device)
                bar.close()
                trainer.save_and_stop()
            trainer.train_step(micro, counts, rows)
            bar.update(1)
            trainer.maybe_log(bar)
            trainer.maybe_evaluate()
            trainer.maybe_save()
            trainer.vote_on_stop()
        bar.close()
        return trainer.finish(t_start)


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, data, model, optimizer and schedule. Refuses, before writing anything, to train from
    scratch over an earlier run's checkpoints."""
    accelerator = runtime.build_accelerator(cfg)
    runtime.set_cpu_threads()
    out = Path(cfg.output_dir)
    if not cfg.resume:  # never train from scratch over an earlier run's checkpoints or best/: stop before writing
        checkpoint.refuse_to_overwrite(accelerator, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    requested = asdict(cfg)
    set_seed(cfg.run)
    world = accelerator.num_processes

    # ---- data ----
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.from_pretrained, cfg.random_init)
    t_data = time.time()
    tables, report = load_data(cfg, tokenizer, accelerator,
                               limits={"valid": cfg.max_eval_samples, "test": cfg.max_test_samples})
    data_s = time.time() - t_data
    if accelerator.is_main_process:
        log.info(report.summary(cfg.dataset))
    train_table = tables["train"]
    row_lengths = token_lengths(train_table)  # rows stay in the memory-mapped table; only lengths live in memory
    lengths = grouping_lengths(row_lengths)
    with_rationale = cfg.model_type != "standard"
    on_gpu = accelerator.device.type == "cuda"
    zero3 = runtime.is_zero3(accelerator)
    # Under ZeRO-3 both tasks' rows go through the model in one pass (a module called twice stays gathered).
    collate = Collator(tokenizer.pad_token_id, with_rationale, cfg.pad_to_multiple_of or (8 if on_gpu else 1),
                       pin_memory=on_gpu, stacked=zero3)
    cfg = fit_batch_to_data(cfg, len(lengths), world)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * world
    steps_per_epoch = len(lengths) // global_batch
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    # ---- model, optimizer, schedule ----
    mem_before_model = peak_memory_mb()  # the scaling study sets the model's share against the estimate
    # ZeRO-3 with Accelerate's zero3_init_flag (its default under ZeRO-3) builds a size-named model partitioned, so no
    # rank ever holds it whole; with the flag off it is built whole, with the initial weights of a run without ZeRO.
    partitioned = zero3 and accelerator.state.deepspeed_plugin.is_zero3_init_enabled()
    model = DistillationObjective(load_model(cfg.from_pretrained, tokenizer, cfg.random_init, cfg.init_from,
                                             cfg.vocab_size, partitioned=partitioned))
    if partitioned:
        built = list(model.t5.parameters())
        log.info(f"rank {accelerator.process_index}: built partitioned: holds "
                 f"{sum(getattr(p, 'ds_tensor', p).numel() for p in built)} of "
                 f"{sum(getattr(p, 'ds_numel', p.numel()) for p in built)} parameter elements")
    model.config = model.t5.config  # DeepSpeed's "auto" sizes read config.hidden_size
    if cfg.gradient_checkpointing:
        model.t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.t5.parameters())
    ds_config = runtime.deepspeed_config(accelerator)
    if ds_config is not None:
        runtime.fill_deepspeed_sizes(ds_config, cfg, global_batch, parameters, model.config.d_model)
    optimizer = build_optimizer(cfg, model, ds_config)
    factor, warmup = lr_lambda(cfg, total_steps)
    if ds_config and "scheduler" in ds_config:  # DeepSpeed's own schedule, stepped by its engine
        # Accelerate divides an "auto" total_num_steps by the process count (it expects data-loader batches of all
        # ranks), but the engine steps the schedule once per optimizer step: give it optimizer steps x processes.
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps * world, warmup_num_steps=warmup)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        # Built on the prepared optimizer (a DummyOptim has no param groups) and stepped by this loop
        # once per optimizer step; prepare() would step it once per process.
        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        accelerator.register_for_checkpointing(scheduler)
    stage = runtime.zero_stage(ds_config)
    if zero3:
        freed = runtime.share_fp32_masters(model)
        if freed:
            log.info(f"rank {accelerator.process_index}: ZeRO-3's fp32 master weights are the parameter partitions "
                     f"({freed / 2**20:.0f} MiB not copied)")
    mem_built = peak_memory_mb()  # the model's and DeepSpeed's share, before any step (summary.json)
    precision = str(runtime.ds_precision(ds_config) or accelerator.mixed_precision)
    t5_params = list(accelerator.unwrap_model(model).t5.parameters())
    if zero3:  # show that parameters really are partitioned: each rank holds a share
        held = sum(p.ds_tensor.numel() for p in t5_params if hasattr(p, "ds_tensor"))
        log.info(f"rank {accelerator.process_index}: ZeRO-3 holds {held} of {parameters} parameter elements")
    if accelerator.is_main_process:
        log.info(f"model {cfg.from_pretrained}: {parameters / 1e6:.2f}M parameters; {world} process(es), "
                 f"ZeRO stage {stage}, {accelerator.mixed_precision} precision; global batch {global_batch} "
                 f"questions; {steps_per_epoch} steps/epoch, {total_steps} steps")
    accelerator.init_trackers("mindmirror", config={k: v for k, v in asdict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})
    return Run(
        cfg=cfg, accelerator=accelerator, out=out, tokenizer=tokenizer, tables=tables, report=report, model=model,
        optimizer=optimizer, scheduler=scheduler, layout=elastic.Layout(world, stage, ds_config is not None, precision),
        train_rows=train_table.select_columns([c for c in TOKEN_COLUMNS if c in row_lengths]), lengths=lengths,
        target_tokens=np.stack([row_lengths["labels"], row_lengths["rationale_ids"] if with_rationale
                                else np.zeros_like(row_lengths["labels"])], axis=1),
        input_tokens=row_lengths["input_ids"] + (row_lengths["expl_input_ids"] if with_rationale else 0),
        step_flops=flops_counter(accelerator.unwrap_model(model).t5.config, row_lengths),
        collate=collate, alpha=cfg.alpha if with_rationale else 1.0, global_batch=global_batch,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, precision=precision, parameters=parameters,
        metric_kind=evaluate.metric_kind(cfg.dataset, cfg.model_type), requested=requested,
        figures={"data_s": data_s, "mem_before_model": mem_before_model, "mem_built": mem_built,
                 "param_dtype": str(t5_params[0].dtype).removeprefix("torch.")})


def eval_batch_size(cfg: TrainConfig) -> int:
    """Rows generated at once per process at evaluation: ``--eval_batch_size``, or 4 x the micro-batch."""
    return cfg.eval_batch_size or 4 * cfg.batch_size


def fit_batch_to_data(cfg: TrainConfig, rows: int, world: int) -> TrainConfig:
    """A data set smaller than the global batch trains, as the original Trainer does: the micro-batch is
    clamped so that one step holds every row (with a warning), instead of stopping the run."""
    global_batch = cfg.batch_size * cfg.grad_accum_steps * world
    if rows >= global_batch:
        return cfg
    fitted = rows // (cfg.grad_accum_steps * world)
    if fitted == 0:
        raise ValueError(f"{rows} training rows cannot be shared by {world} process(es) x {cfg.grad_accum_steps} "
                         "accumulation steps: use fewer processes or a smaller --grad_accum_steps")
    log.warning(f"the global batch ({global_batch} = batch_size x grad_accum_steps x processes) is larger than the "
                f"{rows} training rows: --batch_size {cfg.batch_size} lowered to {fitted} for this run")
    return dataclasses.replace(cfg, batch_size=fitted)


def flops_counter(config, row_lengths: dict[str, np.ndarray]):
    """rows -> the model FLOPs of training on them (both tasks, forward + backward, real tokens only), for MFU."""
    rows = len(next(iter(row_lengths.values())))
    columns = [row_lengths.get(c, np.zeros(rows, dtype=np.int64)) for c in TOKEN_COLUMNS]
    of_lengths = functools.lru_cache(maxsize=None)(functools.partial(estimate.sample_flops, config))

    def step_flops(indices: list[int]) -> int:
        return sum(of_lengths(*(int(column[i]) for column in columns)) for i in indices)

    return step_flops


def hold_schedule(scheduler, steps: int) -> None:
    """Set the loop's lr schedule back by ``steps`` steps that turned out skipped, as if it had not been stepped
    for them (the lr of each group as ``LambdaLR`` computes it). DeepSpeed's own scheduler is its engine's."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # under Accelerate's wrapper
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    scheduler.last_epoch -= steps
    lrs = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


class LogWindow:
    """What is summed between two log lines: this rank's loss sums (on the device, read only at log time),
    the steps' global target-token counts (host integers), tokens seen by all ranks, model FLOPs and steps."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums, self.counts = torch.zeros(2, device=self.device), np.zeros(2, dtype=np.int64)
        self.tokens = self.flops = self.steps = 0
        self.t0 = time.time()

    def add(self, sums: torch.Tensor, counts: np.ndarray, tokens: int, flops: int) -> None:
        self.sums += sums
        self.counts += counts
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def record(self, run: Run, step: int, lr: float, grad_norm: float, peak: float | None) -> dict:
        """The log line of the window (losses averaged over every rank's tokens); starts a new window."""
        sums = run.accelerator.reduce(self.sums, reduction="sum").cpu()
        label, rationale = (sums / torch.tensor(self.counts, dtype=torch.float32).clamp(min=1)).tolist()
        elapsed = time.time() - self.t0
        record = {"step": step, "loss": run.alpha * label + (1 - run.alpha) * rationale, "label_loss": label,
                  "rationale_loss": rationale, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": self.tokens / elapsed, "samples_per_s": self.steps * run.global_batch / elapsed,
                  "model_flops_per_s": self.flops / elapsed, "peak_mem_mb": peak_memory_mb()}
        achieved = estimate.mfu(self.flops / elapsed / run.world, peak)
        if achieved is not None:
            record["mfu"] = achieved
        self.reset()
        return record


class Trainer:
    """The state of one run while it trains, and the steps of the loop in :func:`train`."""

    def __init__(self, run: Run, preemption: Preemption | None = None):
        self.run, self.cfg, self.accelerator = run, run.cfg, run.accelerator
        self.preemption = preemption
        self.state = TrainState()
        self.window = LogWindow(run.accelerator.device)
        self.metrics = None
        self.nonfinite_in_row = 0
        self.saved_step = -1
        self.last = {"lr": 0.0, "grad_norm": 0.0}  # of the latest step, for the log line (the norm: read there)
        self.counts_on_device = None  # the step's global token counts, for the objective
        self.pending = []  # (step, device flag: was it finite?) of the steps skipped or not on the device, unread
        self.vote = runtime.StopVote(run.world, timedelta(minutes=run.cfg.collective_timeout))
        self.first_step = None  # seconds from process start to the first step done, and the peak memory then
        self.t_steps = time.time()  # when training started (reset by start())
        self.peak_flops = estimate.peak_flops(str(run.accelerator.device),
                                              "bf16" if run.precision == "bf16" else "fp32")  # None on CPU
        self.fault_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}
        self.kill_at = int(os.environ.get(FAULT_KILL_AT_STEP, "0"))
        self.slow_eval_s = float(os.environ.get(FAULT_SLOW_EVAL_S, "0"))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.vote.close()
        if self.metrics is not None:
            self.metrics.close()

    # ---- start ----
    def start(self) -> None:
        """Resume from the checkpoint all ranks agree on (in this layout or another; an error if none loads),
        or start afresh; only then write the run's config, skipped-record list and log file."""
        run = self.run
        if self.cfg.resume:
            order = [name for group in param_groups(run.accelerator.unwrap_model(run.model)) for name, _ in group]
            self.state.load_state_dict(checkpoint.resume(run.accelerator, run.out, run.layout, run.model,
                                                         run.optimizer, run.scheduler, order))
        logs.write_to(run.out / runfiles.LOG)
        if run.is_main:  # a refused run changes no file
            (run.out / runfiles.CONFIG).write_text(json.dumps(run.requested, indent=2))
            with open(run.out / runfiles.SKIPPED, "w") as f:
                f.writelines(json.dumps(asdict(s)) + "\n" for s in run.report.skipped)
            self.metrics = open(run.out / runfiles.METRICS, "a")
        run.model.train()
        if self.state.evaluation_pending:  # stopped during the evaluation of the step it saved: evaluate again
            self.maybe_evaluate(force=True)
        self.t_steps = time.time()

    def step_rows(self):
        """The row indices of each remaining optimizer step, epoch after epoch, from where the state stands;
        the validation set is evaluated at each epoch's end."""
        state = self.state
        while state.step < self.run.total_steps:
            plan = step_batches(self.run.lengths, self.run.global_batch, self.cfg.run, state.epoch,
                                self.cfg.group_by_length)
            for rows in plan[state.step_in_epoch:]:
                yield rows
                if state.step >= self.run.total_steps:
                    return
            state.epoch += 1
            state.step_in_epoch = 0
            self.maybe_evaluate(force=True)

    # ---- one step ----
    def collate_step(self, rows: list[int]) -> tuple[list[dict], np.ndarray]:
        """This rank's micro-batches of a step, and the step's global target-token counts (answer, rationale)
        from the rows' lengths, which every rank knows (no collective); the counts go to the device for the
        objective (a copy there, never a read back)."""
        if self.state.step + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        run = self.run
        mine = rank_micro_batches(rows, self.cfg.batch_size, self.cfg.grad_accum_steps, run.world,
                                  run.accelerator.process_index)
        micro = []
        for indices in mine:
            batch = run.collate(run.train_rows[indices])
            batch.pop("token_counts")
            micro.append(batch)
        counts = run.target_tokens[rows].sum(axis=0)
        on_host = torch.tensor(counts, dtype=torch.float32)
        if run.collate.pin_memory:
            on_host = on_host.pin_memory()
        self.counts_on_device = on_host.to(self.accelerator.device, non_blocking=True)
        return micro, counts

    def vote_on_stop(self) -> None:
        """At the end of a step: start the ranks' vote on whether a stop signal arrived (:class:`runtime.StopVote`)."""
        self.vote.start(self.preemption is not None and self.preemption.requested)

    def stop_agreed(self) -> bool:
        """At the start of a step: whether a stop signal had reached any rank by the end of the last one (the
        vote then started; one process: the flag now)."""
        if self.run.world == 1:
            return self.preemption is not None and self.preemption.requested
        return self.vote.result()

    def train_step(self, micro: list[dict], counts: np.ndarray, rows: list[int]) -> None:
        """Forward and backward of this rank's micro-batches, then one clip and optimizer step (skipped, and
        the schedule held, when the loss or gradient is not finite). Nothing here reads the device: see
        :meth:`clip_and_step` for the one case that must."""
        run, cfg, state = self.run, self.cfg, self.state
        device = self.accelerator.device
        sums = torch.zeros(2, device=device)
        for batch in micro:
            with self.accelerator.accumulate(run.model):
                batch_sums = run.model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
                loss = combine(batch_sums, self.counts_on_device, run.alpha) * run.world * cfg.grad_accum_steps
                if state.step + 1 in self.fault_steps:
                    loss = loss * float("nan")
                self.accelerator.backward(loss)
                sums += batch_sums.detach().float()
        lr = run.scheduler.get_last_lr()[0]  # the lr this step uses
        grad_norm, finite = self.clip_and_step()
        if isinstance(finite, bool):  # known now: hold the schedule at once
            if finite:
                run.scheduler.step()
                self.nonfinite_in_row = 0
            else:
                self.skipped(state.step + 1)
        else:  # decided on the device: the schedule goes on, and is held back where settle() finds a skip
            run.scheduler.step()
            self.pending.append((state.step + 1, finite))
        state.step += 1
        state.step_in_epoch += 1
        state.samples += run.global_batch
        self.last = {"lr": lr, "grad_norm": grad_norm}
        self.window.add(sums, counts, int(counts.sum() + run.input_tokens[rows].sum()), run.step_flops(rows))
        if self.first_step is None:  # how long a run takes to start, and its memory then (the data benchmark)
            self.first_step = [time.time() - psutil.Process().create_time(), peak_memory_mb()]

    def clip_and_step(self) -> tuple[torch.Tensor, torch.Tensor | bool]:
        """Clip the accumulated gradients and step the optimizer unless their norm is non-finite. Returns the
        norm (read at the log line) and whether it was finite: a device flag where the skip happened on the
        device, a bool where it had to be read first.

        DeepSpeed clips and steps inside the engine, its own overflow check skipping a non-finite step (fp32 and
        fp16, and bf16 with check_grad_overflow); the norm is the engine's own. A fused AdamW (what the trainer
        builds on GPUs) skips on the device: ``found_inf``, as ``torch.amp.GradScaler`` uses it, leaves
        parameters, moments and step counts as they were. Any other optimizer (the CPU default, foreach AdamW,
        where the device is the host anyway) is stepped only after the flag is read."""
        model, optimizer = self.run.model, self.run.optimizer
        if self.run.layout.deepspeed:
            norm = model.get_global_grad_norm()  # the engine's tensor (Accelerate's helper would read it)
            norm = torch.as_tensor(0.0 if norm is None else norm)
            return norm, torch.isfinite(norm)
        grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm or float("inf"))
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        finite = torch.isfinite(grad_norm)
        if torch_optimizer.defaults.get("fused") and getattr(self.accelerator, "scaler", None) is None:
            torch_optimizer.found_inf = (~finite).float()
            optimizer.step()
        else:
            finite = bool(finite)
            if finite:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    def settle(self) -> None:
        """Read the finiteness of the steps skipped or not on the device since the last call (one read) and
        account for the skipped ones as :meth:`skipped` does when it knows at once; the schedule, stepped for
        them meanwhile, is set back by one step each. Called at log lines, checkpoints and evaluations, so the
        steps between a skip and the next log line train at the lr of one step later."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        device = self.accelerator.device
        finite = torch.stack([torch.as_tensor(f, device=device).reshape(()) for _, f in pending]).tolist()
        for (step, _), ok in zip(pending, finite):
            if ok:
                self.nonfinite_in_row = 0
                continue
            hold_schedule(self.run.scheduler, 1)
            if step == self.state.step and self.nonfinite_in_row + 1 >= self.cfg.max_nonfinite_steps:
                self.state.step -= 1  # the latest step did nothing but count: save the state before it
                self.state.step_in_epoch -= 1
                self.state.samples -= self.run.global_batch
            self.skipped(step)

    def skipped(self, step: int) -> None:
        """Step ``step`` was skipped (non-finite loss or gradient); too many in a row save and stop."""
        state = self.state
        self.nonfinite_in_row += 1
        state.nonfinite_steps += 1
        self.emit({"step": step, "split": "train", "nonfinite_skipped": state.nonfinite_steps})
        log.warning(f"step {step}: non-finite loss or gradient; step skipped "
                    f"({self.nonfinite_in_row} in a row, {state.nonfinite_steps} in all)")
        if self.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
            self.save()
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} non-finite steps in a row at step {step}; the last good state "
                f"is saved in {self.run.out / runfiles.CHECKPOINTS}. Lower --lr or check the data.")

    # ---- after a step ----
    def emit(self, record: dict) -> None:
        """A line of ``metrics.jsonl`` (main process) and the trackers' values."""
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        self.accelerator.log({f"{record.get('split', 'train')}/{k}": v for k, v in record.items()
                              if isinstance(v, (int, float)) and k not in ("step", "split")}, step=record["step"])

    def maybe_log(self, bar) -> None:
        step = self.state.step
        if step % self.cfg.logging_steps and step != self.run.total_steps:
            return
        self.settle()
        record = self.window.record(self.run, step, self.last["lr"], float(self.last["grad_norm"]), self.peak_flops)
        record["epoch"] = self.state.epoch
        self.emit(record)
        self.state.last_loss = record["loss"]
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")

    def maybe_evaluate(self, force: bool = False) -> None:
        """Validation accuracy (every ``--eval_steps`` and at epoch ends); a better model is exported to best/."""
        run, state = self.run, self.state
        if not (force or (self.cfg.eval_steps and state.step % self.cfg.eval_steps == 0)):
            return
        if state.last_eval_step == state.step:
            return
        self.settle()
        state.evaluation_pending = True  # until it is done: a checkpoint saved on a stop during it says so
        t_eval = time.time()
        try:
            with runtime.generation_autocast(self.accelerator), runtime.zero3_generation(run.model, run.t5):
                result, records = evaluate.evaluate_split(
                    run.t5, run.tokenizer, run.tables["valid"], family=DATASETS[self.cfg.dataset].family,
                    kind=run.metric_kind, model_type=self.cfg.model_type, device=self.accelerator.device,
                    batch_size=eval_batch_size(self.cfg), gen_max_len=self.cfg.gen_max_len, rationales=False,
                    world=run.world, rank=self.accelerator.process_index,
                    synced_gpus=runtime.is_zero3(self.accelerator), between_batches=self.between_eval_batches)
        except evaluate.EvaluationStopped as stopped:
            self.save_and_stop(f"during the evaluation of step {state.step} ({stopped}; the resumed run repeats it)")
        state.evaluation_pending = False
        state.last_eval_step = state.step
        accuracy = result["accuracy"]
        if run.is_main:  # the latest evaluation's outputs, for error analysis and export checks
            evaluate.write_records(run.out / runfiles.VALID_PREDICTIONS, records)
        self.emit({"step": state.step, "split": "valid", "accuracy": accuracy, "rows": result["rows"],
                   "eval_s": time.time() - t_eval})
        if accuracy > state.best_valid_accuracy:
            state.best_valid_accuracy, state.best_step = accuracy, state.step
            checkpoint.export_model(self.accelerator, run.model, run.tokenizer, run.out / runfiles.BEST,
                                    {"step": state.step, "valid_accuracy": accuracy})
        if run.is_main:
            line = f"step {state.step}: valid accuracy {accuracy:.3f} (best {state.best_valid_accuracy:.3f})"
            tqdm.write(line)  # above the progress bar
            log.info(line, extra=logs.FILE_ONLY)

    def between_eval_batches(self) -> bool:
        """Whether to stop an evaluation here, before its next batch: a stop signal reached any rank. Every rank
        calls it as often (one small sum over the ranks a batch, next to a batch's generation)."""
        stop = self.preemption is not None and self.preemption.requested
        if self.run.world > 1:
            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if self.slow_eval_s and not stop:  # the next batch takes this much longer
            time.sleep(self.slow_eval_s)
        return stop

    def maybe_save(self) -> None:
        if self.cfg.save_steps and self.state.step % self.cfg.save_steps == 0:
            self.save()

    def save(self) -> None:
        self.settle()  # a skip found here may itself save and stop
        if self.saved_step == self.state.step:
            return
        self.saved_step = self.state.step
        checkpoint.save_checkpoint(self.accelerator, self.run.out / runfiles.CHECKPOINTS, self.state.step,
                                   self.state.state_dict(), self.cfg.save_total_limit, self.run.layout)

    def save_and_stop(self, where: str = "") -> None:
        """A stop signal: save the state of the last finished step and raise :class:`Preempted`."""
        t_save = time.time()
        time.sleep(float(os.environ.get(FAULT_SLOW_SAVE_S, "0")))
        self.save()
        # The save time tells a user whether MINDMIRROR_SHUTDOWN_TIMEOUT (launch/multinode.sh) leaves enough room.
        # One shape whatever the moment (log readers and the Slurm test match its start); where it came last.
        log.warning(f"stop requested by a signal: saved step {self.state.step} in "
                    f"{self.run.out / runfiles.CHECKPOINTS} in {time.time() - t_save:.0f} s; exiting with code "
                    f"{EXIT_PREEMPTED} (rerun with --resume to continue){'; it came ' + where if where else ''}")
        self.vote.close()
        shut_down(self.accelerator)
        raise Preempted(f"preempted at step {self.state.step}")

    # ---- end ----
    def finish(self, t_start: float) -> dict:
        """Last evaluation and checkpoint, the final/ export, the test of best/, summary.json and the table."""
        run, state, accelerator = self.run, self.state, self.accelerator
        train_s = time.time() - self.t_steps
        peak_per_rank = self.gather([peak_memory_mb()])
        first_step = self.gather(self.first_step or [-1.0, -1.0])
        self.maybe_evaluate(force=True)
        self.save()
        checkpoint.export_model(accelerator, run.model, run.tokenizer, run.out / runfiles.FINAL, {"step": state.step})
        try:
            test_accuracy, examples = test_best_model(run, self.between_eval_batches)
        except evaluate.EvaluationStopped as stopped:  # the state is saved: a resumed run ends the run again
            self.save_and_stop(f"during the test of best/ ({stopped})")
        # Peaks right after the build and at the very end (final evaluation, exports and test included).
        build_and_end = self.gather([run.figures["mem_built"], peak_memory_mb()])
        cfg = self.cfg
        summary = {
            "final_step": state.step, "final_loss": state.last_loss,
            "best_valid_accuracy": state.best_valid_accuracy, "best_step": state.best_step,
            "test_accuracy": test_accuracy, "train_samples_per_s": state.samples / max(train_s, 1e-9),
            "wall_s": time.time() - t_start, "world_size": run.world, "zero_stage": run.layout.zero_stage,
            "mixed_precision": run.precision, "peak_mem_mb_per_rank": [r[0] for r in peak_per_rank],
            "peak_mem_mb_before_model": run.figures["mem_before_model"],
            "peak_mem_mb_built_per_rank": [r[0] for r in build_and_end],
            "peak_mem_mb_end_per_rank": [r[1] for r in build_and_end],
            "first_step_s_per_rank": [r[0] for r in first_step],
            "peak_mem_mb_first_step_per_rank": [r[1] for r in first_step],
            "data": {"load_s": run.figures["data_s"], "from_cache": run.report.cached},
            "nonfinite_steps": state.nonfinite_steps, "parameters": run.parameters, "model": cfg.from_pretrained,
            "param_dtype": run.figures["param_dtype"],  # the master weights AdamW updates
            "dataset": cfg.dataset, "model_type": cfg.model_type,
            "rows": {split: len(t) for split, t in run.tables.items()},
            "skipped_records": run.report.counts(), "batch_size": cfg.batch_size,
            "experiment": cfg.experiment or f"{cfg.model_type} b{cfg.num_train_branches}", "run": cfg.run,
            "num_train_branches": cfg.num_train_branches, "alpha": run.alpha, "label_type": cfg.label_type,
            "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else "",
        }
        # What each stage of a chain of runs cost (this one last), for mindmirror-report's totals.
        summary["stages"] = runfiles.earlier_stages(cfg.init_from) + [runfiles.stage_cost(summary)]
        if run.is_main:
            (run.out / runfiles.SUMMARY).write_text(json.dumps(summary, indent=2))
            logs.print_examples(examples)
            runfiles.print_table(logs.result_rows(summary, run.out))
        self.vote.close()
        shut_down(accelerator)
        return summary

    def gather(self, values: list[float]) -> list[list[float]]:
        """``values`` of every rank, in rank order."""
        return self.accelerator.gather(torch.tensor([values], device=self.accelerator.device,
                                                    dtype=torch.float64)).tolist()


# ---------------------------------------------------------------------------------------------
# the test of the best model


def test_best_model(run: Run, between_batches=None) -> tuple[float, list[dict]]:
    """Test accuracy of the validation-selected export, computed once; predictions to ``predictions.jsonl``.
    Also returns a few test records with the student's rationale, to show at the end. ``between_batches``:
    see :func:`mindmirror.evaluate.generate`.

    Under ZeRO-3 the export is loaded into the training model's partitioned module (training is over) and
    generation is synced across ranks, as in validation, so no rank ever holds a whole model. Otherwise
    every rank holds the whole model anyway, and a copy is loaded from the export next to it."""
    from transformers import AutoTokenizer

    cfg, accelerator, best = run.cfg, run.accelerator, run.out / runfiles.BEST
    tokenizer = AutoTokenizer.from_pretrained(best)
    t5 = run.t5
    partitioned = runtime.is_zero3(accelerator)
    if partitioned:
        weights.load_partitioned(t5, best, run.is_main)
    else:
        t5 = weights.load_export(best).to(accelerator.device)
    table = run.tables["test"]
    split = functools.partial(evaluate.evaluate_split, t5, tokenizer, family=DATASETS[cfg.dataset].family,
                              kind=run.metric_kind, model_type=cfg.model_type, device=accelerator.device,
                              batch_size=eval_batch_size(cfg), gen_max_len=cfg.gen_max_len,
                              rationale_max_len=cfg.max_target_length, synced_gpus=partitioned,
                              between_batches=between_batches)
    with runtime.generation_autocast(accelerator), runtime.zero3_generation(run.model, t5):
        result, records = split(table, rationales=cfg.output_rationale, world=run.world,
                                rank=accelerator.process_index)
        # A few questions with the student's rationale, generated on every rank alike (ZeRO-3 generates in lockstep).
        examples = records[:EXAMPLES] if cfg.output_rationale else \
            split(table.select(range(min(EXAMPLES, len(table)))), rationales=True)[1]
    if run.is_main:
        evaluate.write_records(run.out / runfiles.PREDICTIONS, records)
        with open(run.out / runfiles.METRICS, "a") as f:
            f.write(json.dumps({"step": json.loads((best / runfiles.EXPORT_INFO).read_text())["step"],
                                "split": "test", "accuracy": result["accuracy"], "rows": result["rows"]}) + "\n")
    return result["accuracy"], examples
