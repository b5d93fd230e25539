"""Console entry points."""

from __future__ import annotations

import sys


def train_main(argv: list[str] | None = None) -> int:
    """Parse flags, train, and turn user errors into one clear line and exit code 2."""
    from mindmirror.config import parse_args
    from mindmirror.data.formats import DataError
    from mindmirror.model import ModelLoadError

    try:
        cfg = parse_args(argv)
        from mindmirror.loop import train

        train(cfg)
    except (ValueError, FileNotFoundError, DataError, ModelLoadError) as e:
        print(f"mindmirror: error: {e}", file=sys.stderr)
        return 2
    return 0
