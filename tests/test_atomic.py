"""mindmirror.atomic.write_atomic: a file is replaced whole, through a hidden temporary file beside it that
never stays behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mindmirror import atomic


def test_writes_and_replaces_whole_files(tmp_path):
    path = tmp_path / "new" / "folder" / "file.json"
    atomic.write_atomic(path, "first ✓\n")
    assert path.read_bytes() == "first ✓\n".encode()
    atomic.write_atomic(path, "second")
    assert path.read_text(encoding="utf-8") == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.json"]


def test_the_old_file_stays_until_the_new_one_is_complete(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    seen = []
    replace = os.replace

    def watching(src, dst):
        seen.append((os.path.basename(src), Path(src).read_text(), Path(dst).read_text()))
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", watching)
    atomic.write_atomic(path, "new " * 1000)
    (name, new, old), = seen
    assert name.startswith(".manifest.json.tmp-") and new == "new " * 1000 and old == "old"
    assert path.read_text() == "new " * 1000


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic.write_atomic(path, b"not text")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_temporary_names_differ_between_writers(tmp_path, monkeypatch):
    """Builders on several nodes may publish into one shared folder; their process ids can be equal."""
    names = []
    replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (names.append(str(src)), replace(src, dst)))
    monkeypatch.setattr(atomic.os, "getpid", lambda: 1)
    for _ in range(2):
        atomic.write_atomic(tmp_path / "f", "x")
    assert len(set(names)) == 2
