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

Reading (:class:`SavedState`):

- no DeepSpeed: ``model.safetensors`` (weights by name) and ``optimizer.bin`` (moments by index: the
  i-th parameter of ``build_optimizer``'s groups in order, given as ``optimizer_order``);
- ZeRO-1/2: every rank's ``*_optim_states.pt`` holds one slice of each parameter group's flat fp32
  vector and of its flat moments; the slices of all ranks, concatenated, hold the group's parameters
  in the order of ``param_shapes`` (``mp_rank_00_model_states.pt``), with DeepSpeed's alignment
  paddings between them (the protocol of ``deepspeed/utils/zero_to_fp32.py``);
- ZeRO-3: each parameter is cut into one equal, zero-padded piece per rank; a rank's flat groups hold
  its pieces of every parameter in ``param_shapes`` order.

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
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
DS_FOLDER = "pytorch_model"  # Accelerate's tag for the DeepSpeed engine's files inside a checkpoint


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


def _rank_of(path: Path) -> int:
    return int(re.search(r"rank_(\d+)", path.name).group(1))


def _optim_shards(folder: Path) -> list[Path]:
    """The ZeRO optimizer shards of a checkpoint, one per rank that wrote it, in rank order."""
    return sorted((folder / DS_FOLDER).glob("*_optim_states.pt"), key=_rank_of)


def infer_layout(folder: Path) -> Layout:
    """The layout a checkpoint's files show (precision cannot be told from them)."""
    if not (folder / DS_FOLDER).is_dir():
        return Layout(max(1, len(list(folder.glob("random_states_*.pkl")))), 0, False, "unknown")
    shards = _optim_shards(folder)
    if not shards:
        raise ValueError(f"{folder / DS_FOLDER} holds no ZeRO optimizer shards (*_optim_states.pt): DeepSpeed "
                         "without ZeRO is not supported by elastic resume")
    if list((folder / DS_FOLDER).glob("zero_pp_rank_*_model_states.pt")):
        stage = 3
    else:
        stage = int(_load(shards[0])["optimizer_state_dict"]["zero_stage"])
    return Layout(len(shards), stage, True, "unknown")


def _load(path: Path, weights_only: bool = False):
    """A torch file, memory-mapped: tensors are read from disk only when sliced."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)


def _span(pieces: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements ``start`` to ``start + length`` of the concatenation of the flat ``pieces`` (copied)."""
    parts, offset = [], 0
    for piece in pieces:
        n = piece.numel()
        lo, hi = max(start, offset), min(start + length, offset + n)
        if lo < hi:
            parts.append(piece.view(-1)[lo - offset:hi - offset])
        offset += n
    out = torch.cat(parts) if parts else torch.empty(0)
    if out.numel() != length:
        raise ValueError(f"the flat state ends after {out.numel()} of {length} elements: shards missing or short")
    return out.float()


def _step_and_keys(states) -> tuple[int, tuple[str, ...]]:
    """Adam's step count in saved optimizer states (the largest, should entries differ) and the names of
    their moments; ``(0, ())`` when the optimizer never stepped (its state is created at the first step)."""
    states = list(states)
    steps = [float(s["step"]) for s in states if "step" in s]
    keys = {k for s in states for k, v in s.items() if k != "step" and torch.is_tensor(v)}
    return (int(max(steps)) if steps else 0), tuple(sorted(keys))


class SavedState:
    """The layout-free training state of one checkpoint folder, read one parameter at a time.

    ``names``: the trainable parameters it holds; ``step``: Adam's step count; ``keys``: the moments;
    ``shapes[name]``: each parameter's shape; ``tensors(name)``: ``{"param": fp32 value, key: moment, ...}``
    shaped as the parameter; ``span(name, start, length)``: the same for elements ``start`` to
    ``start + length`` of the flattened parameter only, read from just the files and pages that hold them;
    ``scheduler_state``: DeepSpeed's own lr scheduler, when its JSON named one."""

    def __init__(self, folder: Path, optimizer_order: list[str]):
        self.folder = folder
        self.scheduler_state = None
        if not (folder / DS_FOLDER).is_dir():
            self._read_plain(optimizer_order)
        elif list((folder / DS_FOLDER).glob("zero_pp_rank_*_model_states.pt")):
            self._read_zero3()
        else:
            self._read_zero12()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        shape = self.shapes[name]
        return {kind: t.view(shape) for kind, t in self.span(name, 0, shape.numel()).items()}

    def span(self, name: str, start: int, length: int) -> dict[str, torch.Tensor]:
        return self._span(name, start, length)

    def _read_plain(self, order: list[str]) -> None:
        from safetensors import safe_open

        if not (self.folder / "model.safetensors").is_file():
            raise ValueError(f"{self.folder} holds neither DeepSpeed shards nor model.safetensors")
        weights = safe_open(str(self.folder / "model.safetensors"), framework="pt")
        optimizer = _load(self.folder / "optimizer.bin", weights_only=True)
        indices = [i for group in optimizer["param_groups"] for i in group["params"]]
        if len(indices) != len(order):
            raise ValueError(f"optimizer.bin holds {len(indices)} parameters, the model trains {len(order)}: "
                             "not the model that wrote this checkpoint")
        states = {name: optimizer["state"].get(i, {}) for name, i in zip(order, indices)}
        self.step, self.keys = _step_and_keys(states.values())
        self.names = list(order)
        self.shapes = {name: torch.Size(weights.get_slice(name).get_shape()) for name in order}
        for name in order:
            if any(states[name][k].shape != self.shapes[name] for k in self.keys if k in states[name]):
                raise ValueError(f"optimizer.bin's state of {name} has another shape than the weight: the "
                                 "optimizer's parameter order is not the one this version builds")

        def span(name, start, length):
            state = weights.get_slice(name)
            shape = self.shapes[name]
            row = math.prod(shape[1:]) if len(shape) > 1 else 1  # safetensors slices whole rows of the first dim
            first, last = start // row, -(-(start + length) // row)
            value = state[first:last].reshape(-1)[start - first * row:start - first * row + length].float()
            moments = {k: states[name][k].reshape(-1)[start:start + length].float() if k in states[name]
                       else torch.zeros(length) for k in self.keys}  # memory-mapped: only these pages are read
            return {"param": value, **moments}

        self._span = span

    def _read_zero12(self) -> None:
        shards = [_load(p)["optimizer_state_dict"] for p in _optim_shards(self.folder)]
        model_states = _load(self.folder / DS_FOLDER / "mp_rank_00_model_states.pt")
        self.scheduler_state = model_states.get("lr_scheduler")
        bases = [s["base_optimizer_state"] for s in shards]
        if not all(isinstance(b, dict) and "state" in b for b in bases):
            raise ValueError("a ZeRO checkpoint written with elastic_checkpoint=true is not supported")
        self.step, self.keys = _step_and_keys(st for b in bases for st in b["state"].values())
        paddings = shards[0].get("param_alignment_paddings")
        spans = {}  # name -> (flat pieces of each kind, start in their concatenation, shape)
        for g, shapes in enumerate(model_states["param_shapes"]):
            # Only the fp32 slices are stored without the group's end padding; cut the moments to match.
            fp32 = [s["single_partition_of_fp32_groups"][g] for s in shards]
            pieces = {"param": fp32}
            for key in self.keys:
                pieces[key] = [b["state"][g][key].view(-1)[:f.numel()] for b, f in zip(bases, fp32)]
            offset = 0
            for k, (name, shape) in enumerate(shapes.items()):
                spans[name] = (pieces, offset, torch.Size(shape))
                offset += math.prod(shape) + (paddings[g][k] if paddings else 0)
            # zero_to_fp32's check: both counts agree once aligned to 2 x ranks, as DeepSpeed pads them.
            align = 2 * len(shards)
            if math.ceil(offset / align) != math.ceil(sum(f.numel() for f in fp32) / align):
                raise ValueError(f"parameter group {g} of the ZeRO shards does not match its param_shapes")
        self.names = list(spans)
        self.shapes = {name: shape for name, (_, _, shape) in spans.items()}

        def span(name, start, length):
            pieces, offset, _ = spans[name]
            return {kind: _span(pieces[kind], offset + start, length) for kind in ("param", *self.keys)}

        self._span = span

    def _read_zero3(self) -> None:
        shards = [_load(p)["optimizer_state_dict"] for p in _optim_shards(self.folder)]
        model_states = _load(self.folder / DS_FOLDER / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        self.scheduler_state = model_states.get("lr_scheduler")
        states = [s["optimizer_state_dict"]["state"] for s in shards]
        self.step, self.keys = _step_and_keys(st for rank in states for st in rank.values())
        world = len(shards)
        # Each rank's flat groups of each kind, read one after another as one vector.
        rank_pieces = [{"param": s["fp32_flat_groups"],
                        **{key: [st[i][key] for i in range(len(s["fp32_flat_groups"]))] for key in self.keys}}
                       for s, st in zip(shards, states)]
        spans, offset = {}, 0  # name -> (start of its piece in every rank's vector, shape)
        for shapes in model_states["param_shapes"]:
            for name, shape in shapes.items():
                spans[name] = (offset, torch.Size(shape))
                offset += math.ceil(math.prod(shape) / world)
        self.names = list(spans)
        self.shapes = {name: shape for name, (_, shape) in spans.items()}

        def span(name, start, length):
            offset, shape = spans[name]
            piece = math.ceil(shape.numel() / world)
            ranks = range(start // piece, -(-(start + length) // piece)) if length else range(0)
            out = {}
            for kind in ("param", *self.keys):  # from the saved ranks whose pieces hold these elements only
                parts = [_span(rank_pieces[r][kind], offset + max(start, r * piece) - r * piece,
                               min(start + length, (r + 1) * piece) - max(start, r * piece)) for r in ranks]
                out[kind] = torch.cat(parts) if parts else torch.empty(0)
            return out

        self._span = span


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
    for flat, group in zip(flats, groups):
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
        for lp_group, flat in zip(zero.bit16_groups, flats):
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
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
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
