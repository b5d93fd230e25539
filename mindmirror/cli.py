"""Console entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path


def _run(command, argv) -> int:
    from mindmirror.data.formats import DataError
    from mindmirror.model import ModelLoadError

    try:
        command(argv)
    except (ValueError, FileNotFoundError, DataError, ModelLoadError) as e:
        _error_line(e)
        return 2
    return 0


def _error_line(error: Exception) -> None:
    """The error as one line on stderr, in a single write: ``print`` writes the text and the newline
    separately, so the lines of ranks failing together could run into one another."""
    sys.stderr.write(f"mindmirror: error: {error}\n")
    sys.stderr.flush()


def train_main(argv: list[str] | None = None) -> int:
    """``mindmirror-train`` / ``train/main.py``: parse flags, route the logs, train. Exit codes: 0 done, 2 a
    user error (one line), 1 a run stopped by non-finite losses, 75 preempted with its state saved."""
    def parse_and_train(argv):
        from mindmirror import logs
        from mindmirror.config import parse_args
        from mindmirror.core.loop import train

        cfg = parse_args(argv)
        logs.setup(cfg.verbose, int(os.environ.get("RANK", "0")))
        train(cfg)

    from mindmirror.core.loop import NonFiniteLossError, Preempted
    from mindmirror.core.runtime import launched

    try:
        code = _run(parse_and_train, argv)
    except Preempted as e:  # the checkpoint is saved; the Slurm templates requeue on this code
        code = e.exit_code
    except NonFiniteLossError as e:
        _error_line(e)
        code = 1
    except Exception:
        if not launched():
            raise
        traceback.print_exc()  # then leave as below: the interpreter's exit would free the process groups
        code = 1
    _report_exit(code)
    if launched():  # every output is written and closed; the process groups are left standing (runtime.keep_until_exit)
        _leave(code)
    return code


EXIT_DIR = "MINDMIRROR_EXIT_DIR"  # set by launch/accelerate_exec.py: where each rank leaves its exit code


def _report_exit(code: int) -> None:
    """Leave this rank's exit code where launch/accelerate_exec.py reads it: torchrun turns a trainer's
    code into its own failure (1, or 143 after it forwarded a signal), and the launcher gives the job
    75 again when a rank saved on a stop signal."""
    folder = os.environ.get(EXIT_DIR)
    if folder:
        with contextlib.suppress(OSError):  # the launcher then reports what torchrun says
            (Path(folder) / f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))


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
    from mindmirror.evaluation.eval_cli import main

    return _run(main, argv)
