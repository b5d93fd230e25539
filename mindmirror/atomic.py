"""Files written whole or not at all: whoever reads the name, meanwhile or after a crash, finds the old
file or the new one, never a part of it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it, on disk before it is renamed
    over ``path``. The temporary name starts with a dot (listings by name do not see it) and is unique across
    processes and nodes (process ids repeat across the nodes of a shared file system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # the rename itself on disk
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
