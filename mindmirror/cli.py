"""Console entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

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

    return _run(parse_and_train, argv)


def eval_main(argv: list[str] | None = None) -> int:
    """``mindmirror-eval``: evaluate an export or checkpoint on a split."""
    from mindmirror.eval_cli import main

    return _run(main, argv)
