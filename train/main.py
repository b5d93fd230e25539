"""Entry point: ``accelerate launch train/main.py [flags]`` (no flags: the embedded default run)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from mindmirror.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
