"""The training loop: read it top to bottom.

setup (accelerator, tokenizer, data, model, optimizer, schedule) -> resume -> for each optimizer
step: collate this rank's micro-batches, agree on the step's token counts across ranks, forward and
backward each micro-batch under ``accelerator.accumulate``, clip, step (or skip a non-finite step),
log, evaluate, checkpoint -> export ``final/`` -> test the best model once -> ``summary.json``.
"""

from __future__ import annotations

import contextlib
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

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from mindmirror import checkpoint, estimate, evaluate
from mindmirror.collate import Collator, grouping_lengths, rank_micro_batches, step_batches
from mindmirror.config import TrainConfig
from mindmirror.data.registry import DATASETS, build_task_rows
from mindmirror.data.tokenize import tokenize_rows
from mindmirror.model import load_model, load_tokenizer
from mindmirror.objective import DistillationObjective, combine

log = logging.getLogger("mindmirror")
EXIT_PREEMPTED = 75  # a signal asked us to stop: state saved; the SLURM template requeues on this code
# Fault injection for tests: make the loss of these (comma-separated) steps NaN; SIGKILL every rank
# when it is about to run this step.
FAULT_NAN_STEPS, FAULT_KILL_AT_STEP = "MINDMIRROR_FAULT_NAN_STEPS", "MINDMIRROR_FAULT_KILL_AT_STEP"


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


def build_optimizer(cfg, model, ds_config):
    """AdamW, or DeepSpeed's optimizer (a DummyOptim placeholder) when its JSON names one."""
    def no_decay(name):
        return name.endswith("bias") or "layer_norm" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not no_decay(n)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if no_decay(n)], "weight_decay": 0.0}]
    if ds_config and "optimizer" in ds_config:
        return DummyOptim(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, **fused)


def load_data(cfg: TrainConfig, tokenizer, accelerator=None, splits=("train", "valid", "test")):
    """Task rows for every split and the tokenized tables of ``splits`` (built once, on the main process first)."""
    with_rationale = cfg.model_type != "standard"
    with accelerator.main_process_first() if accelerator else contextlib.nullcontext():
        rows, report = build_task_rows(cfg.dataset, cfg.data_dir or None, model_type=cfg.model_type,
                                       label_type=cfg.label_type, num_train_branches=cfg.num_train_branches,
                                       valid_fraction=cfg.valid_fraction, subsample=cfg.subsample, seed=cfg.run,
                                       skip_bad_records=cfg.skip_bad_records, eos_token=tokenizer.eos_token)
        for split, limit in (("valid", cfg.max_eval_samples), ("test", cfg.max_test_samples)):
            rows[split] = rows[split][:limit] if limit else rows[split]
        tables = {split: tokenize_rows(r, tokenizer, with_rationale=with_rationale,
                                       max_input_length=cfg.max_input_length,
                                       max_target_length=cfg.max_target_length, cache_dir=cfg.cache_dir or None)
                  for split, r in rows.items() if split in splits}
    return rows, tables, report


