"""What a run folder holds: the names of its files (every tool reads them by these names), the cost
of each stage of a chain of runs, and the small key-value table the command-line tools print."""

from __future__ import annotations

import json
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


def stage_cost(summary: dict) -> dict:
    """What one run of a chain cost, as ``summary["stages"]`` lists it."""
    return {"experiment": summary.get("experiment", summary.get("model_type")), "final_step": summary["final_step"],
            "wall_s": summary["wall_s"]}


def earlier_stages(init_from: str) -> list[dict]:
    """The ``stages`` of the run whose export ``init_from`` names (``[]`` when it has no summary)."""
    try:
        previous = json.loads((Path(init_from).parent / SUMMARY).read_text()) if init_from else None
        return [] if previous is None else previous.get("stages") or [stage_cost(previous)]
    except (OSError, ValueError, KeyError, AttributeError):  # unreadable, or not a finished run's summary
        return []


def format_table(rows: list[tuple[str, object]]) -> str:
    """``name  value`` lines with the names aligned, set apart by blank lines."""
    width = max(len(name) for name, _ in rows)
    return "\n" + "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows) + "\n"


def print_table(rows: list[tuple[str, object]]) -> None:
    print(format_table(rows), flush=True)
