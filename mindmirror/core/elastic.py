"""Elastic resume: continue a checkpoint under another layout (processes, ZeRO stage, DeepSpeed or not).

Accelerate's ``load_state`` loads a checkpoint only into the layout that wrote it when DeepSpeed is on
either side: DeepSpeed refuses a ZeRO checkpoint at another data-parallel size, and ZeRO shards and
a plain ``model.safetensors`` + ``optimizer.bin`` are different files. They hold the same training
state, though, and that state does not depend on the layout:

- per trainable parameter, by name: its fp32 value and AdamW's ``exp_avg`` / ``exp_avg_sq``;
- one Adam step count (every parameter is stepped together; a skipped non-finite step counts for none);
- the lr schedule (the loop's ``LambdaLR`` in ``custom_checkpoint_0.pkl``, whatever the layout);
- the loop's step, epoch and position in the epoch (``trainer_state.json``; the global step batches
  make the data order the same in every layout) and each rank's RNG (``random_states_<rank>.pkl``).

:func:`load` reads that state from the files of whichever layout wrote a checkpoint and writes it
into the objects the current layout prepared. Nothing extra is written at save time: the engines'
own files are read directly, one parameter at a time from memory-mapped files, so a rank holds one
parameter's state beyond what training holds (without DeepSpeed, as in Accelerate's own load, the
optimizer state is also copied once while it is set).

Reading is :class:`mindmirror.core.weights.SavedState`, which also describes what each layout's files hold.

Writing:

- no DeepSpeed: the (unwrapped) module's parameters and ``load_state_dict`` on the torch optimizer,
  which places ``step`` where that optimizer keeps it (fused, capturable or not);
- ZeRO-1/2: the module's parameters (every rank holds them whole), and this rank's slice of the fp32
  master weights and moments through ``deepspeed.utils.safe_set_full_fp32_param`` /
  ``safe_set_full_optimizer_state`` (the base optimizer's state is created first: it is lazy);
- ZeRO-3: each rank reads only its own slice of every parameter (:meth:`SavedState.span`), and sets its
  masters and moments through ``safe_set_local_fp32_param`` / ``safe_set_local_optimizer_state`` and its
  shard of the module directly: no gather, and no rank reads the others' slices.

A layout is :class:`Layout`; ``trainer_state.json`` records the one that wrote a checkpoint. A
checkpoint written before layouts were recorded is judged by its files (:func:`infer_layout`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mindmirror.core.weights import DS_FOLDER, SavedState, optim_shards, read_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """What a checkpoint's engine files depend on: processes, ZeRO stage (0: none), DeepSpeed, precision."""

    processes: int
    zero_stage: int
    deepspeed: bool
    precision: str  # "no" (fp32), "bf16", "fp16", or "unknown" when inferred from files

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict | None) -> Layout | None:
        try:
            return cls(**record) if record else None
        except TypeError:  # a record this version does not know: judge the files instead
            return None

    def __str__(self) -> str:
        engine = f"DeepSpeed ZeRO stage {self.zero_stage}" if self.deepspeed else "no DeepSpeed"
        precision = {"no": "fp32", "unknown": "precision unknown"}.get(self.precision, self.precision)
        return f"{self.processes} process{'es' if self.processes != 1 else ''}, {engine}, {precision}"

    def loads_natively(self, saved: Layout) -> bool:
        """Whether Accelerate's ``load_state`` in this layout loads a checkpoint ``saved`` wrote: without
        DeepSpeed on either side every file holds whole tensors, whatever the process count; with it,
        only the same ZeRO stage at the same process count is known to load."""
        if not self.deepspeed and not saved.deepspeed:
            return True
        return (self.deepspeed, self.zero_stage, self.processes) == (saved.deepspeed, saved.zero_stage, saved.processes)


def infer_layout(folder: Path) -> Layout:
    """The layout a checkpoint's files show (precision cannot be told from them)."""
    if not (folder / DS_FOLDER).is_dir():
        return Layout(max(1, len(list(folder.glob("random_states_*.pkl")))), 0, False, "unknown")
    shards = optim_shards(folder)
    if not shards:
        raise ValueError(f"{folder / DS_FOLDER} holds no ZeRO optimizer shards (*_optim_states.pt): DeepSpeed "
                         "without ZeRO is not supported by elastic resume")
    if list((folder / DS_FOLDER).glob("zero_pp_rank_*_model_states.pt")):
        stage = 3
    else:
        stage = int(read_torch(shards[0])["optimizer_state_dict"]["zero_stage"])
    return Layout(len(shards), stage, True, "unknown")


