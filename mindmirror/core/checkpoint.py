"""Resumable checkpoints (written atomically), resume decided by all ranks together, and Hugging Face exports.

A checkpoint ``checkpoints/step_N/`` holds Accelerate's ``save_state`` (model, optimizer,
scheduler, RNG states of every rank; DeepSpeed shards under ZeRO) plus ``trainer_state.json``
(step, epoch, position in the epoch, best accuracy, and the layout that wrote it: processes, ZeRO
stage, precision) and ``manifest.json`` (every file and its size), written last. It is written under
``.tmp-step_N`` and renamed when complete, so a crash never leaves a half-written ``step_N``.

On resume (:func:`resume`) the ranks agree on one checkpoint: newest first, a checkpoint every rank
sees complete (its manifest matches) is loaded by every rank, and only if every rank succeeded is it
taken; otherwise all ranks move to the previous one together. A checkpoint written in another layout
is loaded through :mod:`mindmirror.core.elastic`. When checkpoints exist and none loads, the run stops
(:class:`ResumeError`) instead of training from scratch over them; a run without ``--resume`` stops
too when its output folder holds an earlier run's checkpoints or ``best/`` (:func:`refuse_to_overwrite`).
So pruning old checkpoints and replacing ``best/`` only ever happen in a run that resumed or started
on an empty folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from mindmirror.core import elastic
from mindmirror.core.weights import write_gathered
from mindmirror.model import save_tokenizer
from mindmirror.runfiles import BEST, CHECKPOINTS, EXPORT_INFO

log = logging.getLogger(__name__)
STATE_FILE, MANIFEST = "trainer_state.json", "manifest.json"
# Fault injection for tests: the last rank fails to load checkpoint step_<this> (after loading it, so
# the other ranks' collectives inside the load still pair up).
FAULT_LOAD_STEP = "MINDMIRROR_FAULT_LOAD_STEP"


class ResumeError(ValueError):
    """--resume found checkpoints and could load none of them (the command line prints it as one line)."""


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep: int, layout: elastic.Layout) -> Path:
    """Save a resumable checkpoint of every rank's state at ``root/step_<step>``; keep the newest ``keep``.

    ``layout`` (how this run is laid out) is recorded, so a resume in another layout knows what it reads."""
    final, tmp = root / f"step_{step}", root / f".tmp-step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "layout": layout.record()}, indent=2))
        (tmp / MANIFEST).write_text(json.dumps(_files(tmp), indent=2))
        for f in (tmp / STATE_FILE, tmp / MANIFEST):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_folder(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def replace_folder(new: Path, folder: Path) -> None:
    """Put the complete folder ``new`` in the place of ``folder`` (a step saved again, as by a resumed run
    stopped before its next step; best/): the old one is renamed aside before it is deleted, so a process
    killed meanwhile leaves one of the two whole under the name, never a half-deleted one."""
    aside = folder.with_name(f".old-{folder.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if folder.exists():
        os.replace(folder, aside)
    os.replace(new, folder)
    shutil.rmtree(aside, ignore_errors=True)


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


def _gather(accelerator, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    from accelerate.utils import gather_object

    return gather_object([obj])


def _disagreement(answers: list[str | None]) -> str | None:
    """One line naming the ranks whose answer is a problem, each problem once (``None``: no rank has one)."""
    ranks: dict[str, list[int]] = {}
    for rank, answer in enumerate(answers):
        if answer:
            ranks.setdefault(answer, []).append(rank)
    if not ranks:
        return None
    if list(ranks.values()) == [list(range(len(answers)))]:  # one process, or every rank alike
        return next(iter(ranks))
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {a}" for a, r in ranks.items())


def _one_line(error: Exception, limit: int = 400) -> str:
    """An exception as one short line (torch and DeepSpeed messages can span many)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_one(folder: Path, layout: elastic.Layout, accelerator, objects: dict) -> dict:
    """Load ``folder`` into this rank's prepared objects (natively or elastically); its trainer state."""
    state = json.loads((folder / STATE_FILE).read_text())
    recorded = elastic.Layout.from_record(state.pop("layout", None))
    saved = recorded or elastic.infer_layout(folder)
    if layout.loads_natively(saved):
        accelerator.load_state(str(folder))
    else:
        elastic.load(folder, saved, layout, accelerator, trainer_state=state, **objects)
    if os.environ.get(FAULT_LOAD_STEP) == folder.name.split("_")[1] \
            and accelerator.process_index == accelerator.num_processes - 1:
        raise RuntimeError(f"injected fault ({FAULT_LOAD_STEP})")
    return state


def _cannot_resume(root: Path, newest: Path, problem: str, layout: elastic.Layout, count: int) -> ResumeError:
    try:
        recorded = elastic.Layout.from_record(json.loads((newest / STATE_FILE).read_text()).get("layout"))
    except (OSError, ValueError):
        recorded = None
    wrote = str(recorded) if recorded else "unknown (not recorded)"
    return ResumeError(
        f"--resume: none of the {count} checkpoint(s) in {root} can be loaded, and training from scratch would "
        f"prune them and overwrite best/. The newest, {newest.name}, was written by layout: {wrote}; this run's "
        f"layout: {layout}; it failed with: {problem}. Fix what the error names (the same model and data flags as "
        f"the run that wrote it) and rerun with --resume; or, to start afresh, choose another --output_dir or move "
        f"{root} and best/ away.")


