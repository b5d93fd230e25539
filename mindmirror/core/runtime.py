"""The process a run lives in: the Accelerator, CPU threads, what the DeepSpeed JSON says (and the sizes the
trainer gives it), ZeRO-3's fp32 masters and generation, peak memory, stop signals and the ranks' vote on
them, and an orderly shutdown."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from mindmirror.config import TrainConfig

# DeepSpeed's reduce buckets: Accelerate resolves "auto" to d_model squared (a million elements for
# t5-v1_1-large: hundreds of tiny reductions a step); the trainer makes it a sixteenth of the model,
# between d_model squared and DeepSpeed's own default. The buffers are allocated whole, so a fixed
# large size in the JSON would cost a small model gigabytes.
MAX_BUCKET = 500_000_000
# ZeRO-3 sizes that DeepSpeed defaults to 1e9 elements whatever the model: a model under a billion parameters then
# stays gathered whole on every rank through the forward and backward (stage3_max_live_parameters,
# stage3_max_reuse_distance), and the optimizer step flattens a rank's whole partition at once, with AdamW's
# temporaries of the same size (sub_group_size). Unless the DeepSpeed JSON names them, the trainer sizes them
# as the buckets (bucket_elements): a sixteenth of the model, at most 5e8. A module is then gathered again for
# its backward instead of being kept from its forward (one more all-gather of it per micro-batch).
ZERO3_SCALED = ("stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size")


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
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps, log_with=trackers,
                              mixed_precision=mixed, kwargs_handlers=kwargs,
                              project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                                                  logging_dir=str(Path(cfg.output_dir) / "tb")))
    keep_until_exit(accelerator)  # the models it prepares hold the process group (DDP's reducer, DeepSpeed)
    return accelerator


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
    """The ZeRO stage the DeepSpeed JSON names (0: none, or no DeepSpeed)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0) if ds_config else 0


