"""What a run folder holds: the names of its files (every tool reads them by these names), its summary as
every tool reads it, the cost of each stage of a chain of runs, and the tables the tools print and write
(key-value for the console, Markdown for files)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

CONFIG = "config.json"  # the run's flags as given
SUMMARY = "summary.json"  # written last: a run with one has finished
METRICS = "metrics.jsonl"  # one line per log step, evaluation and test
SKIPPED = "skipped_records.jsonl"  # the questions left out of the data, and why
LOG = "log.txt"  # the full log of the main process (the console shows a short version)
VALID_PREDICTIONS = "valid_predictions.jsonl"  # the latest evaluation's outputs
PREDICTIONS = "predictions.jsonl"  # the best model's test outputs
CHECKPOINTS, BEST, FINAL = "checkpoints", "best", "final"  # resumable state; the two exports
EXPORT_INFO = "mindmirror.json"  # in an export: the step it was taken at (and its validation accuracy)


class SummaryError(ValueError):
    """A run folder has no readable summary: the message names the file and why."""


def read_summary(run_dir: Path | str) -> dict:
    """The summary of the run in ``run_dir``; :class:`SummaryError` when its file is missing (the run has not
    finished: the summary is written last), unreadable, or holds no JSON object."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise SummaryError(f"{path}: not found (a run writes it last, when it finishes)") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise SummaryError(f"{path}: unreadable ({e})") from None
    if not isinstance(summary, dict):
        raise SummaryError(f"{path}: holds a {type(summary).__name__}, not a run's summary (a JSON object)")
    return summary


def finished_summary(run_dir: Path | str) -> dict | None:
    """The summary of the run in ``run_dir`` when it has finished (see :func:`read_summary`), else ``None``."""
    try:
        return read_summary(run_dir)
    except SummaryError:
        return None


def stage_cost(summary: dict) -> dict:
    """What one run of a chain cost, as ``summary["stages"]`` lists it."""
    return {"experiment": summary.get("experiment", summary.get("model_type")), "final_step": summary["final_step"],
            "wall_s": summary["wall_s"]}


def earlier_stages(init_from: str) -> list[dict]:
    """The ``stages`` of the run whose export ``init_from`` names (``[]`` when it has no summary)."""
    previous = finished_summary(Path(init_from).parent) if init_from else None
    try:
        return [] if previous is None else previous.get("stages") or [stage_cost(previous)]
    except KeyError:  # not a finished run's summary
        return []


def format_table(rows: list[tuple[str, object]]) -> str:
    """``name  value`` lines with the names aligned, set apart by blank lines."""
    width = max(len(name) for name, _ in rows)
    return "\n" + "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows) + "\n"


def print_table(rows: list[tuple[str, object]]) -> None:
    print(format_table(rows), flush=True)


def markdown_row(cells: Iterable[object]) -> str:
    """One line of a Markdown table: ``| a | b |`` (an empty cell is ``| |``)."""
    return "|" + "".join(f" {text} |" if text else " |" for text in map(str, cells))


def markdown_table(header: Sequence[object], rows: Iterable[Iterable[object]]) -> str:
    """A Markdown table: the header, its rule and a line per row (no newline at the end)."""
    return "\n".join([markdown_row(header), "|" + "---|" * len(header), *map(markdown_row, rows)])
