"""``mindmirror-report``: the ``summary.json`` files of many runs as one results table.

Runs are found under the given folders, and grouped by their ``experiment`` label (the recipe name
for ``mindmirror-recipes`` runs), model and dataset; a group's rows are its seeds. A run that only
fed another (a stage 1 whose ``best/`` export another run was initialised from) is not a row of its
own: its steps and wall time count towards the run it fed. Per group: mean and standard deviation
over seeds of the validation-selected model's test accuracy, and where ``mindmirror-eval`` has
written ``eval_best_test.json`` beside the summary, of the majority vote and the
self-evaluation-weighted vote; total optimizer steps and wall time of all stages. Writes
``results.md``, ``results.csv`` (one row a group), ``runs.csv`` (one row a run) and
``results.png`` (a bar chart) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from mindmirror import runfiles
from mindmirror.tools.recipes import RECIPES

METRICS = (("test_accuracy", "test accuracy (greedy)"), ("majority_vote_accuracy", "majority vote"),
           ("self_eval_vote_accuracy", "self-evaluation vote"))
EVAL_FILE = "eval_best_test.json"


def collect(roots: list[Path]) -> list[dict]:
    """One record per run: its summary, the votes of its evaluation, and the totals of its stages."""
    found = sorted({p.resolve() for root in roots for p in Path(root).rglob(runfiles.SUMMARY)})
    summaries = {}
    for path in found:
        try:
            summaries[path.parent] = runfiles.read_summary(path.parent)
        except runfiles.SummaryError as e:
            print(f"mindmirror-report: skipping {e}", file=sys.stderr)
    fed = {Path(s["init_from"]).parent for s in summaries.values() if s.get("init_from")}
    runs = []
    for folder, s in summaries.items():
        # A stage 1 feeds the row of its chain; its own "test accuracy" is a verdict accuracy.
        if folder in fed or s.get("test_accuracy") is None or "/stage" in str(s.get("experiment", "")):
            continue
        stages = s.get("stages") or [runfiles.stage_cost(s)]
        record = {"folder": str(folder), "experiment": s.get("experiment") or s.get("model_type", "?"),
                  "model": Path(str(s.get("model", "?"))).name, "dataset": s.get("dataset", "?"), "run": s.get("run"),
                  "test_accuracy": s["test_accuracy"], "best_valid_accuracy": s.get("best_valid_accuracy"),
                  "steps": sum(st["final_step"] for st in stages), "wall_s": sum(st["wall_s"] for st in stages),
                  "stages": len(stages)}
        try:
            votes = json.loads((folder / EVAL_FILE).read_text()) if (folder / EVAL_FILE).is_file() else {}
        except (OSError, ValueError) as e:
            print(f"mindmirror-report: ignoring {folder / EVAL_FILE}: {e}", file=sys.stderr)
            votes = {}
        record.update({k: votes[k] for k in ("majority_vote_accuracy", "self_eval_vote_accuracy") if k in votes})
        if votes:
            record["self_eval_samples"] = votes.get("self_eval_samples")
            record["judge_trained"] = votes.get("judge_trained", True)
        runs.append(record)
    return runs


def order(experiment: str) -> tuple:
    """Sort key: the recipes in the paper's order, then other labels alphabetically."""
    names = list(RECIPES)
    return (names.index(experiment), "") if experiment in names else (len(names), experiment)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` where undefined)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (experiment, model, dataset): mean and standard deviation over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["experiment"], r["model"], r["dataset"]), []).append(r)
    rows = []
    for (experiment, model, dataset), members in sorted(groups.items(), key=lambda kv: (order(kv[0][0]), kv[0][1:])):
        row = {"experiment": experiment, "title": RECIPES[experiment].title if experiment in RECIPES else experiment,
               "model": model, "dataset": dataset, "seeds": len(members),
               "runs": ",".join(str(m["run"]) for m in sorted(members, key=lambda m: str(m["run"])))}
        for key in [k for k, _ in METRICS] + ["steps", "wall_s"]:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([m[key] for m in members if m.get(key) is not None])
        row["judge_trained"] = all(m.get("judge_trained", True) for m in members)
        rows.append(row)
    return rows


def cell(row: dict, key: str, fmt: str = "{:.3f}") -> str:
    """``mean ± sd`` of a group's figure, ``-`` where no run has it."""
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if mean is None:
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def markdown(rows: list[dict]) -> str:
    """The results table."""
    header = ["recipe", "model", "dataset", "seeds", *(label for _, label in METRICS), "steps", "wall time (s)"]
    judged = METRICS[2][0]
    table = [[r["title"], r["model"], r["dataset"], r["seeds"], cell(r, METRICS[0][0]), cell(r, METRICS[1][0]),
              cell(r, judged) + ("" if r["judge_trained"] or r[f"{judged}_mean"] is None else " †"),
              cell(r, "steps", "{:.0f}"), cell(r, "wall_s", "{:.0f}")] for r in rows]
    lines = [runfiles.markdown_table(header, table)]
    if any(not r["judge_trained"] and r[f"{judged}_mean"] is not None for r in rows):
        lines += ["", "† the judge never trained on verdicts (no self-evaluation stage): a control, not the method"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars of the three accuracies per group, with the seeds' standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4))
    width = 0.8 / len(METRICS)
    for j, (key, label) in enumerate(METRICS):
        xs = [i + (j - (len(METRICS) - 1) / 2) * width for i in range(len(rows))]
        means = [float("nan") if r[f"{key}_mean"] is None else r[f"{key}_mean"] for r in rows]  # no bar
        errors = [r[f"{key}_std"] or 0.0 for r in rows]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['title']}\n{r['model']}" for r in rows], fontsize=8)
    ax.set_ylabel("test accuracy (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(rows: list[dict], runs: list[dict], out: Path) -> None:
    """results.md, results.csv, runs.csv and results.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(rows))
    for name, records in (("results.csv", rows), ("runs.csv", runs)):
        fields = list(dict.fromkeys(k for r in records for k in r if k != "folder"))
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
    plot(rows, out / "results.png")


def main(argv=None) -> int:
    """Collect, group, write and print the table."""
    p = argparse.ArgumentParser(prog="mindmirror-report", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help=f"folders searched for {runfiles.SUMMARY} (e.g. runs/recipes)")
    p.add_argument("--output_dir", default="", help="where the table and chart go (default: the first folder)")
    args = p.parse_args(argv)
    for root in args.roots:
        if not Path(root).is_dir():
            p.error(f"{root}: no such folder")
    runs = collect([Path(r) for r in args.roots])
    if not runs:
        p.error(f"no finished runs ({runfiles.SUMMARY} with a test accuracy) under {', '.join(args.roots)}")
    runs.sort(key=lambda r: (order(r["experiment"]), r["model"], r["dataset"], str(r["run"])))
    rows = summarise(runs)
    out = Path(args.output_dir or args.roots[0])
    write(rows, runs, out)
    print(markdown(rows))
    print(f"{len(runs)} run(s) in {len(rows)} group(s): {out / 'results.md'}, {out / 'results.csv'}, "
          f"{out / 'runs.csv'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
