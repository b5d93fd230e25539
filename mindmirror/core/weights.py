"""Saved weights, read and streamed: every way the package reads a model's weights back from its files, and
streams them in and out of a ZeRO-3-partitioned module.

- :class:`SavedState`: the layout-free training state of a resumable checkpoint (weights and AdamW moments by
  parameter name, Adam's step count), read one parameter, or one slice of it, at a time from whichever layout's
  files wrote it; :mod:`mindmirror.core.elastic` writes it into the objects of another layout.
- :func:`load_export`: an export's model, whole; :func:`checkpoint_state_dict`: a checkpoint's weights,
  consolidated (``mindmirror-eval`` on a checkpoint).
- :func:`write_gathered` and :func:`load_partitioned`: a ZeRO-3 module's weights to a safetensors export and back,
  gathered one module (or one tensor) at a time, so no rank ever holds the whole model.

What the engines' files hold (the protocol of ``deepspeed/utils/zero_to_fp32.py``, read by :class:`SavedState`):

- no DeepSpeed: ``model.safetensors`` (weights by name) and ``optimizer.bin`` (moments by index: the
  i-th parameter of ``build_optimizer``'s groups in order, given as ``optimizer_order``);
- ZeRO-1/2: every rank's ``*_optim_states.pt`` holds one slice of each parameter group's flat fp32
  vector and of its flat moments; the slices of all ranks, concatenated, hold the group's parameters
  in the order of ``param_shapes`` (``mp_rank_00_model_states.pt``), with DeepSpeed's alignment
  paddings between them;
- ZeRO-3: each parameter is cut into one equal, zero-padded piece per rank; a rank's flat groups hold
  its pieces of every parameter in ``param_shapes`` order.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch

from mindmirror.model import ModelLoadError

DS_FOLDER = "pytorch_model"  # Accelerate's tag for the DeepSpeed engine's files inside a checkpoint


def _rank_of(path: Path) -> int:
    return int(re.search(r"rank_(\d+)", path.name).group(1))


def optim_shards(folder: Path) -> list[Path]:
    """The ZeRO optimizer shards of a checkpoint, one per rank that wrote it, in rank order."""
    return sorted((folder / DS_FOLDER).glob("*_optim_states.pt"), key=_rank_of)


def read_torch(path: Path, weights_only: bool = False):
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
        optimizer = read_torch(self.folder / "optimizer.bin", weights_only=True)
        indices = [i for group in optimizer["param_groups"] for i in group["params"]]
        if len(indices) != len(order):
            raise ValueError(f"optimizer.bin holds {len(indices)} parameters, the model trains {len(order)}: "
                             "not the model that wrote this checkpoint")
        states = {name: optimizer["state"].get(i, {}) for name, i in zip(order, indices, strict=True)}
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
        shards = [read_torch(p)["optimizer_state_dict"] for p in optim_shards(self.folder)]
        model_states = read_torch(self.folder / DS_FOLDER / "mp_rank_00_model_states.pt")
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
                pieces[key] = [b["state"][g][key].view(-1)[:f.numel()] for b, f in zip(bases, fp32, strict=True)]
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
        shards = [read_torch(p)["optimizer_state_dict"] for p in optim_shards(self.folder)]
        model_states = read_torch(self.folder / DS_FOLDER / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        self.scheduler_state = model_states.get("lr_scheduler")
        states = [s["optimizer_state_dict"]["state"] for s in shards]
        self.step, self.keys = _step_and_keys(st for rank in states for st in rank.values())
        world = len(shards)
        # Each rank's flat groups of each kind, read one after another as one vector.
        rank_pieces = [{"param": s["fp32_flat_groups"],
                        **{key: [st[i][key] for i in range(len(s["fp32_flat_groups"]))] for key in self.keys}}
                       for s, st in zip(shards, states, strict=True)]
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


def load_export(folder: Path):
    """The whole T5 model of a Hugging Face export (a run's ``best/`` or ``final/``, or any T5 folder), on the CPU."""
    from transformers import T5ForConditionalGeneration

    try:
        return T5ForConditionalGeneration.from_pretrained(folder)
    except OSError as e:
        raise ModelLoadError(f"could not load {folder}: {e}") from e


def checkpoint_state_dict(folder: Path) -> dict:
    """The model weights of a resumable checkpoint, consolidated from ZeRO shards where it has them."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        state = load_file(str(folder / "model.safetensors"))
    elif (folder / DS_FOLDER).is_dir():  # DeepSpeed: save_checkpoint(folder, tag=DS_FOLDER)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_FOLDER)
    else:
        found = [p for p in ("pytorch_model.bin", "model.bin") if (folder / p).is_file()]
        if not found:
            raise ModelLoadError(f"{folder}: no model weights (model.safetensors, pytorch_model/ or pytorch_model.bin)")
        state = torch.load(folder / found[0], map_location="cpu", weights_only=True)
    return {k.removeprefix("t5."): v for k, v in state.items()}  # the trainer saves its objective wrapper


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_gathered(module, path: Path | None, skip: set[str] = frozenset()) -> None:
    """Write a ZeRO-3-partitioned ``module``'s weights (parameters, each shared one under its first name, and
    persistent buffers; names in ``skip`` left out) into one safetensors file at ``path``, given on the main
    process only, the same file ``save_pretrained`` writes from a consolidated state dict.

    Every rank calls it (each gather is a collective; every rank walks the same modules in the same order). The
    header is known from the parameters' shapes before any gather, so the main process writes each module's
    tensors as it gathers them: besides its shards, a rank holds one module's parameters whole at a time."""
    import deepspeed

    entries = _file_entries(module, skip)
    by_module: dict[int, list] = {}
    for entry in entries:
        by_module.setdefault(id(entry[1]), []).append(entry)
    with contextlib.ExitStack() as stack:
        f = None
        if path is not None:
            header = _safetensors_header(entries)
            f = stack.enter_context(open(path, "wb"))
            f.write(header)
        for group in by_module.values():
            params = [getattr(sub, attr) for _, sub, attr, is_param in group if is_param]
            with deepspeed.zero.GatheredParameters(params):  # read only: released again on exit
                if f is not None:
                    for _, sub, attr, _ in group:
                        tensor = getattr(sub, attr).detach().cpu().contiguous()
                        f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def _file_entries(module, skip: set[str]) -> list[tuple[str, torch.nn.Module, str, bool]]:
    """``(name, module, attribute, is a parameter)`` of each tensor :func:`write_gathered` writes, in file order."""
    entries, seen = [], set()
    for prefix, sub in module.named_modules():
        for attr, p in sub.named_parameters(recurse=False):
            name = f"{prefix}.{attr}" if prefix else attr
            if id(p) not in seen and name not in skip:
                seen.add(id(p))
                entries.append((name, sub, attr, True))
        for attr, b in sub.named_buffers(recurse=False):
            name = f"{prefix}.{attr}" if prefix else attr
            if b is not None and attr not in sub._non_persistent_buffers_set and name not in skip:
                entries.append((name, sub, attr, False))
    return entries


def _safetensors_header(entries: list[tuple[str, torch.nn.Module, str, bool]]) -> bytes:
    """The length and JSON header a safetensors file of ``entries`` starts with, from their full (ZeRO-3:
    ``ds_shape``) shapes."""
    header, offset = {}, 0
    for name, sub, attr, _ in entries:
        t = getattr(sub, attr)
        shape = list(getattr(t, "ds_shape", t.shape))
        size = math.prod(shape) * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": shape,
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


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
