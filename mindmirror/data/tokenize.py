"""Task rows -> tokenized ``datasets`` Arrow tables, cached on disk.

The cache key hashes the rows themselves (so a changed data file or parsing rule changes it), the
tokenizer's full serialisation, the prefixes and the length limits: a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mindmirror.data.registry import TaskRow, row_dicts

CACHE_VERSION = 1
PREDICT, EXPLAIN = "predict: ", "explain: "


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINDMIRROR_CACHE", Path.home() / ".cache" / "mindmirror"))


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation/padding are call-time state (set by the last call), not how text is split.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.pad_token_id, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()


def cache_key(rows: list[TaskRow], tokenizer, with_rationale: bool, max_input_length: int,
              max_target_length: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, tokenizer_fingerprint(tokenizer), with_rationale, max_input_length,
                         max_target_length, PREDICT, EXPLAIN]).encode())
    for r in rows:
        h.update(json.dumps([r.input, r.label, r.rationale]).encode())
    return h.hexdigest()[:24]


def tokenize_rows(rows: list[TaskRow], tokenizer, *, with_rationale: bool, max_input_length: int,
                  max_target_length: int = 256, cache_dir: str | Path | None = None, num_proc: int = 1):
    """Tokenize rows into a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (and, with
    rationales, ``expl_input_ids`` and ``rationale_ids``), reusing the on-disk cache when the key matches.

    Answer-task inputs get the ``predict: `` prefix and rationale-task inputs ``explain: `` when the
    model learns both; the ``standard`` model sees the plain input, as in the original code.
    """
    from datasets import Dataset

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(rows, tokenizer, with_rationale, max_input_length, max_target_length)

    def encode(batch):
        prefix = PREDICT if with_rationale else ""
        out = {
            "input_ids": tokenizer([prefix + t for t in batch["input"]], max_length=max_input_length,
                                   truncation=True)["input_ids"],
            "labels": tokenizer(batch["label"], max_length=max_target_length, truncation=True)["input_ids"],
        }
        if with_rationale:
            out["expl_input_ids"] = tokenizer([EXPLAIN + t for t in batch["input"]], max_length=max_input_length,
                                              truncation=True)["input_ids"]
            out["rationale_ids"] = tokenizer(batch["rationale"], max_length=max_target_length,
                                             truncation=True)["input_ids"]
        return out

    table = Dataset.from_dict(row_dicts(rows))
    if num_proc > 1:  # the workers are forked: keep the tokenizer's own threads out of them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return table.map(encode, batched=True, batch_size=1000, cache_file_name=str(cache_dir / f"tok-{key}.arrow"),
                     load_from_cache_file=True, desc="tokenizing", num_proc=num_proc if num_proc > 1 else None)