def resume(accelerator, out: Path, layout: elastic.Layout, model, optimizer, scheduler,
           optimizer_order: list[str]) -> dict:
    """Load the newest checkpoint in ``out/checkpoints`` that every rank loads; returns its trainer state.

    Candidates go newest first. Each rank checks the manifest in its own view of the file system, and
    a checkpoint counts as complete only when every rank finds it so; every rank then loads it, and it
    is taken only when every rank succeeded, else all ranks move to the previous one together
    (re-loading everything). A checkpoint written in another layout loads through
    :func:`mindmirror.core.elastic.load` (``optimizer_order``: the trainable parameters' names in
    ``build_optimizer``'s order). With checkpoints and none loadable, raises :class:`ResumeError` on
    every rank. With none at all, returns the validation accuracy of an earlier ``best/`` export, if
    any, so that it is replaced only by a better model.
    """
    from accelerate.utils import broadcast_object_list

    root = out / CHECKPOINTS
    names = broadcast_object_list([[p.name for p in list_checkpoints(root)] if accelerator.is_main_process
                                   else None])[0]
    views = _gather(accelerator, {name: checkpoint_problem(root / name) for name in names})
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "optimizer_order": optimizer_order}
    problems = {}
    for name in reversed(names):
        folder = root / name
        problem = _disagreement([view.get(name) for view in views])
        if problem is None:
            t0 = time.time()
            try:
                state, error = _load_one(folder, layout, accelerator, objects), None
            except Exception as e:  # a corrupt or mismatched file surfaces as any of several error types
                state, error = None, _one_line(e)
            problem = _disagreement(_gather(accelerator, error))
            if problem is None:
                log.info(f"resumed from step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']} "
                         f"in it) of {folder}, loaded in {time.time() - t0:.1f} s")
                return state
            problem = f"failed to load ({problem})"
        problems[name] = problem
        if accelerator.is_main_process:
            log.warning("checkpoint %s is not usable: %s%s", folder, problem,
                        "; trying the previous one" if name != names[0] else "")
    if names:
        raise _cannot_resume(root, root / names[-1], problems[names[-1]], layout, len(names))
    best = out / BEST / EXPORT_INFO
    if best.is_file():
        earlier = json.loads(best.read_text())
        log.info(f"--resume: no checkpoint yet, starting from scratch; best/ (step {earlier['step']}, valid accuracy "
                 f"{earlier['valid_accuracy']:.3f}) stays until a better model replaces it")
        return {"best_valid_accuracy": earlier["valid_accuracy"], "best_step": earlier["step"]}
    log.info("--resume: no checkpoint yet, starting from scratch")
    return {}


def refuse_to_overwrite(accelerator, out: Path) -> None:
    """Stop (on every rank) a run without ``--resume`` whose output folder holds an earlier run's
    checkpoints or ``best/``: training from scratch would prune and overwrite them."""
    from accelerate.utils import broadcast_object_list

    found = None
    if accelerator.is_main_process:
        found = [str(p.relative_to(out)) for p in list_checkpoints(out / CHECKPOINTS)]
        found += [f"{BEST}/"] if (out / BEST).exists() else []
    found = broadcast_object_list([found])[0]
    if found:
        raise ValueError(f"{out} already holds an earlier run's {', '.join(found)}: pass --resume to continue "
                         "that run, or choose another --output_dir (training from scratch here would prune and "
                         "overwrite them)")


def export_model(accelerator, model, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """Write a Hugging Face ``save_pretrained`` export (consolidated from ZeRO-3 shards) with the tokenizer.

    Only the main process copies the weights to host memory: without ZeRO-3 every rank holds the whole
    module, so the main process reads its own; under ZeRO-3 the shards are gathered a module at a time (a
    collective that every rank joins) and streamed into ``model.safetensors``
    (:func:`mindmirror.core.weights.write_gathered`), so no rank ever holds the whole model."""
    from mindmirror.core.runtime import is_zero3  # Accelerate's import, only when a run exports

    zero3 = is_zero3(accelerator)
    t5 = accelerator.unwrap_model(model).t5
    tied = set(getattr(t5, "all_tied_weights_keys", {}))  # copies of `shared`, restored on load
    tmp = folder.with_name(f".tmp-{folder.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if zero3:
        write_gathered(t5, tmp / "model.safetensors" if accelerator.is_main_process else None, tied)
    if accelerator.is_main_process:
        if zero3:  # the config and generation config (the weights are written)
            t5.save_pretrained(tmp, state_dict={}, safe_serialization=True)
        else:
            t5_state = {k.removeprefix("t5."): v for k, v in accelerator.get_state_dict(model).items()}
            for key in tied:
                t5_state.pop(key, None)
            t5.save_pretrained(tmp, state_dict=t5_state, safe_serialization=True)
        say_what_is_tied(tmp / "config.json", t5)
        save_tokenizer(tokenizer, tmp)
        if extra:
            (tmp / EXPORT_INFO).write_text(json.dumps(extra, indent=2))
        replace_folder(tmp, folder)
    accelerator.wait_for_everyone()


def say_what_is_tied(config_file: Path, t5) -> None:
    """Make the export's config say whether ``lm_head`` is tied to the embedding. transformers 5 writes
    ``tie_word_embeddings: true`` for every T5 (and keeps the real behaviour in ``scale_decoder_outputs``),
    so a t5-v1_1 export, whose head is its own, would claim a tie its weights do not have."""
    head, shared = t5.get_output_embeddings(), t5.get_input_embeddings()
    config = json.loads(config_file.read_text())
    config["tie_word_embeddings"] = head is not None and head.weight is shared.weight
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
