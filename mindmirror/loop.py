"""The training loop: read it top to bottom.

setup (accelerator, tokenizer, data, model, optimizer, schedule) -> resume -> for each optimizer
step: collate this rank's micro-batches, agree on the step's token counts across ranks, forward and
backward each micro-batch under ``accelerator.accumulate``, clip, step (or skip a non-finite step),
log, evaluate, checkpoint -> export ``final/`` -> test the best model once -> ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import resource
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from mindmirror import checkpoint, elastic, estimate, evaluate
from mindmirror.collate import Collator, grouping_lengths, rank_micro_batches, step_batches
from mindmirror.config import TrainConfig
from mindmirror.data.loader import TOKEN_COLUMNS, load_data, token_lengths
from mindmirror.data.registry import DATASETS
from mindmirror.model import load_model, load_tokenizer
from mindmirror.objective import DistillationObjective, combine

log = logging.getLogger("mindmirror")
SKIPPED_FILE = "skipped_records.jsonl"
EXIT_PREEMPTED = 75  # a signal asked us to stop: state saved; the SLURM template requeues on this code
# Fault injection for tests: make the loss of these (comma-separated) steps NaN; SIGKILL every rank
# when it is about to run this step; make the checkpoint saved on a stop signal take this many seconds
# longer (a multi-GB save), its files appearing only at the end.
FAULT_NAN_STEPS, FAULT_KILL_AT_STEP = "MINDMIRROR_FAULT_NAN_STEPS", "MINDMIRROR_FAULT_KILL_AT_STEP"
FAULT_SLOW_SAVE_S = "MINDMIRROR_FAULT_SLOW_SAVE_S"


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# setup helpers


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator from the launch config; gloo where there is no GPU (CPU DDP and DeepSpeed)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    trackers = None if cfg.no_log or cfg.report_to == "none" else cfg.report_to.split(",")
    mixed = None
    if cfg.bf16 and os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "no" \
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        mixed = "bf16"
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps, log_with=trackers, mixed_precision=mixed,
                       project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                                           logging_dir=str(Path(cfg.output_dir) / "tb")),
                       kwargs_handlers=kwargs)


def set_cpu_threads() -> None:
    """On CPU, share the cores among this machine's processes (``accelerate launch`` would pin a
    single process to one thread); ``MINDMIRROR_NUM_THREADS`` overrides."""
    if torch.cuda.is_available():
        return
    wanted = os.environ.get("MINDMIRROR_NUM_THREADS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(int(wanted) if wanted else max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def deepspeed_config(accelerator) -> dict | None:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then constant, linear decay or cosine decay to zero."""
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 1.0 - progress) if cfg.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor, warmup


def param_groups(model) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The trainable (name, parameter) pairs of AdamW's two groups, in order: decayed weights, then biases
    and layer norms. A saved optimizer numbers its parameters in this order (elastic resume reads it so)."""
    def no_decay(name):
        return name.endswith("bias") or "layer_norm" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[(n, p) for n, p in params if not no_decay(n)], [(n, p) for n, p in params if no_decay(n)]]


def build_optimizer(cfg, model, ds_config):
    """AdamW, or DeepSpeed's optimizer (a DummyOptim placeholder) when its JSON names one."""
    decayed, not_decayed = param_groups(model)
    groups = [{"params": [p for _, p in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in not_decayed], "weight_decay": 0.0}]
    if ds_config and "optimizer" in ds_config:
        return DummyOptim(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, **fused)


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


def write_skipped(path: Path, report) -> None:
    """``skipped_records.jsonl``: one line per question left out (split, file, record, reason, problem, excerpt)."""
    with open(path, "w") as f:
        f.writelines(json.dumps(dataclasses.asdict(s)) + "\n" for s in report.skipped)


