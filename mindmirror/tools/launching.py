"""Launching the trainer from the tools that drive it (``mindmirror-scaling``, ``mindmirror-recipes``,
``mindmirror-databench``): where ``train/main.py`` is, the head of an ``accelerate launch`` on this
machine, and why a launched run failed, read from its exit code and its captured output.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "train" / "main.py"
LAUNCH_LOG = "console.txt"  # a launched run's captured stdout and stderr (its own log is log.txt)
OOM_PATTERNS = ("out of memory", "outofmemoryerror", "cannot allocate memory", "memoryerror")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_launch(num_processes: int) -> tuple[list[str], dict]:
    """The head of an ``accelerate launch`` on this machine (a free port) and its environment, in which
    the caller decides whether ``ACCELERATE_USE_CPU`` is set."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--main_process_port",
           str(free_port()), "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    return cmd, env


def log_tail(path: Path, chars: int = 20000) -> str:
    """The last ``chars`` characters of a launched run's log (enough for its error and traceback)."""
    return path.read_text(errors="replace")[-chars:]


def failure_reason(returncode: int, log: str) -> tuple[str, str]:
    """(status, reason) of a failed run, from its exit code and the tail of its log."""
    lower = log.lower()
    if any(pattern in lower for pattern in OOM_PATTERNS) or returncode in (-9, 137):
        return "out of memory", "killed (SIGKILL, likely the host's OOM killer)" if returncode in (-9, 137) \
            and not any(pattern in lower for pattern in OOM_PATTERNS) else "out of memory"
    # The trainer's own message ("mindmirror: error: ..."), else the first exception line of a worker
    # (the launcher's CalledProcessError / ChildFailedError that follow only repeat that it failed).
    lines = [line.strip() for line in log.splitlines()]
    mine = [line for line in lines if line.startswith("mindmirror: error:")]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)
              and not re.match(r"^[\w.]*(CalledProcessError|ChildFailedError)", line)]
    return "failed", ((mine or errors or [f"exit code {returncode}"])[0])[:300]
