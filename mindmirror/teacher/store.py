"""A durable, append-only store of the teacher's completed responses.

Every response the server completes is appended to a JSON-lines file and fsync'd *before* it is
used, so a run killed at any moment (SIGKILL included) and started again finds every response it
had used and pays for none of them twice. A response is keyed by a hash of what decides it: the
model, the messages, the sampling parameters (temperature, top_p, stop sequences, extra body
fields) and its place among the samples drawn for the same prompt (see :func:`request_key`); a
changed prompt or sampling parameter therefore never reuses a stale response. The completion
limit is not part of the key: each response records the ``max_tokens`` it was made with, so a run
with a larger one reuses every complete reply (see :mod:`~mindmirror.teacher.generate`).

Each process appends to its own file (``responses-<shard>.jsonl``, guarded by an exclusive lock)
and reads every ``responses*.jsonl`` of the folder, so the shards of a job array share their
responses and a run resharded differently reuses them all. A line cut short by a kill (the only
way a line can be incomplete) is dropped when the file is opened again.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path


def request_key(model: str, messages: list[dict], params: dict, draw: list) -> str:
    """Hash of one request: ``draw`` says which samples it holds (kind, CoT slot, first sample index).

    Two CoTs with the same text are judged by requests with different slots, so each gets its own
    evaluations (as the original tree-of-thought run did: it kept no value cache).
    """
    payload = json.dumps({"model": model, "messages": messages, "params": params, "draw": draw},
                         sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class StoreLockedError(RuntimeError):
    """Another process is appending to the same store file."""


class ResponseStore:
    """Completed responses by key; :meth:`put` returns once the response is on disk."""

    def __init__(self, folder: str | Path, name: str, readonly: bool = False):
        """Load every ``responses*.jsonl`` of ``folder``; unless ``readonly``, open ``responses-<name>.jsonl``
        for appending (creating the folder) and lock it against a second writer."""
        self.folder = Path(folder)
        self.path = self.folder / f"responses-{name}.jsonl"
        self._entries: dict[str, dict] = {}
        self.dropped_lines = 0
        self._file = None
        if not readonly:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab+")  # noqa: SIM115  (held, and locked, until close())
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                self._file.close()
                raise StoreLockedError(f"{self.path} is in use by another mindmirror-teacher process (the same "
                                       "shard running twice?); wait for it or stop it") from e
            self._drop_cut_line()
        for path in sorted(self.folder.glob("responses*.jsonl")):
            self._load(path)
        if self.dropped_lines:
            print(f"mindmirror-teacher: {self.dropped_lines} unreadable line(s) in {self.folder}/responses*.jsonl "
                  "ignored; those requests are made again", file=sys.stderr)
        self._pending: list[tuple[bytes, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    def _drop_cut_line(self) -> None:
        """Truncate our own file after its last complete line (a kill can cut the last write short)."""
        size = self._file.seek(0, os.SEEK_END)
        self._file.seek(max(0, size - 1))
        if size == 0 or self._file.read(1) == b"\n":
            return
        keep, pos = 0, size
        while pos > 0:  # read backwards for the last newline
            step = min(1 << 16, pos)
            pos -= step
            self._file.seek(pos)
            cut = self._file.read(step).rfind(b"\n")
            if cut >= 0:
                keep = pos + cut + 1
                break
        self._file.truncate(keep)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _load(self, path: Path) -> None:
        with open(path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                    # Another shard's file may end in a line being written right now: not ours to repair.
                    if line.endswith(b"\n"):
                        self.dropped_lines += 1
                    continue
                self._entries[entry.pop("key")] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def values(self):
        """Every stored response."""
        return self._entries.values()

    def get(self, key: str) -> dict | None:
        """The stored response of ``key``, or ``None``."""
        return self._entries.get(key)

    async def put(self, key: str, entry: dict) -> None:
        """Append ``entry`` under ``key`` and return once it is fsync'd.

        Concurrent calls are written together (one write and one fsync for all of them), so a
        thousand requests in flight do not cost a thousand fsyncs.
        """
        line = (json.dumps({"key": key, **entry}, ensure_ascii=True, separators=(",", ":")) + "\n").encode("utf-8")
        done = asyncio.get_running_loop().create_future()
        self._pending.append((line, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done
        self._entries[key] = entry

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
            except OSError as e:
                for _, done in batch:
                    done.set_exception(OSError(e.errno, f"cannot append to the response store {self.path}: "
                                                        f"{e.strerror or e}"))
                continue
            for _, done in batch:
                done.set_result(None)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Release the file (and its lock)."""
        if self._file is not None:
            self._file.close()