class Preemption:
    """Remembers that SIGTERM or SIGUSR1 arrived; the loop saves and exits at the next step boundary.

    launch/multinode.sh starts the launcher with both signals ignored, so that it outlives the save; the
    trainer inherits that and takes them back here."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate and export as ``cfg`` says; returns the summary written to ``summary.json``."""
    t_start = time.time()
    preemption = Preemption()
    out = Path(cfg.output_dir)
    accelerator = build_accelerator(cfg)
    set_cpu_threads()
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    if not cfg.resume:  # never train from scratch over an earlier run's checkpoints or best/: stop before writing
        checkpoint.refuse_to_overwrite(accelerator, out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    requested = asdict(cfg)  # the run's flags as given (the batch may be fitted to the data below)
    set_seed(cfg.run)

    # ---- data ----
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.from_pretrained, cfg.random_init)
    t_data = time.time()
    tables, report = load_data(cfg, tokenizer, accelerator,
                               limits={"valid": cfg.max_eval_samples, "test": cfg.max_test_samples})
    data_s = time.time() - t_data
    if is_main:
        log.info(report.summary(cfg.dataset))
    train_table = tables["train"]
    # Rows are read from the memory-mapped table a micro-batch at a time; only their lengths live in memory.
    train_tokens = train_table.select_columns([c for c in TOKEN_COLUMNS if c in train_table.column_names])
    row_lengths = token_lengths(train_table)
    lengths = grouping_lengths(row_lengths)
    with_rationale = cfg.model_type != "standard"
    alpha = cfg.alpha if with_rationale else 1.0
    collate = Collator(tokenizer.pad_token_id, with_rationale,
                       cfg.pad_to_multiple_of or (8 if accelerator.device.type == "cuda" else 1))
    cfg = fit_batch_to_data(cfg, len(lengths), world)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * world
    steps_per_epoch = len(lengths) // global_batch
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    # ---- model, optimizer, schedule ----
    mem_before_model = peak_memory_mb()  # the scaling study sets the model's share against the estimate
    # ZeRO-3 with Accelerate's zero3_init_flag (its default under ZeRO-3) builds a size-named model partitioned, so no
    # rank ever holds it whole; with the flag off it is built whole, with the initial weights of a run without ZeRO.
    plugin = accelerator.state.deepspeed_plugin
    partitioned = plugin is not None and plugin.is_zero3_init_enabled()  # Accelerate clears the flag below ZeRO-3
    model = DistillationObjective(load_model(cfg.from_pretrained, tokenizer, cfg.random_init, cfg.init_from,
                                             cfg.vocab_size, partitioned=partitioned))
    if partitioned:
        built = list(model.t5.parameters())
        log.warning(f"rank {rank}: built partitioned: holds {sum(getattr(p, 'ds_tensor', p).numel() for p in built)} "
                    f"of {sum(getattr(p, 'ds_numel', p.numel()) for p in built)} parameter elements")
    model.config = model.t5.config  # DeepSpeed's "auto" bucket sizes read config.hidden_size
    if cfg.gradient_checkpointing:
        model.t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds_config = deepspeed_config(accelerator)
    if ds_config is not None:
        # No DataLoader goes through prepare(), so tell DeepSpeed the sizes its "auto" values stand for.
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_config["train_batch_size"] = global_batch
        if ds_config.get("gradient_clipping") == "auto":
            ds_config["gradient_clipping"] = cfg.max_grad_norm
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
    mem_built = peak_memory_mb()  # the model's and DeepSpeed's share, before any step (summary.json)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0) if ds_config else 0
    t5_params = list(accelerator.unwrap_model(model).t5.parameters())
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in t5_params)
    if zero_stage == 3:  # show that parameters really are partitioned: each rank holds a share
        held = sum(p.ds_tensor.numel() for p in t5_params if hasattr(p, "ds_tensor"))
        log.warning(f"rank {rank}: ZeRO-3 holds {held} of {n_params} parameter elements")
    if is_main:
        log.info(f"model {cfg.from_pretrained}: {n_params / 1e6:.2f}M parameters; {world} process(es), "
                 f"ZeRO stage {zero_stage}, {accelerator.mixed_precision} precision; global batch {global_batch} "
                 f"questions; {steps_per_epoch} steps/epoch, {total_steps} steps")
    # Model FLOPs of a step's rows (both tasks, forward + backward, real tokens only) for MFU, from their lengths.
    flops_of = functools.lru_cache(maxsize=None)(
        functools.partial(estimate.sample_flops, accelerator.unwrap_model(model).t5.config))
    length_columns = [row_lengths.get(c, np.zeros(len(lengths), dtype=np.int64)) for c in TOKEN_COLUMNS]

    def step_flops(rows: list[int]) -> int:
        return sum(flops_of(*(int(column[i]) for column in length_columns)) for i in rows)
    precision = str(ds_precision(ds_config) or accelerator.mixed_precision)
    peak = estimate.peak_flops(str(accelerator.device), "bf16" if precision == "bf16" else "fp32")  # None on CPU
    accelerator.init_trackers("mindmirror", config={k: v for k, v in asdict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})

    # ---- resume ----
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_valid_accuracy": -1.0, "best_step": -1,
             "nonfinite_steps": 0, "samples": 0}
    layout = elastic.Layout(world, zero_stage, ds_config is not None, precision)  # recorded in checkpoints
    if cfg.resume:  # one checkpoint agreed by all ranks, in this layout or another; an error if none loads
        state.update(checkpoint.resume(accelerator, out, layout, model, optimizer, scheduler, [
            name for group in param_groups(accelerator.unwrap_model(model)) for name, _ in group]))
    if is_main:  # written only once the run continues or starts afresh: a refused run changes no file
        (out / "config.json").write_text(json.dumps(requested, indent=2))
        write_skipped(out / SKIPPED_FILE, report)

    metrics_file = open(out / "metrics.jsonl", "a") if is_main else None

    def emit(record: dict) -> None:
        if is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        accelerator.log({f"{record.get('split', 'train')}/{k}": v for k, v in record.items()
                         if isinstance(v, (int, float)) and k not in ("step", "split")}, step=record["step"])

    def maybe_evaluate(force: bool = False) -> None:
        step = state["step"]
        if not force and not (cfg.eval_steps and step % cfg.eval_steps == 0):
            return
        if state.get("last_eval_step") == step:
            return
        state["last_eval_step"] = step
        predictions = evaluate.generate(accelerator.unwrap_model(model).t5, tokenizer, tables["valid"], "input_ids",
                                        world=world, rank=rank, device=accelerator.device,
                                        batch_size=2 * cfg.batch_size,
                                        max_new_tokens=cfg.gen_max_len, synced_gpus=zero_stage == 3)
        accuracy, correct = evaluate.score(predictions, valid_labels, metric_kind)
        if is_main:  # the latest evaluation's outputs, for error analysis and export checks
            write_predictions(out / "valid_predictions.jsonl", tables["valid"], predictions, correct)
        emit({"step": step, "split": "valid", "accuracy": accuracy, "rows": len(predictions)})
        if accuracy > state["best_valid_accuracy"]:
            state["best_valid_accuracy"], state["best_step"] = accuracy, step
            checkpoint.export_model(accelerator, model, tokenizer, out / "best",
                                    {"step": step, "valid_accuracy": accuracy})
        if is_main:
            tqdm.write(f"step {step}: valid accuracy {accuracy:.3f} (best {state['best_valid_accuracy']:.3f})")

    def maybe_save(force: bool = False) -> None:
        if force or (cfg.save_steps and state["step"] % cfg.save_steps == 0):
            checkpoint.save_checkpoint(accelerator, out / "checkpoints", state["step"], state, cfg.save_total_limit,
                                       layout)

    metric_kind = "text" if cfg.model_type == "task_prefix_tree2" else DATASETS[cfg.dataset].metric
    valid_labels = list(tables["valid"]["label"])
    fault_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}
    kill_at = int(os.environ.get(FAULT_KILL_AT_STEP, "0"))
    nonfinite_in_row = 0
    def fresh_window() -> dict:  # what is summed between two log lines
        return {"sums": torch.zeros(2, device=accelerator.device), "counts": torch.zeros(2), "tokens": 0,
                "flops": 0, "t0": time.time(), "steps": 0}

    window = fresh_window()
    first_step = None
    t_steps = time.time()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not is_main, desc="training", dynamic_ncols=True)
    model.train()
    stopped_by_signal = False

    while state["step"] < total_steps:
        plan = step_batches(lengths, global_batch, cfg.run, state["epoch"], cfg.group_by_length)
        for step_rows in plan[state["step_in_epoch"]:]:
            # One optimizer step. Agree on the step's target-token counts and on whether to stop.
            if state["step"] + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            mine = rank_micro_batches(step_rows, cfg.batch_size, cfg.grad_accum_steps, world, rank)
            micro = [collate(train_tokens[idx]) for idx in mine]
            local = torch.stack([m["token_counts"] for m in micro]).sum(0).float()
            agreed = accelerator.reduce(torch.cat([local, torch.tensor([float(preemption.requested)])])
                                        .to(accelerator.device), reduction="sum").cpu()
            if agreed[2] > 0:
                stopped_by_signal = True
                break
            counts = agreed[:2]
            step_sums = torch.zeros(2, device=accelerator.device)  # read on the host only at log time
            for mb in micro:
                with accelerator.accumulate(model):
                    batch = {k: v.to(accelerator.device) for k, v in mb.items() if k != "token_counts"}
                    sums = model(**batch)
                    loss = combine(sums, counts, alpha) * world * cfg.grad_accum_steps
                    if state["step"] + 1 in fault_steps:
                        loss = loss * float("nan")
                    accelerator.backward(loss)
                    step_sums += sums.detach().float()
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                        if grad_norm is None:
                            # DeepSpeed clips and steps inside the engine; its own overflow check
                            # skips a non-finite step (fp32/fp16, and bf16 with check_grad_overflow).
                            grad_norm = torch.tensor(float(model.get_global_grad_norm() or 0.0))
                        finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
                        if finite:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            step_lr = scheduler.get_last_lr()[0]  # the lr this step used
            if finite:
                scheduler.step()
                nonfinite_in_row = 0
            else:
                nonfinite_in_row += 1
                state["nonfinite_steps"] += 1
                emit({"step": state["step"] + 1, "split": "train", "nonfinite_skipped": state["nonfinite_steps"]})
                log.warning(f"step {state['step'] + 1}: non-finite loss or gradient; step skipped "
                            f"({nonfinite_in_row} in a row, {state['nonfinite_steps']} in all)")
                if nonfinite_in_row >= cfg.max_nonfinite_steps:
                    maybe_save(force=True)
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} non-finite steps in a row at step {state['step'] + 1}; the last good "
                        f"state is saved in {out / 'checkpoints'}. Lower --lr or check the data.")
            state["step"] += 1
            state["step_in_epoch"] += 1
            state["samples"] += global_batch
            bar.update(1)
            if first_step is None:  # how long a run takes to start, and its memory then (the data benchmark)
                first_step = [time.time() - psutil.Process().create_time(), peak_memory_mb()]

            # ---- log ----
            window["sums"] += step_sums  # this rank's; summed over ranks at log time
            window["counts"] += counts
            input_tokens = sum(int(m[k].sum()) for m in micro for k in m if k.endswith("attention_mask"))
            window["tokens"] += int(counts.sum()) + input_tokens * world
            window["steps"] += 1
            window["flops"] += step_flops(step_rows)
            if state["step"] % cfg.logging_steps == 0 or state["step"] == total_steps:
                sums = accelerator.reduce(window["sums"], reduction="sum").cpu()
                per_task = (sums / window["counts"].clamp(min=1)).tolist()
                elapsed = time.time() - window["t0"]
                record = {"step": state["step"], "loss": alpha * per_task[0] + (1 - alpha) * per_task[1],
                          "label_loss": per_task[0], "rationale_loss": per_task[1],
                          "lr": step_lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": window["tokens"] / elapsed,
                          "samples_per_s": window["steps"] * global_batch / elapsed,
                          "model_flops_per_s": window["flops"] / elapsed,
                          "peak_mem_mb": peak_memory_mb(), "epoch": state["epoch"]}
                if peak:
                    record["mfu"] = window["flops"] / elapsed / (peak * world)
                emit(record)
                state["last_loss"] = record["loss"]
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                window = fresh_window()

            maybe_evaluate()
            maybe_save()
            if state["step"] >= total_steps:
                break
        if stopped_by_signal:
            break
        if state["step_in_epoch"] >= len(plan):
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            maybe_evaluate(force=True)
    bar.close()
    train_time = time.time() - t_steps
    peak_mem_per_rank = accelerator.gather(torch.tensor([peak_memory_mb()], device=accelerator.device)).tolist()
    first_step_per_rank = accelerator.gather(torch.tensor([first_step or [-1.0, -1.0]], device=accelerator.device,
                                                          dtype=torch.float64)).tolist()

    if stopped_by_signal:
        t_save = time.time()
        time.sleep(float(os.environ.get(FAULT_SLOW_SAVE_S, "0")))
        maybe_save(force=True)
        # The save time tells a user whether MINDMIRROR_SHUTDOWN_TIMEOUT (launch/multinode.sh) leaves enough room.
        log.warning(f"stop requested by a signal: saved step {state['step']} in {out / 'checkpoints'} in "
                    f"{time.time() - t_save:.0f} s; exiting with code {EXIT_PREEMPTED} "
                    "(rerun with --resume to continue)")
        shut_down(accelerator)
        raise SystemExit(EXIT_PREEMPTED)

    # ---- end: last evaluation, exports, test once on the best model ----
    maybe_evaluate(force=True)
    maybe_save(force=True)
    checkpoint.export_model(accelerator, model, tokenizer, out / "final", {"step": state["step"]})
    test_accuracy = test_best_model(cfg, out / "best", tables["test"], metric_kind, accelerator, model)
    # Peaks right after the build and at the very end (final evaluation, exports and test included).
    build_and_end = accelerator.gather(torch.tensor([[mem_built, peak_memory_mb()]], device=accelerator.device,
                                                    dtype=torch.float64)).tolist()
    summary = {
        "final_step": state["step"], "final_loss": state.get("last_loss"),
        "best_valid_accuracy": state["best_valid_accuracy"], "best_step": state["best_step"],
        "test_accuracy": test_accuracy, "train_samples_per_s": state["samples"] / max(train_time, 1e-9),
        "wall_s": time.time() - t_start, "world_size": world, "zero_stage": zero_stage,
        "mixed_precision": precision, "peak_mem_mb_per_rank": peak_mem_per_rank,
        "peak_mem_mb_before_model": mem_before_model,
        "peak_mem_mb_built_per_rank": [r[0] for r in build_and_end],
        "peak_mem_mb_end_per_rank": [r[1] for r in build_and_end],
        "first_step_s_per_rank": [r[0] for r in first_step_per_rank],
        "peak_mem_mb_first_step_per_rank": [r[1] for r in first_step_per_rank],
        "data": {"load_s": data_s, "from_cache": report.cached},
        "nonfinite_steps": state["nonfinite_steps"], "parameters": n_params, "model": cfg.from_pretrained,
        "param_dtype": str(t5_params[0].dtype).removeprefix("torch."),  # the master weights AdamW updates
        "dataset": cfg.dataset, "model_type": cfg.model_type, "rows": {split: len(t) for split, t in tables.items()},
        "skipped_records": report.counts(),
        "batch_size": cfg.batch_size,
        "experiment": cfg.experiment or f"{cfg.model_type} b{cfg.num_train_branches}", "run": cfg.run,
        "num_train_branches": cfg.num_train_branches, "alpha": alpha, "label_type": cfg.label_type,
        "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else "",
    }
    # What each stage of a chain of runs cost (this one last), for mindmirror-report's totals.
    summary["stages"] = earlier_stages(cfg.init_from) + [stage_cost(summary)]
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics_file.close()
        print_table(summary, out)
    shut_down(accelerator)
    return summary