class Preemption:
    """Remembers that SIGTERM or SIGUSR1 arrived; the loop saves and exits at the next step boundary."""

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
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    set_seed(cfg.run)

    # ---- data ----
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.from_pretrained, cfg.random_init)
    rows, tables, report = load_data(cfg, tokenizer, accelerator)
    log.info(report.summary(cfg.dataset))
    train_table = tables["train"]
    train_examples = train_table.select_columns(
        [c for c in ("input_ids", "labels", "expl_input_ids", "rationale_ids") if c in train_table.column_names]).to_list()
    with_rationale = cfg.model_type != "standard"
    alpha = cfg.alpha if with_rationale else 1.0
    collate = Collator(tokenizer.pad_token_id, with_rationale,
                       cfg.pad_to_multiple_of or (8 if accelerator.device.type == "cuda" else 1))
    lengths = grouping_lengths(train_examples)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * world
    steps_per_epoch = len(lengths) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the global batch ({global_batch} = batch_size x grad_accum_steps x processes) is larger "
                         f"than the {len(lengths)} training rows: lower --batch_size")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    # ---- model, optimizer, schedule ----
    mem_before_model = peak_memory_mb()  # the scaling study sets the model's share against the estimate
    model = DistillationObjective(load_model(cfg.from_pretrained, tokenizer, cfg.random_init, cfg.init_from,
                                             cfg.vocab_size))
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
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps, warmup_num_steps=warmup)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        # Built on the prepared optimizer (a DummyOptim has no param groups) and stepped by this loop
        # once per optimizer step; prepare() would step it once per process.
        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        accelerator.register_for_checkpointing(scheduler)
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
    # Model FLOPs of each training row (both tasks, forward + backward, real tokens only) for MFU.
    flops_of = functools.lru_cache(maxsize=None)(
        functools.partial(estimate.sample_flops, accelerator.unwrap_model(model).t5.config))
    row_flops = [flops_of(len(e["input_ids"]), len(e["labels"]), len(e.get("expl_input_ids", ())),
                          len(e.get("rationale_ids", ()))) for e in train_examples]
    precision = str(ds_precision(ds_config) or accelerator.mixed_precision)
    peak = estimate.peak_flops(str(accelerator.device), "bf16" if precision == "bf16" else "fp32")  # None on CPU
    accelerator.init_trackers("mindmirror", config={k: v for k, v in asdict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})

    # ---- resume ----
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_valid_accuracy": -1.0, "best_step": -1,
             "nonfinite_steps": 0, "samples": 0}
    if cfg.resume:
        loaded = checkpoint.load_latest_checkpoint(accelerator, out / "checkpoints")
        if loaded:
            state.update(loaded)
            log.info(f"resumed from step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']} in it)")
        else:
            log.info("--resume: no usable checkpoint yet, starting from scratch")

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
                                        world=world, rank=rank, device=accelerator.device, batch_size=2 * cfg.batch_size,
                                        max_new_tokens=cfg.gen_max_len, synced_gpus=zero_stage == 3)
        accuracy, correct = evaluate.score(predictions, [r.label for r in rows["valid"]], metric_kind)
        if is_main:  # the latest evaluation's outputs, for error analysis and export checks
            write_predictions(out / "valid_predictions.jsonl", rows["valid"], predictions, correct)
        emit({"step": step, "split": "valid", "accuracy": accuracy, "rows": len(predictions)})
        if accuracy > state["best_valid_accuracy"]:
            state["best_valid_accuracy"], state["best_step"] = accuracy, step
            checkpoint.export_model(accelerator, model, tokenizer, out / "best",
                                    {"step": step, "valid_accuracy": accuracy})
        if is_main:
            tqdm.write(f"step {step}: valid accuracy {accuracy:.3f} (best {state['best_valid_accuracy']:.3f})")

    def maybe_save(force: bool = False) -> None:
        if force or (cfg.save_steps and state["step"] % cfg.save_steps == 0):
            checkpoint.save_checkpoint(accelerator, out / "checkpoints", state["step"], state, cfg.save_total_limit)

    metric_kind = "text" if cfg.model_type == "task_prefix_tree2" else DATASETS[cfg.dataset].metric
    fault_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}
    kill_at = int(os.environ.get(FAULT_KILL_AT_STEP, "0"))
    nonfinite_in_row = 0
    def fresh_window() -> dict:  # what is summed between two log lines
        return {"sums": torch.zeros(2, device=accelerator.device), "counts": torch.zeros(2), "tokens": 0,
                "flops": 0, "t0": time.time(), "steps": 0}

    window = fresh_window()
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
            micro = [collate([train_examples[i] for i in idx]) for idx in mine]
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

            # ---- log ----
            window["sums"] += step_sums  # this rank's; summed over ranks at log time
            window["counts"] += counts
            window["tokens"] += int(counts.sum()) + sum(int(m[k].sum()) for m in micro for k in m if k.endswith("attention_mask")) * world
            window["steps"] += 1
            window["flops"] += sum(row_flops[i] for i in step_rows)
            if state["step"] % cfg.logging_steps == 0 or state["step"] == total_steps:
                sums = accelerator.reduce(window["sums"], reduction="sum").cpu()
                per_task = (sums / window["counts"].clamp(min=1)).tolist()
                elapsed = time.time() - window["t0"]
                record = {"step": state["step"], "loss": alpha * per_task[0] + (1 - alpha) * per_task[1],
                          "label_loss": per_task[0], "rationale_loss": per_task[1],
                          "lr": step_lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": window["tokens"] / elapsed, "samples_per_s": window["steps"] * global_batch / elapsed,
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

    if stopped_by_signal:
        maybe_save(force=True)
        log.warning(f"stop requested by a signal: saved step {state['step']} in {out / 'checkpoints'}; "
                    f"exiting with code {EXIT_PREEMPTED} (rerun with --resume to continue)")
        accelerator.end_training()
        raise SystemExit(EXIT_PREEMPTED)

    # ---- end: last evaluation, exports, test once on the best model ----
    maybe_evaluate(force=True)
    maybe_save(force=True)
    checkpoint.export_model(accelerator, model, tokenizer, out / "final", {"step": state["step"]})
    test_accuracy = test_best_model(cfg, out / "best", tables["test"], rows["test"], metric_kind, accelerator)
    summary = {
        "final_step": state["step"], "final_loss": state.get("last_loss"),
        "best_valid_accuracy": state["best_valid_accuracy"], "best_step": state["best_step"],
        "test_accuracy": test_accuracy, "train_samples_per_s": state["samples"] / max(train_time, 1e-9),
        "wall_s": time.time() - t_start, "world_size": world, "zero_stage": zero_stage,
        "mixed_precision": precision, "peak_mem_mb_per_rank": peak_mem_per_rank,
        "peak_mem_mb_before_model": mem_before_model,
        "nonfinite_steps": state["nonfinite_steps"], "parameters": n_params, "model": cfg.from_pretrained,
        "dataset": cfg.dataset, "model_type": cfg.model_type, "rows": {split: len(r) for split, r in rows.items()}, "skipped_records": len(report.skipped),
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
    accelerator.end_training()
    return summary


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


@contextlib.contextmanager
def unsharded_loading():
    """Load a whole model even under ZeRO-3, whose registered config makes transformers partition it."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def test_best_model(cfg, best: Path, table, rows, metric_kind, accelerator) -> float:
    """Test accuracy of the validation-selected export, computed once; predictions to predictions.jsonl."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(best)
    with unsharded_loading():
        t5 = T5ForConditionalGeneration.from_pretrained(best).to(accelerator.device)
    predictions = evaluate.generate(t5, tokenizer, table, "input_ids", world=accelerator.num_processes,
                                    rank=accelerator.process_index, device=accelerator.device,
                                    batch_size=2 * cfg.batch_size, max_new_tokens=cfg.gen_max_len)
    rationales = evaluate.generate(t5, tokenizer, table, "expl_input_ids", world=accelerator.num_processes,
                                   rank=accelerator.process_index, device=accelerator.device,
                                   batch_size=2 * cfg.batch_size, max_new_tokens=cfg.max_target_length) \
        if cfg.output_rationale and "expl_input_ids" in table.column_names else None
    accuracy, correct = evaluate.score(predictions, [r.label for r in rows], metric_kind)
    if accelerator.is_main_process:
        write_predictions(best.parent / "predictions.jsonl", rows, predictions, correct, rationales)
        with open(best.parent / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": json.loads((best / "mindmirror.json").read_text())["step"],
                                "split": "test", "accuracy": accuracy, "rows": len(predictions)}) + "\n")
    return accuracy


def write_predictions(path: Path, rows, predictions, correct, rationales=None) -> None:
    """One JSON line per row: input, prediction, gold, correct (and the generated rationale)."""
    with open(path, "w") as f:
        for i, (row, pred, ok) in enumerate(zip(rows, predictions, correct)):
            record = {"input": row.input, "prediction": pred, "gold": row.label, "correct": ok}
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
