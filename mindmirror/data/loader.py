"""From a run's flags to the tokenized tables it trains and evaluates on: built once, memory-mapped everywhere.

The first time a data set is used with given flags, the main process parses the teacher files, builds the
task rows (:mod:`mindmirror.data.registry`), tokenizes them in parallel (:mod:`mindmirror.data.tokenize`) and
records what it built in a small manifest in the cache. Every later load, and every other rank, finds the
manifest by a key over the data files' names, sizes and modification times, the flags that shape the rows
and the tokenizer, and memory-maps the Arrow files: no rank parses JSON or holds a Python copy of the rows,
and the ranks of one node share the mapped pages.

The flags that shape the rows are the ``DataConfig`` fields marked ``rows`` (and the seed ``--run``), those
that shape their tokens the ones marked ``tokens``: the build is given exactly what the key is made of
(:func:`row_args`, :func:`token_args`), so no flag can change the tables without changing the key.

On several nodes the cache may be shared (one folder every node sees) or node-local (``~/.cache`` on each
node's own disk): global rank 0 builds first, and with it the first process of each node that does not see
rank 0's folder, each into its own cache; every other process waits, then maps (:func:`builders_first`). A
build writes its tables into a folder of its own and publishes them by renaming its manifest into place, so
a reader never maps a half-written table and builders that meet in one folder never write the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from mindmirror.atomic import write_atomic
from mindmirror.config import DataConfig, group, marked
from mindmirror.data.registry import BUNDLED_DATA_DIR, DATASETS, ROW_RULES, BuildReport, build_task_rows
from mindmirror.data.tokenize import default_cache_dir, tokenize_rows, tokenizer_fingerprint

MANIFEST_VERSION = 1
TOKEN_COLUMNS = ("input_ids", "labels", "expl_input_ids", "rationale_ids")
PARALLEL_FROM_ROWS = 20_000  # below this, starting tokenizer worker processes costs more than it saves
# Test-only fault injection (nothing else sets it): a build takes this many seconds longer (a cold build of
# millions of rows), so that the other ranks wait for it in a collective.
FAULT_SLOW_BUILD_S = "MINDMIRROR_FAULT_SLOW_BUILD_S"
ROW_FLAGS = marked("rows")  # DataConfig's flags that build_task_rows is given
TOKEN_FLAGS = marked("tokens")  # and those tokenize_rows is given
log = logging.getLogger(__name__)


def _files_fingerprint(folder: Path) -> list:
    """Name, size and modification time of every file under ``folder``: a changed file changes the key."""
    return [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.rglob("*")) if p.is_file()]


def row_args(cfg) -> dict:
    """What ``build_task_rows`` is given: the ``DataConfig`` flags marked ``rows`` (the data folder as a path:
    empty is the bundled data) and the seed ``--run``, which subsamples."""
    data = group(cfg, DataConfig)
    args = {name: getattr(data, name) for name in ROW_FLAGS}
    args["data_dir"] = str(Path(data.data_dir) if data.data_dir else BUNDLED_DATA_DIR)
    return args | {"seed": cfg.seed}


def token_args(cfg) -> dict:
    """What ``tokenize_rows`` is given besides the rows and the tokenizer: the ``DataConfig`` flags marked
    ``tokens`` (whether rationales are tokenized follows ``--model_type``, a row flag)."""
    data = group(cfg, DataConfig)
    return {name: getattr(data, name) for name in TOKEN_FLAGS}


def build_key(cfg, tokenizer) -> str:
    """The cache key of a run's tables: data files, the flags that shape the rows, the tokenizer, the lengths."""
    rows = row_args(cfg)
    data_dir = Path(rows["data_dir"])
    h = hashlib.sha256(json.dumps([MANIFEST_VERSION, ROW_RULES, str(data_dir.resolve()), rows, token_args(cfg),
                                   tokenizer.eos_token, tokenizer_fingerprint(tokenizer),
                                   _files_fingerprint(data_dir / DATASETS[cfg.dataset].name)]).encode())
    return h.hexdigest()[:24]


def _open_tables(manifest: dict, splits) -> dict | None:
    """Memory-map the Arrow files a manifest lists, or ``None`` when any is missing."""
    from datasets import Dataset, concatenate_datasets

    files = manifest.get("files", {})
    if not all(split in files and all(Path(f).is_file() for f in files[split]) for split in splits):
        return None
    return {split: concatenate_datasets([Dataset.from_file(f) for f in files[split]]) for split in splits}