def shut_down(accelerator) -> None:
    """End the trackers and take the process group down while every rank is still here: left to the
    interpreter's exit, the communication threads of gloo and DeepSpeed's CPU ops can abort a finished run
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def stage_cost(summary: dict) -> dict:
    return {"experiment": summary.get("experiment", summary.get("model_type")), "final_step": summary["final_step"],
            "wall_s": summary["wall_s"]}


def earlier_stages(init_from: str) -> list[dict]:
    """The ``stages`` of the run whose export ``init_from`` names (``[]`` when it has no summary)."""
    try:
        previous = json.loads((Path(init_from).parent / "summary.json").read_text()) if init_from else None
    except (OSError, ValueError):
        return []
    return [] if previous is None else previous.get("stages") or [stage_cost(previous)]


def ds_precision(ds_config: dict | None) -> str | None:
    if not ds_config:
        return None
    if ds_config.get("bf16", {}).get("enabled") in (True, "true"):
        return "bf16"
    return "fp16" if ds_config.get("fp16", {}).get("enabled") in (True, "true") else "no"


def load_partitioned(t5, folder: Path, is_main: bool) -> None:
    """Overwrite the ZeRO-3-partitioned ``t5`` with the weights of the export in ``folder``, a tensor at a time.

    The main process reads each tensor (only it needs to see ``folder``) and DeepSpeed hands every rank its
    shard, so besides its shards a rank holds one tensor whole at a time (the main process also its copy
    read from the file). The gathers are collective: every rank walks the same parameters in the same order."""
    import deepspeed
    from safetensors import safe_open

    files = {}  # on the main process: tensor name -> the file of the export holding it
    if is_main:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                files = dict.fromkeys(f.keys(), folder / "model.safetensors")
    names = {}  # a tied parameter is exported under one of its names
    for name, param in t5.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name, param in t5.named_parameters():
        with torch.no_grad(), deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if is_main:
                key = next((n for n in names[id(param)] if n in files), None)
                if key is None:
                    raise ValueError(f"{folder} holds no weights for {name}")
                with safe_open(files[key], framework="pt") as f:  # opened per tensor: its pages are let go
                    param.copy_(f.get_tensor(key))


def test_best_model(cfg, best: Path, table, metric_kind, accelerator, model) -> float:
    """Test accuracy of the validation-selected export, computed once; predictions to predictions.jsonl.

    Under ZeRO-3 the export is loaded into the training model's partitioned module (training is over) and
    generation is synced across ranks, as in validation, so no rank ever holds a whole model. Otherwise
    every rank holds the whole model anyway, and a copy is loaded from the export next to it."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(best)
    t5 = accelerator.unwrap_model(model).t5
    partitioned = any(hasattr(p, "ds_id") for p in t5.parameters())
    if partitioned:
        load_partitioned(t5, best, accelerator.is_main_process)
    else:
        t5 = T5ForConditionalGeneration.from_pretrained(best).to(accelerator.device)
    generate = functools.partial(evaluate.generate, t5, tokenizer, table, world=accelerator.num_processes,
                                 rank=accelerator.process_index, device=accelerator.device,
                                 batch_size=2 * cfg.batch_size, synced_gpus=partitioned)
    predictions = generate("input_ids", max_new_tokens=cfg.gen_max_len)
    rationales = generate("expl_input_ids", max_new_tokens=cfg.max_target_length) \
        if cfg.output_rationale and "expl_input_ids" in table.column_names else None
    accuracy, correct = evaluate.score(predictions, list(table["label"]), metric_kind)
    if accelerator.is_main_process:
        write_predictions(best.parent / "predictions.jsonl", table, predictions, correct, rationales)
        with open(best.parent / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": json.loads((best / "mindmirror.json").read_text())["step"],
                                "split": "test", "accuracy": accuracy, "rows": len(predictions)}) + "\n")
    return accuracy


