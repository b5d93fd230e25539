"""The data card of generated teacher data: ``teacher_report.json`` and ``teacher_report.md``.

Per split it says how good the teacher was (accuracy of its CoTs against the ground truth: every
CoT, the first one, the majority vote and the CoT the self-evaluations selected), how much of its
text the trainer cannot parse, how its verdicts are distributed, and how well the verdicts agree
with the CoTs' correctness: self-evaluation distillation teaches the student those verdicts, so
a teacher whose verdicts do not track correctness has nothing to teach. It also lists every
question whose data is incomplete (``failed``): requests that failed, or fewer usable CoTs or
self-evaluations than asked once the redraw bound was spent; the unusable replies themselves
(cut at ``max_tokens``, or without the answer or verdict the parsers need) are counted and left out
of the data.
"""

from __future__ import annotations

from mindmirror.data import formats
from mindmirror.evaluation import metrics
from mindmirror.evaluation.selfeval import vote
from mindmirror.runfiles import markdown_table

MAX_LISTED_FAILURES = 10


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def failure(row: dict) -> str | None:
    """Why a row's data is incomplete, or ``None`` when it is complete."""
    return row["error"] or ("; ".join(row["missing"]) if row["missing"] else None)


def incomplete(rows: list[dict], n: int, m: int) -> dict:
    """What is incomplete in ``rows``: failed questions, questions with fewer than ``n`` usable CoTs, CoTs
    with fewer than ``m`` usable self-evaluations, and the ``failed`` list of every such question."""
    return {"questions": len(rows), "failed_questions": sum(1 for r in rows if r["error"]),
            "short_questions": sum(1 for r in rows if not r["error"] and len(r["cots"]) < n),
            "short_evaluations": sum(1 for r in rows for evals in r["evaluations"] if len(evals) < m),
            "failed": [{"idx": r["idx"], "reason": failure(r)} for r in rows if failure(r)]}