def _targets(module, saved: SavedState) -> list[tuple[str, torch.nn.Parameter]]:
    """The module's trainable parameters, each with the name the checkpoint holds it under (a tied
    parameter may be saved under any of its names); an error when model and checkpoint differ."""
    names: dict[int, list[str]] = {}
    params = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
    available, targets = set(saved.names), []
    for key, aliases in names.items():
        found = next((n for n in aliases if n in available), None)
        if found is None:
            raise ValueError(f"the checkpoint has no parameter {aliases[0]}: not the model that wrote it")
        targets.append((found, params[key]))
    extra = available - {n for n, _ in targets}
    if extra:
        raise ValueError(f"the checkpoint holds parameters this model lacks ({', '.join(sorted(extra)[:3])}, ...): "
                         "not the model that wrote it")
    return targets


def _check_shape(saved: SavedState, name: str, param) -> None:
    """That the saved ``name`` fits ``param``."""
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 leaves an empty placeholder in the module
    if saved.shapes[name] != shape:
        raise ValueError(f"{name}: the checkpoint holds shape {tuple(saved.shapes[name])}, the model "
                         f"{tuple(shape)}: not the model that wrote it")


def _checked(saved: SavedState, name: str, param) -> dict[str, torch.Tensor]:
    """The saved tensors of ``name``, after checking they fit ``param``."""
    _check_shape(saved, name, param)
    return saved.tensors(name)


def _adam_step(base, group: dict, flat: torch.Tensor, step: int):
    """Adam's step count in the form ``base`` keeps it: torch's Adam/AdamW a float32 tensor (on the
    parameters' device when fused or capturable), DeepSpeed's CPU and fused Adams a Python int."""
    if isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        device = flat.device if group.get("fused") or group.get("capturable") else "cpu"
        return torch.tensor(float(step), dtype=torch.float32, device=device)
    return step


def _write_plain(saved: SavedState, module, optimizer) -> None:
    """Without DeepSpeed: the module's parameters, and the torch optimizer's state by parameter."""
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    index = {id(p): i for i, p in enumerate(p for g in torch_optimizer.param_groups for p in g["params"])}
    state = {}
    for name, param in _targets(module, saved):
        values = _checked(saved, name, param)
        param.data.copy_(values.pop("param"))
        state[index[id(param)]] = {"step": torch.tensor(float(saved.step)), **values}
    # load_state_dict moves each value where this optimizer keeps it (device, dtype, step placement).
    # A saved optimizer that never stepped leaves the state to the first step, as it would be.
    full = torch_optimizer.state_dict()
    full["state"] = state if saved.keys else {}
    torch_optimizer.load_state_dict(full)


def _create_base_state(base, flats: list[torch.Tensor], groups: list[dict], saved: SavedState) -> None:
    """DeepSpeed's base optimizer creates its state at the first step; create it now so it can be set
    (unless the saved optimizer never stepped either: then the first step creates it, as usual)."""
    if not saved.keys:
        return
    for flat, group in zip(flats, groups, strict=True):
        base.state[flat] = {"step": _adam_step(base, group, flat, saved.step),
                            **{key: torch.zeros_like(flat) for key in saved.keys}}