def write_predictions(path: Path, table, predictions, correct, rationales=None) -> None:
    """One JSON line per row of ``table``: input, prediction, gold, correct (and the generated rationale)."""
    with open(path, "w") as f:
        for i, (text, gold, pred, ok) in enumerate(zip(table["input"], table["label"], predictions, correct)):
            record = {"input": text, "prediction": pred, "gold": gold, "correct": ok}
            if rationales is not None:
                record["rationale"] = rationales[i]
            f.write(json.dumps(record) + "\n")


def print_table(summary: dict, out: Path) -> None:
    lines = [("model", summary["model"]), ("dataset / model type", f"{summary['dataset']} / {summary['model_type']}"),
             ("steps", summary["final_step"]), ("final train loss", f"{summary['final_loss'] or float('nan'):.4f}"),
             ("best valid accuracy", f"{summary['best_valid_accuracy']:.3f} (step {summary['best_step']})"),
             ("test accuracy (best model)", f"{summary['test_accuracy']:.3f}"),
             ("train samples/s", f"{summary['train_samples_per_s']:.1f}"), ("wall time", f"{summary['wall_s']:.0f} s"),
             ("processes / ZeRO / precision", f"{summary['world_size']} / {summary['zero_stage']} / "
                                              f"{summary['mixed_precision']}"),
             ("outputs", str(out))]
    width = max(len(k) for k, _ in lines)
    print("\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in lines) + "\n", flush=True)