def split_report(rows: list[dict], records: list[dict], family: str, settings: dict) -> dict:
    """The card of one split from its rows (see ``layout``) and the teacher records written from them."""
    kind = formats.family_metric(family)
    answered = [(row, rec) for row, rec in zip(rows, records, strict=True) if not row["error"]]
    cots = right_cots = first_right = vote_right = selected_right = 0
    verdicts = {v: 0 for v in (*formats.VERDICTS, "none")}  # none: 0, evaluations without one are left out
    confusion = {side: {v: 0 for v in formats.VERDICTS} for side in ("right_cot", "wrong_cot")}
    for row, rec in answered:
        right = [metrics.is_correct(formats.tree_cot_answer(cot, family), row["label"], kind) for cot in row["cots"]]
        cots += len(right)
        right_cots += sum(right)
        if right:
            first_right += right[0]
            vote_right += metrics.is_correct(vote([formats.tree_cot_answer(c, family) for c in row["cots"]], kind),
                                             row["label"], kind)
            selected = rec["steps"][0]["select_new_ys"][0]
            selected_right += right[row["cots"].index(selected)]
        for is_right, evaluations in zip(right, row["evaluations"], strict=True):
            for evaluation in evaluations:
                verdict = formats.evaluation_verdict(evaluation)[1]
                verdicts[verdict] += 1
                confusion["right_cot" if is_right else "wrong_cot"][verdict] += 1
    cut_cots, bad_cots = (sum(row[k] for row in rows) for k in ("cut_cots", "unparsable_cots"))
    cut_evals, bad_evals = (sum(row[k] for row in rows) for k in ("cut_evaluations", "unparsable_evaluations"))
    evaluations = sum(verdicts.values())
    decisive = sum(confusion[side][v] for side in confusion for v in ("correct", "wrong"))
    agree = confusion["right_cot"]["correct"] + confusion["wrong_cot"]["wrong"]
    tally = incomplete(rows, settings["n_generate_sample"], settings["n_evaluate_sample"])
    failed = tally.pop("failed")
    last = records[-1]["usage_so_far"] if records else {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
    return {
        **tally,
        "cots": cots,
        "truncated_cots": cut_cots,
        "unparsable_cots": bad_cots,
        "left_out_cot_share": _share(cut_cots + bad_cots, cots + cut_cots + bad_cots),
        "teacher_accuracy": {
            "all_cots": _share(right_cots, cots),
            "first_cot": _share(first_right, len(answered)),
            "majority_vote": _share(vote_right, len(answered)),
            "value_selected": _share(selected_right, len(answered)),
        },
        "evaluations": evaluations,
        "truncated_evaluations": cut_evals,
        "unparsable_evaluations": bad_evals,
        "left_out_evaluation_share": _share(cut_evals + bad_evals, evaluations + cut_evals + bad_evals),
        "verdicts": verdicts,
        "verdict_agreement": {
            "agreement": _share(agree, decisive),
            "correct_on_right_cots": _share(confusion["right_cot"]["correct"], sum(confusion["right_cot"].values())),
            "wrong_on_wrong_cots": _share(confusion["wrong_cot"]["wrong"], sum(confusion["wrong_cot"].values())),
            "confusion": confusion,
        },
        "usage": dict(last),
        "failed": failed,
        "settings": settings,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    """The card as Markdown."""
    family, splits = report["family"], report["splits"]
    names = list(splits)
    lines = [f"# Teacher data: {family}", "",
             f"Written by mindmirror-teacher into `{family}_tree1/` and `{family}_tree2/`. Only usable replies are "
             "written: those cut at max_tokens or without the answer or verdict the parsers need were drawn again "
             "(up to --max_redraws) and are counted here as left out. Accuracy compares the teacher's answers with "
             "the ground truth (a question without a usable CoT counts as wrong). Agreement is the share of "
             "`correct`/`wrong` verdicts that match the judged CoT's correctness.", ""]
    table = []

    def row(label, fn):
        table.append([label, *(fn(splits[s]) for s in names)])

    row("questions (failed, fewer CoTs than asked)",
        lambda s: f"{s['questions']} ({s['failed_questions']}, {s['short_questions']})")
    row("CoTs written (left out: cut at max_tokens, no answer)",
        lambda s: f"{s['cots']} ({s['truncated_cots']}, {s['unparsable_cots']})")
    for name, label in (("all_cots", "accuracy: every CoT"), ("first_cot", "accuracy: first CoT"),
                        ("majority_vote", "accuracy: majority vote"),
                        ("value_selected", "accuracy: CoT selected by its self-evaluations")):
        row(label, lambda s, name=name: _pct(s["teacher_accuracy"][name]))
    row("self-evaluations written (left out: cut at max_tokens, no verdict)",
        lambda s: f"{s['evaluations']} ({s['truncated_evaluations']}, {s['unparsable_evaluations']})")
    for verdict in formats.VERDICTS:
        row(f"verdict {verdict}",
            lambda s, v=verdict: f"{s['verdicts'][v]} ({_pct(_share(s['verdicts'][v], s['evaluations']))})")
    row("verdict agreement with correctness", lambda s: _pct(s["verdict_agreement"]["agreement"]))
    row("'correct' on right CoTs", lambda s: _pct(s["verdict_agreement"]["correct_on_right_cots"]))
    row("'wrong' on wrong CoTs", lambda s: _pct(s["verdict_agreement"]["wrong_on_wrong_cots"]))
    row("prompt / completion tokens",
        lambda s: f"{s['usage']['prompt_tokens']:,} / {s['usage']['completion_tokens']:,}")
    row("cost", lambda s: f"${s['usage']['cost']:.4f}")
    lines.append(markdown_table(["", *names], table))
    settings = [splits[s]["settings"] for s in names]
    groups = [("all splits", settings[0])] if all(s == settings[0] for s in settings) else \
        [(name, s) for name, s in zip(names, settings, strict=True)]
    for title, values in groups:
        lines += ["", f"## Settings ({title})", "", markdown_table(["setting", "value"], values.items())]
    for name in names:
        failed = splits[name]["failed"]
        if failed:
            shown = failed[:MAX_LISTED_FAILURES]
            lines += ["", f"## Incomplete questions of {name} ({len(failed)}; "
                          f"{'all' if len(shown) == len(failed) else f'the first {len(shown)}'}, all in "
                          "teacher_report.json)", ""]
            lines += [f"- {f['idx']}: {f['reason']}" for f in shown]
    return "\n".join(lines) + "\n"
