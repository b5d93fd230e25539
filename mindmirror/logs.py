"""Where a run's messages go.

The console shows mindmirror's own lines: the data line, the model line, the progress bar, the
evaluations, its warnings and the final table. Everything else (the libraries' notes and warnings, the
per-rank save messages, Python warnings) goes, with mindmirror's lines, to ``<output_dir>/log.txt``:
the full record, every rank's lines marked with its rank. ``--verbose`` brings the full stream back to
the console. The command line calls :func:`setup` before anything is built; the loop calls
:func:`write_to` once the run may write its folder (after the resume decision, so a refused run writes
nothing): the records held until then go first. At its end a run prints a few test questions with the
student's rationale (:func:`print_examples`) and its result table (:func:`result_rows`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import sys
from pathlib import Path

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"
FILE_ONLY = {"console": False}
HELD_RECORDS = 10_000  # records kept until the log file opens (the oldest are dropped beyond this)


class ConsoleFilter(logging.Filter):
    """mindmirror's lines (info on the main process, warnings on every rank) and other libraries' errors;
    with ``verbose``, every library's lines too, as before this filter existed. A record logged with
    ``extra=FILE_ONLY`` is for log.txt alone (the console got it another way, e.g. above a progress bar)."""

    def __init__(self, verbose: bool, is_main: bool):
        super().__init__()
        self.verbose, self.floor = verbose, logging.INFO if is_main else logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.floor or not getattr(record, "console", True):
            return False
        return self.verbose or record.name.startswith("mindmirror") or record.levelno >= logging.ERROR


class RunLog(logging.Handler):
    """Holds every record until :meth:`open` names the log file, then writes them there, and all later ones."""

    def __init__(self, rank: int):
        super().__init__(logging.DEBUG)
        self.rank, self.held, self.file = rank, [], None

    def emit(self, record: logging.LogRecord) -> None:
        record.rank = f" [rank {self.rank}]" if self.rank else ""
        if self.file is None:
            self.held = self.held[-(HELD_RECORDS - 1):] + [record]
        else:
            self.file.handle(record)

    def open(self, path) -> None:
        if self.file is not None:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(FILE_FORMAT))
        for record in self.held:
            self.file.handle(record)
        self.held = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def setup(verbose: bool = False, rank: int = 0) -> None:
    """Route every logger as the module docstring says (call once, before the libraries are used)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if isinstance(h, RunLog) or getattr(h, "_mindmirror", False)]:
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(ConsoleFilter(verbose, rank == 0))
    console._mindmirror = True
    root.addHandler(console)
    root.addHandler(RunLog(rank))
    logging.captureWarnings(True)
    _route_libraries(verbose)


def write_to(path) -> None:
    """Start writing the log file (no-op when :func:`setup` was not called, e.g. the loop used as a library)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLog):
            handler.open(path)


def _route_libraries(verbose: bool) -> None:
    """transformers and DeepSpeed print through handlers of their own: send their lines through ours."""
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    if not verbose:  # "Loading weights", "Writing model shards"
        transformers.utils.logging.disable_progress_bar()
    if importlib.util.find_spec("deepspeed") is None:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        import deepspeed  # noqa: F401  (its logger is made at import, with a handler printing to stdout)
    ds_log = logging.getLogger("DeepSpeed")
    for handler in list(ds_log.handlers):
        ds_log.removeHandler(handler)
    ds_log.propagate = True
    for line in printed.getvalue().splitlines():
        if line.strip():
            ds_log.info(line)


def print_examples(records: list[dict]) -> None:
    """Test questions with the student's rationale, its answer and the gold answer."""
    for i, r in enumerate(records, 1):
        lines = [f"test question {i}: {' '.join(r['input'].split())}"]
        if r.get("rationale") is not None:
            lines.append(f"  student's rationale: {r['rationale']}")
        lines.append(f"  student's answer: {r['prediction']}   gold: {r['gold']}   "
                     f"{'right' if r['correct'] else 'wrong'}")
        print("\n".join(lines), flush=True)


def result_rows(summary: dict, out: Path) -> list[tuple[str, object]]:
    """The table printed at the end of a run."""
    return [("model", summary["model"]), ("dataset / model type", f"{summary['dataset']} / {summary['model_type']}"),
            ("steps", summary["final_step"]), ("final train loss", f"{summary['final_loss'] or float('nan'):.4f}"),
            ("best valid accuracy", f"{summary['best_valid_accuracy']:.3f} (step {summary['best_step']})"),
            ("test accuracy (best model)", f"{summary['test_accuracy']:.3f}"),
            ("train samples/s", f"{summary['train_samples_per_s']:.1f}"), ("wall time", f"{summary['wall_s']:.0f} s"),
            ("processes / ZeRO / precision", f"{summary['world_size']} / {summary['zero_stage']} / "
                                             f"{summary['mixed_precision']}"),
            ("outputs", str(out))]