def _write_zero(saved: SavedState, engine, stage: int) -> None:
    """Under ZeRO-1/2/3: this rank's slices of the fp32 masters and moments, and the module's parameters.

    ZeRO-3: each rank reads only its own slice of each parameter (elements ``rank x partition`` on, from the
    saved files that hold them), sets its fp32 master and moments through DeepSpeed's local API and copies it
    into its own shard of the module: no rank ever reads, or holds, more than its share plus one slice.
    ZeRO-1/2: every rank holds the whole module anyway, so each parameter is read whole, one at a time."""
    from deepspeed.utils import (
        lazy_init_hp_params_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    zero = engine.optimizer
    base = zero.optimizer
    if stage == 3:
        flats = zero.fp32_partitioned_groups_flat
        _create_base_state(base, flats, [base.param_groups[zero.sub_group_to_group_id[i]] for i in range(len(flats))],
                           saved)
        for name, param in _targets(engine.module, saved):
            _check_shape(saved, name, param)
            size = param.ds_tensor.ds_numel  # this rank's partition: elements [rank x size, (rank + 1) x size)
            start = zero._get_param_partition_rank(param) * size
            length = max(0, min(size, param.ds_numel - start))
            for kind, value in saved.span(name, start, length).items():
                if length < size:  # the last partition ends in padding
                    value = torch.cat([value, value.new_zeros(size - length)])
                if kind == "param":
                    safe_set_local_fp32_param(param, value)  # this rank's slice of the fp32 master
                    param.ds_tensor.data.copy_(value)  # and its shard of the module (bf16 under bf16)
                else:
                    safe_set_local_optimizer_state(param, value, kind)
        return
    flats = zero.single_partition_of_fp32_groups
    _create_base_state(base, flats, base.param_groups, saved)
    if saved.keys:  # link each parameter to its slice of the state (DeepSpeed does so after a step)
        for lp_group, flat in zip(zero.bit16_groups, flats, strict=True):
            lazy_init_hp_params_optimizer_state(lp_group, flat, base.state)
    for name, param in _targets(engine.module, saved):
        values = _checked(saved, name, param)
        value = values.pop("param")
        safe_set_full_fp32_param(param, value)  # this rank's slice of the fp32 master
        for key, moment in values.items():
            safe_set_full_optimizer_state(param, moment, key)
        param.data.copy_(value)  # every rank holds the whole module


def _restore_schedule(folder: Path, saved: SavedState, scheduler, engine) -> None:
    """The lr schedule: the loop's LambdaLR (an Accelerate custom state) or DeepSpeed's own scheduler."""
    from accelerate.checkpointing import load_custom_state
    from accelerate.utils import DeepSpeedSchedulerWrapper

    if isinstance(scheduler, DeepSpeedSchedulerWrapper):
        if saved.scheduler_state is None:
            raise ValueError("this run's DeepSpeed JSON names an lr scheduler, the checkpoint's run used the "
                             "loop's own schedule: resume with the DeepSpeed JSON that wrote it")
        engine.lr_scheduler.load_state_dict(saved.scheduler_state)
        # DeepSpeed's schedulers set the optimizer's lr only when stepped: step to where the state is.
        engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
        return
    if not (folder / "custom_checkpoint_0.pkl").is_file():
        raise ValueError("the checkpoint's run used the lr scheduler its DeepSpeed JSON names, this run the "
                         "loop's own: resume with the DeepSpeed JSON that wrote it")
    load_custom_state(scheduler, str(folder), 0)  # the loop registers its scheduler as the only custom object
    # The optimizer's lr is part of the optimizer state the engines keep; set it to where the schedule is.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def load(folder: Path, saved_layout: Layout, layout: Layout, accelerator, model, optimizer, scheduler,
         optimizer_order: list[str], trainer_state: dict) -> None:
    """Load checkpoint ``folder``, written in ``saved_layout``, into the objects prepared in ``layout``.

    ``optimizer_order``: the trainable parameters' names in ``build_optimizer``'s group order (how a
    plain ``optimizer.bin`` numbers them). Under ZeRO-3 every rank reads its own share only; otherwise each
    rank reads every parameter whole (one at a time) and keeps its share."""
    from accelerate.checkpointing import load_accelerator_state

    t0 = time.time()
    saved = SavedState(folder, optimizer_order)
    with torch.no_grad():
        if not layout.deepspeed:
            _write_plain(saved, accelerator.unwrap_model(model), optimizer)
        elif layout.zero_stage in (1, 2, 3):
            _write_zero(saved, model, layout.zero_stage)
        else:
            raise ValueError("elastic resume into DeepSpeed without ZeRO (stage 0) is not supported: use ZeRO "
                             "stage 1-3 or no DeepSpeed")
    _restore_schedule(folder, saved, scheduler, model if layout.deepspeed else None)
    if layout.deepspeed:  # DeepSpeed's own counters, which its checkpoints and logs report
        model.global_steps, model.global_samples = trainer_state["step"], trainer_state.get("samples", 0)
    # Each rank's RNG where that rank existed (no model, optimizer or scheduler given: RNG only).
    load_accelerator_state(str(folder), [], [], [], [], accelerator.process_index, map_location="cpu")
    log.info(f"elastic resume of {folder.name}: written by {saved_layout}, continuing under {layout} "
             f"({len(saved.names)} parameters, Adam step {saved.step}; read and written in {time.time() - t0:.1f} s)")
