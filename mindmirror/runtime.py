"""The process a run lives in: the Accelerator, CPU threads, what the DeepSpeed JSON says, peak memory,
stop signals, and an orderly shutdown."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from mindmirror.config import TrainConfig

# DeepSpeed's reduce buckets: Accelerate resolves "auto" to d_model squared (a million elements for
# t5-v1_1-large: hundreds of tiny reductions a step); the trainer makes it a sixteenth of the model,
# between d_model squared and DeepSpeed's own default. The buffers are allocated whole, so a fixed
# large size in the JSON would cost a small model gigabytes.
MAX_BUCKET = 500_000_000


def process_group_kwargs(cfg: TrainConfig, distributed: bool) -> InitProcessGroupKwargs:
    """How the process group starts: gloo where there is no GPU (CPU DDP and DeepSpeed), and one timeout for
    every collective, ``--collective_timeout``. Accelerate hands it to ``torch.distributed.init_process_group``
    (NCCL, gloo) and, under DeepSpeed, to ``deepspeed.comm.init_distributed``, which passes it on; without it
    a rank waiting for the main process (a data-cache build, a checkpoint, an export) fails after the
    library's default: 10 minutes for NCCL and for DeepSpeed, 30 for gloo. Groups that DeepSpeed creates
    later keep torch's default; every wait for the main process's own work is on the default group."""
    backend = "gloo" if distributed and not torch.cuda.is_available() else "nccl"  # "nccl": Accelerate's choice
    return InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=cfg.collective_timeout))


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator from the launch config, with :func:`process_group_kwargs`."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    kwargs = [process_group_kwargs(cfg, distributed)]
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
    """The DeepSpeed JSON of this launch (mutable until ``prepare``), or None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def zero_stage(ds_config: dict | None) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0) if ds_config else 0


def ds_precision(ds_config: dict | None) -> str | None:
    """``bf16``, ``fp16`` or ``no`` as the DeepSpeed JSON says; None without DeepSpeed."""
    if not ds_config:
        return None
    if ds_config.get("bf16", {}).get("enabled") in (True, "true"):
        return "bf16"
    return "fp16" if ds_config.get("fp16", {}).get("enabled") in (True, "true") else "no"


def bucket_elements(parameters: int, d_model: int) -> int:
    """The reduce (and ZeRO-3 prefetch) bucket for a model: a sixteenth of its parameters, at least
    d_model squared and at most DeepSpeed's default of 5e8."""
    return int(min(MAX_BUCKET, max(d_model * d_model, parameters // 16)))


def fill_deepspeed_sizes(ds_config: dict, cfg: TrainConfig, global_batch: int, parameters: int, d_model: int) -> None:
    """Resolve the JSON's "auto" sizes. No DataLoader goes through ``prepare()``, so DeepSpeed is told the
    batch sizes directly; bucket sizes scale with the model (:func:`bucket_elements`)."""
    ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_config["train_batch_size"] = global_batch
    if ds_config.get("gradient_clipping") == "auto":
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    zero = ds_config.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = bucket_elements(parameters, d_model)


def generation_autocast(accelerator):
    """Accelerate's autocast around generation, which bypasses the autocast wrapper of the model's forward
    (so a bf16 run would evaluate in fp32); on CPU none, where evaluations stay what they were."""
    return accelerator.autocast() if accelerator.device.type == "cuda" else contextlib.nullcontext()


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated (GPU) or peak resident set (CPU) of this process, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Preemption:
    """Remembers that SIGTERM or SIGUSR1 arrived; the loop saves and exits at the next step boundary, or
    between two batches of an evaluation. The ranks agree on it (a sum over ranks), so a signal that
    reaches one rank stops them all.

    launch/multinode.sh starts its launcher with both signals ignored; the trainer inherits that and takes
    them back here. One process runs in place of its launcher (launch/accelerate_exec.py), so nothing
    between the signal and the trainer can end the run before the save is on disk."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def shut_down(accelerator) -> None:
    """End the trackers and take the process group down while every rank is still here: left to the
    interpreter's exit, the communication threads of gloo and DeepSpeed's CPU ops can abort a finished run
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()