def is_zero3(accelerator) -> bool:
    """Whether this launch runs DeepSpeed ZeRO stage 3, its parameters partitioned over the ranks (then every
    rank joins each gather, and generation runs in lockstep): the one way the package asks."""
    return zero_stage(deepspeed_config(accelerator)) == 3


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
    batch sizes directly; bucket sizes scale with the model (:func:`bucket_elements`), and so, under ZeRO-3,
    do the :data:`ZERO3_SCALED` sizes the JSON leaves out or sets to "auto"."""
    ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_config["train_batch_size"] = global_batch
    if ds_config.get("gradient_clipping") == "auto":
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    zero = ds_config.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = bucket_elements(parameters, d_model)
    if zero.get("stage") == 3:  # what ZeRO-3 keeps gathered, and the optimizer's step size: see ZERO3_SCALED
        for key in ZERO3_SCALED:
            if zero.get(key, "auto") == "auto":
                zero[key] = bucket_elements(parameters, d_model)


def share_fp32_masters(engine) -> int:
    """ZeRO-3 with fp32 parameters and nothing offloaded: let the fp32 master weights be the parameter partitions
    themselves, as DeepSpeed means to. DeepSpeed 0.19.8 checks for this case by comparing a tensor's
    ``torch.device`` with the device's *name* (``runtime/zero/stage3.py``, ``_create_fp32_partitions``), which is
    never equal, so it keeps a second fp32 copy of each rank's partition (4 bytes per parameter / ranks). The
    masters keep their identity (the optimizer's parameters and state keys); only their storage becomes the
    partitions', so the step updates the partitions in place and DeepSpeed's copy back is a copy onto itself.
    Returns the bytes freed (0 where the masters are another dtype, offloaded, or already shared)."""
    zero = getattr(engine, "optimizer", None)
    masters = getattr(zero, "fp32_partitioned_groups_flat", None)
    partitions = getattr(zero, "fp16_partitioned_groups_flat", None)
    if not masters or not partitions or len(masters) != len(partitions) or getattr(zero, "offload_optimizer", True) \
            or getattr(zero, "offload_param", True):
        return 0
    freed = 0
    with torch.no_grad():
        for master, partition in zip(masters, partitions, strict=True):
            if partition is None or master.dtype != partition.dtype or master.device != partition.device \
                    or master.shape != partition.shape or master.data_ptr() == partition.data_ptr() \
                    or not torch.equal(master, partition):
                continue
            master.data = partition.data
            freed += partition.numel() * partition.element_size()
    return freed


def generation_autocast(accelerator):
    """Accelerate's autocast around generation, which bypasses the autocast wrapper of the model's forward
    (so a bf16 run would evaluate in fp32); on CPU none, where evaluations stay what they were."""
    return accelerator.autocast() if accelerator.device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def zero3_generation(engine, t5):
    """Generation through a ZeRO-3 engine's module, with its parameter prefetching. ``t5.generate`` calls the
    model, a child of the engine's module, once per generated token; DeepSpeed starts a new step of its parameter
    trace only in the forward pre-hook of the engine's module (``_start_of_forward_hook``), so without it the
    whole generation is one ever-growing step that matches no recorded trace: every layer is gathered on demand,
    with no prefetch, for every token. Here each forward of ``t5`` starts a step, as the engine's hook does: the
    decoder's trace is recorded at the first tokens of a batch and prefetched for the rest. Afterwards every
    gathered parameter is let go, and training records its own trace again in its first steps. Anything that is
    not a ZeRO-3 engine passes through."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        yield
        return
    coordinator = offload.get_param_coordinator()
    handle = t5.register_forward_pre_hook(lambda module, args: coordinator.reset_step())
    try:
        yield
    finally:
        handle.remove()
        engine.empty_partition_cache()


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


class StopVote:
    """Whether a stop signal reached any rank, agreed without the accelerator: at the end of each step every rank
    starts a sum of its flag over a gloo (CPU) process group (:meth:`start`, asynchronous), and at the start of
    the next step reads it (:meth:`result`): a wait for the other ranks' hosts, never for a device. So the ranks
    stop at the same step boundary, the first after the signal, as one collective a step did before. Every rank
    calls both once per step (one process: no group, :meth:`result` is the flag itself) and :meth:`close`
    before the process group goes down."""

    def __init__(self, world: int, timeout: timedelta | None = None):
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        if self.group is not None:
            keep_until_exit(self.group)
        self.flag = False  # one process
        self.pending = None  # (work, tensor, its numpy buffer) of the vote started last

    def start(self, stop: bool) -> None:
        import torch.distributed as dist

        if self.group is None:
            self.flag = stop
            return
        self.close()  # a vote nobody read (none in the loop's order)
        buffer = np.array([float(stop)], dtype=np.float32)
        tensor = torch.from_numpy(buffer)
        self.pending = (dist.all_reduce(tensor, group=self.group, async_op=True), tensor, buffer)

    def result(self) -> bool:
        """The vote started last (False when none was): whether any rank's flag was set."""
        if self.group is None:
            return self.flag
        if self.pending is None:
            return False
        work, _, buffer = self.pending
        work.wait()
        self.pending = None
        return bool(buffer[0] > 0)  # a host buffer: gloo reduced it on the CPU

    def close(self) -> None:
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


# What holds a launched process's process groups, kept until it leaves (cli._leave: os._exit).
_HELD: list = []


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate launch), one rank of a job."""
    return os.environ.get("LOCAL_RANK") is not None


def keep_until_exit(*holders) -> None:
    """In a launched process, keep ``holders`` (process groups, or objects that hold them: the accelerator with
    the models it prepares) alive from their creation until the process leaves with ``os._exit``, whatever way
    the run ends.

    gloo joins its worker threads when the last reference to a group goes, in a destructor that holds the GIL;
    a worker still finishing a collective needs the GIL to free its tensors and waits for it forever (a deadlock
    at the exit of finished runs on 2 loaded cores: ``ProcessGroupGloo::~ProcessGroupGloo`` from DDP's reducer
    against ``AsyncAllgatherWork::~AsyncAllgatherWork``). ``destroy_process_group`` does not join them either:
    only the last reference does, so it must never go."""
    if launched():
        _HELD.extend(holders)


def shut_down(accelerator) -> None:
    """End the trackers, then wait for every rank. Outside a launcher the process group goes down here, while
    every rank is still here: left to the interpreter's exit, the communication threads of gloo and DeepSpeed's
    CPU ops can abort a finished run ("terminate called without an active exception"). A launched process
    leaves its groups standing (:func:`keep_until_exit`): it exits without the interpreter's teardown. (Not
    ``accelerator.end_training()``: it destroys the default group itself.)"""
    import torch.distributed as dist

    for tracker in accelerator.trackers:
        tracker.finish()
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        if not launched():
            dist.destroy_process_group()