def _build(cfg, tokenizer, splits, cache_dir: Path, manifest_path: Path, known: dict) -> tuple[dict, BuildReport]:
    """Parse, build and tokenize (the cold path) into a folder of this build's own; publish it by an atomic
    rename of the manifest that later loads map."""
    time.sleep(float(os.environ.get(FAULT_SLOW_BUILD_S, "0")))
    own = cache_dir / f"{manifest_path.stem}-{uuid.uuid4().hex[:12]}"  # no other builder writes here
    rows, report = build_task_rows(**row_args(cfg), eos_token=tokenizer.eos_token)
    workers = cfg.preprocessing_num_workers or (min(8, os.cpu_count() or 1) if len(rows["train"]) >= PARALLEL_FROM_ROWS
                                                else 1)
    tables = {split: tokenize_rows(rows[split], tokenizer, with_rationale=cfg.model_type != "standard",
                                   **token_args(cfg), cache_dir=own, num_proc=workers if split == "train" else 1)
              for split in splits}
    files = known | {s: [f["filename"] for f in t.cache_files] for s, t in tables.items()}
    manifest = {"report": report.to_dict(), "files": files}
    write_atomic(manifest_path, json.dumps(manifest))  # a reader never sees half a manifest
    return tables, report


def load_data(cfg, tokenizer, accelerator=None, splits=("train", "valid", "test"),
              limits: dict[str, int] | None = None) -> tuple[dict, BuildReport]:
    """The tokenized tables of ``splits`` (``datasets.Dataset``, memory-mapped) and the build report.

    Each table holds the task rows' text columns (``input``, ``label``, ``rationale``, ``branch``, ``source``,
    ``record``) and their token ids. ``limits`` caps a split at its first N rows (0: all). Under several
    processes those that may have to build go first (:func:`builders_first`); the others then map what they
    wrote.
    """
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with builders_first(accelerator, cache_dir):
        manifest_path = cache_dir / f"build-{build_key(cfg, tokenizer)}.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        tables = _open_tables(manifest, splits) if manifest else None
        if tables is None:
            tables, report = _build(cfg, tokenizer, splits, cache_dir, manifest_path, manifest.get("files", {}))
        else:
            report = BuildReport.from_dict(manifest["report"])
            report.cached = True
    log.info(f"rank {accelerator.process_index if accelerator else 0}: "
             f"{'mapped' if report.cached else 'built'} the tokenized tables of {manifest_path}",
             extra={"console": False})
    for split, limit in (limits or {}).items():
        if limit and split in tables and limit < len(tables[split]):
            tables[split] = tables[split].select(range(limit))
    return tables, report


@contextlib.contextmanager
def builders_first(accelerator, cache_dir: Path):
    """Let the processes that may have to build the tables go first; the others wait, then map them.

    Global rank 0 goes first, and so does the first process of every node that does not see rank 0's cache
    folder (a node-local cache): those build at once, each into its own folder. The other processes of
    each node, and the nodes that share rank 0's folder, wait and then find the build. Whether a node
    shares the folder is seen, not assumed: rank 0 leaves a probe file in it for the others to look for.
    (Accelerate's ``main_process_first`` lets only global rank 0 go first: with a node-local cache every
    process of the other nodes then built at once, in the same folder.)"""
    if accelerator is None or accelerator.num_processes == 1:
        yield
        return
    from accelerate.utils import broadcast_object_list

    probe = cache_dir / f".probe-{uuid.uuid4().hex}" if accelerator.is_main_process else None
    try:
        if probe is not None:
            probe.touch()
        name = broadcast_object_list([probe.name if probe is not None else None])[0]
        first = accelerator.is_main_process or (accelerator.is_local_main_process and not (cache_dir / name).exists())
        if not first:
            accelerator.wait_for_everyone()
        yield
        if first:
            accelerator.wait_for_everyone()
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)


def token_lengths(table) -> dict[str, np.ndarray]:
    """Length of every row's token lists, per token column, read from Arrow without building Python lists."""
    import pyarrow.compute as pc

    if table._indices is not None:
        table = table.flatten_indices()
    return {c: pc.list_value_length(table.data.column(c)).to_numpy(zero_copy_only=False).astype(np.int64)
            for c in TOKEN_COLUMNS if c in table.column_names}
