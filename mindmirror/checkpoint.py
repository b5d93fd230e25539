"""Resumable checkpoints (written atomically) and Hugging Face exports.

A checkpoint ``checkpoints/step_N/`` holds Accelerate's ``save_state`` (model, optimizer,
scheduler, RNG states of every rank; DeepSpeed shards under ZeRO) plus ``trainer_state.json``
(step, epoch, position in the epoch, best accuracy) and ``manifest.json`` (every file and its
size), written last. It is written under ``.tmp-step_N`` and renamed when complete, so a crash
never leaves a half-written ``step_N``; a checkpoint whose manifest is missing or does not match
its files is skipped on resume, with a warning, in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
STATE_FILE, MANIFEST = "trainer_state.json", "manifest.json"


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep: int) -> Path:
    """Save a resumable checkpoint of every rank's state at ``root/step_<step>``; keep the newest ``keep``."""
    final, tmp = root / f"step_{step}", root / f".tmp-step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        (tmp / MANIFEST).write_text(json.dumps(_files(tmp), indent=2))
        for f in (tmp / STATE_FILE, tmp / MANIFEST):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or ``None`` when its files match its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"manifest or trainer state unreadable ({e})"
    actual = _files(folder)
    for name, size in manifest.items():
        if actual.get(name) != size:
            return f"{name} is missing or has {actual.get(name)} bytes instead of {size}"
    return None


def load_latest_checkpoint(accelerator, root: Path) -> dict | None:
    """Load the newest usable checkpoint into the prepared objects; returns its trainer state.

    Checkpoints that fail the manifest check or fail to load are skipped with a warning.
    """
    for folder in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(folder)
        if problem is None:
            try:
                accelerator.load_state(str(folder))
                return json.loads((folder / STATE_FILE).read_text())
            except Exception as e:  # a corrupt tensor file surfaces as any of several error types
                problem = f"failed to load ({type(e).__name__}: {e})"
        if accelerator.is_main_process:
            log.warning("checkpoint %s is not usable: %s; trying the previous one", folder, problem)
    return None


def export_model(accelerator, model, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """Write a Hugging Face ``save_pretrained`` export (consolidated from ZeRO-3 shards) with the tokenizer."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions onto the main process
    if accelerator.is_main_process:
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        t5 = accelerator.unwrap_model(model).t5
        t5_state = {k.removeprefix("t5."): v for k, v in state_dict.items()}
        for tied in getattr(t5, "all_tied_weights_keys", {}):  # copies of `shared`, restored on load
            t5_state.pop(tied, None)
        t5.save_pretrained(tmp, state_dict=t5_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "mindmirror.json").write_text(json.dumps(extra, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()
