"""`accelerate launch` for launch/multinode.sh (and so for the Slurm templates), changed where it would cost
a preempted run its save:

    python launch/accelerate_exec.py [accelerate launch flags] train/main.py [trainer flags]

- One process. Accelerate's one-process launcher runs the trainer as its child and answers SIGTERM by
  exiting and killing the child 5 s later (accelerate 1.16, `commands/launch.py`: `_run_subprocess`
  installs `handle_sigterm`, then `_terminate_process_tree`), whatever signals its parent ignored: a
  preempted one-process run (the default sweep task) lost its save. Here the trainer takes the
  launcher's place (`exec`, with the command line and environment that accelerate prepares, so an
  Accelerate config file still sets precision and the rest): the signal reaches the trainer itself,
  from Slurm, from `kill` of this process or of its group, and no launcher is left to end the run
  while it saves.
- Several processes. As `accelerate launch` does, in this process: torchrun's agent forwards SIGTERM to
  the trainers and SIGKILLs them only after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (launch/multinode.sh sets it).
  It reports trainers that stopped with code 75 as failed (exit 1), or exits 128 + 15 after forwarding a
  signal; this script exits 75 again when a trainer of this node saved its state on a stop signal (the
  trainers leave their exit codes in MINDMIRROR_EXIT_DIR, a folder this script makes and removes).

Anything accelerate does not send to its one-process launcher (DeepSpeed, several processes, several
machines) goes the usual way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

EXIT_PREEMPTED = 75  # mindmirror.core.loop.EXIT_PREEMPTED (not imported: this script runs before the package)
EXIT_DIR = "MINDMIRROR_EXIT_DIR"  # mindmirror.cli.EXIT_DIR


def exec_trainer(args) -> None:
    """In place of accelerate's ``simple_launcher``: become the trainer, with the command and environment
    accelerate would have given its child."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    folder = env.pop(EXIT_DIR, None)  # the trainer's exit code is this process's own
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def saved_on_signal(folder: Path) -> bool:
    """Whether a trainer of this node exited with the code of a state saved on a stop signal."""
    return any(f.read_text().strip() == str(EXIT_PREEMPTED) for f in folder.glob("rank-*"))


def main(argv: list[str]) -> int:
    import accelerate.commands.launch as launch

    if not callable(getattr(launch, "simple_launcher", None)):  # renamed in a later accelerate: say so, loudly
        sys.exit("accelerate_exec: this accelerate has no commands.launch.simple_launcher to replace; "
                 "a one-process run could be killed 5 s into a save (see launch/accelerate_exec.py)")
    launch.simple_launcher = exec_trainer  # looked up when launch_command dispatches
    folder = Path(tempfile.mkdtemp(prefix="mindmirror-exit-"))
    os.environ[EXIT_DIR] = str(folder)
    sys.argv = ["accelerate launch", *argv]
    failure = None
    try:
        launch.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except Exception:  # torchrun's ChildFailedError and the like
        failure, code = traceback.format_exc(), 1
    if code != 0 and saved_on_signal(folder):
        sys.stderr.write(f"accelerate_exec: the trainers saved their state on a stop signal: exit code "
                         f"{EXIT_PREEMPTED} (rerun with --resume to continue)\n")
        code = EXIT_PREEMPTED
    elif failure:  # the report `accelerate launch` would show
        sys.stderr.write(failure)
    shutil.rmtree(folder, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
