"""Console entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

import os
import sys


def _run(command, argv) -> int:
    from mindmirror.data.formats import DataError
    from mindmirror.model import ModelLoadError

    try:
        command(argv)
    except (ValueError, FileNotFoundError, DataError, ModelLoadError) as e:
        print(f"mindmirror: error: {e}", file=sys.stderr)
        return 2
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """``mindmirror-train`` / ``train/main.py``: parse flags and train."""
    def parse_and_train(argv):
        from mindmirror.config import parse_args
        from mindmirror.loop import train

        train(parse_args(argv))

    try:
        code = _run(parse_and_train, argv)
    except SystemExit as e:  # a preempted run exits with its own code once its checkpoint is saved
        code = e.code if isinstance(e.code, int) else 1
    if os.environ.get("LOCAL_RANK") is not None:  # a launched process: every output is written and closed
        _leave(code)
    return code


def _leave(code: int) -> None:
    """Exit without the interpreter's teardown. The C++ threads of gloo and DeepSpeed's CPU communication ops
    can abort a finished multi-process run while static objects are destroyed ("terminate called without an
    active exception", SIGABRT), turning a saved, complete run into a failed one."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def eval_main(argv: list[str] | None = None) -> int:
    """``mindmirror-eval``: evaluate an export or checkpoint on a split."""
    from mindmirror.eval_cli import main

    return _run(main, argv)
