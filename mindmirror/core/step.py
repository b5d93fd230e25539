"""One optimizer step on the device: the step's rows collated on the host (:func:`collate_step`), forward and
backward of this rank's micro-batches (:func:`forward_backward`), one clip and optimizer step
(:func:`clip_and_step`), and the lr schedule held back for a step that turned out skipped (:func:`hold_schedule`).

None of them reads the device back: the step's token counts come from the rows' lengths, which every rank holds,
and a non-finite step is skipped on the device, except by a non-fused optimizer (see :func:`clip_and_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import DistributedType

from mindmirror.core.build import Run
from mindmirror.core.collate import rank_micro_batches
from mindmirror.core.objective import combine

PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # gradients whole on each rank


@dataclass
class StepBatch:
    """A step's work, collated on the host while the device still runs the previous step."""

    rows: list[int]  # the step's row indices, over all ranks
    micro: list[dict[str, torch.Tensor]]  # this rank's micro-batches
    counts: np.ndarray  # the step's global target-token counts (answer, rationale), host integers
    counts_on_device: torch.Tensor  # the same, on the device for the objective (a copy there, never a read back)


def collate_step(run: Run, rows: list[int]) -> StepBatch:
    """This rank's micro-batches of a step, and the step's global target-token counts (answer, rationale) from
    the rows' lengths, which every rank knows (no collective)."""
    cfg, accelerator = run.cfg, run.accelerator
    mine = rank_micro_batches(rows, cfg.batch_size, cfg.grad_accum_steps, run.world, accelerator.process_index)
    micro = []
    for indices in mine:
        batch = run.collate(run.train_rows[indices])
        batch.pop("token_counts")
        micro.append(batch)
    counts = run.target_tokens[rows].sum(axis=0)
    on_host = torch.tensor(counts, dtype=torch.float32)
    if run.collate.pin_memory:
        on_host = on_host.pin_memory()
    return StepBatch(rows, micro, counts, on_host.to(accelerator.device, non_blocking=True))


def forward_backward(run: Run, batch: StepBatch, poison: bool = False) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches, the gradients accumulated; returns this rank's loss
    sums (answer, rationale) on the device. Each micro-batch's loss is :func:`mindmirror.core.objective.combine` over
    the step's global counts, scaled so that the gradients the ranks average are those of the step's loss.
    ``poison`` makes the loss NaN (fault injection)."""
    accelerator, device = run.accelerator, run.accelerator.device
    sums = torch.zeros(2, device=device)
    for micro in batch.micro:
        with accelerator.accumulate(run.objective):
            micro_sums = run.objective(**{k: v.to(device, non_blocking=True) for k, v in micro.items()})
            loss = combine(micro_sums, batch.counts_on_device, run.alpha) * run.world * run.cfg.grad_accum_steps
            if poison:
                loss = loss * float("nan")
            accelerator.backward(loss)
            sums += micro_sums.detach().float()
    return sums


def clip_and_step(run: Run) -> tuple[torch.Tensor, torch.Tensor | bool]:
    """Clip the accumulated gradients and step the optimizer unless their norm is non-finite. Returns the
    norm (read at the log line) and whether it was finite: a device flag where the skip happened on the
    device, a bool where it had to be read first.

    DeepSpeed clips and steps inside the engine, its own overflow check skipping a non-finite step (fp32 and
    fp16, and bf16 with check_grad_overflow); the norm is the engine's own. A fused AdamW (what the trainer
    builds) clips as it steps (``grad_scale``) and skips on the device: ``found_inf``, as ``torch.amp.GradScaler``
    uses it, leaves parameters, moments and step counts as they were. Any other optimizer (a foreach AdamW resumed
    from a checkpoint that one saved) is clipped by Accelerate and stepped only after the flag is read."""
    objective, optimizer, accelerator = run.objective, run.optimizer, run.accelerator
    if run.layout.deepspeed:
        norm = objective.get_global_grad_norm()  # the engine's tensor (Accelerate's helper would read it)
        norm = torch.as_tensor(0.0 if norm is None else norm)
        return norm, torch.isfinite(norm)
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    # Every group: a checkpoint saved by a foreach AdamW brings its groups' foreach flag back with it (torch's
    # load_state_dict keeps a saved group's settings), and that run goes on as it began.
    fused = all(group.get("fused") for group in torch_optimizer.param_groups)
    if fused and getattr(accelerator, "scaler", None) is None and accelerator.distributed_type in PLAIN:
        grad_norm = gradient_norm(objective)
        # The clip torch's clip_grad_norm_ makes (a factor max_norm / (norm + 1e-6) where that is below 1), applied
        # by AdamW as it reads each gradient, as it unscales for GradScaler: no pass of its own over the gradients.
        max_norm = run.cfg.max_grad_norm
        torch_optimizer.grad_scale = (grad_norm + 1e-6).div(max_norm).clamp(min=1.0) if max_norm else None
        finite = torch.isfinite(grad_norm)
        torch_optimizer.found_inf = (~finite).float()
        optimizer.step()
    else:
        grad_norm = accelerator.clip_grad_norm_(objective.parameters(), run.cfg.max_grad_norm or float("inf"))
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def gradient_norm(model) -> torch.Tensor:
    """The 2-norm of all of ``model``'s gradients, as ``clip_grad_norm_`` computes it, on the device."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def hold_schedule(scheduler, steps: int) -> None:
    """Set the loop's lr schedule back by ``steps`` steps that turned out skipped, as if it had not been stepped
    for them (the lr of each group as ``LambdaLR`` computes it). DeepSpeed's own scheduler is its engine's."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # under Accelerate's wrapper
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    scheduler.last_epoch -= steps
    lrs = [base * factor(scheduler.last_epoch)
           for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
