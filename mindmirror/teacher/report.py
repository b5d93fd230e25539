"""The data card of generated teacher data: ``teacher_report.json`` and ``teacher_report.md``.

Per split it says how good the teacher was (accuracy of its CoTs against the ground truth: every
CoT, the first one, the majority vote and the CoT the self-evaluations selected), how much of its
text the trainer cannot parse, how its verdicts are distributed, and how well the verdicts agree
with the CoTs' correctness: self-evaluation distillation teaches the student those verdicts, so
a teacher whose verdicts do not track correctness has nothing to teach. A CoT without a parsable
answer counts as wrong throughout.
"""

from __future__ import annotations

from mindmirror import metrics
from mindmirror.data import formats
from mindmirror.selfeval import vote

MAX_LISTED_FAILURES = 10


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _correct(answer: str | None, gold: str, family: str) -> bool:
    if answer is None:
        return False
    if family == "svamp":
        return metrics.equation_value_equal(answer, gold)
    return metrics.exact_match(answer, gold)


def split_report(rows: list[dict], records: list[dict], family: str, settings: dict) -> dict:
    """The card of one split from its rows (see ``layout``) and the teacher records written from them."""
    kind = "equation" if family == "svamp" else "text"
    answered = [(row, rec) for row, rec in zip(rows, records) if not row["error"]]
    cots = unparsable = truncated_cots = truncated_evals = 0
    right_cots = first_right = vote_right = selected_right = 0
    verdicts = {v: 0 for v in (*formats.VERDICTS, "none")}
    confusion = {side: {v: 0 for v in (*formats.VERDICTS, "none")} for side in ("right_cot", "wrong_cot")}
    for row, rec in answered:
        answers = [formats.tree_cot_answer(cot, family) if formats.tree_cot_rationale(cot, family) is not None
                   else None for cot in row["cots"]]
        right = [_correct(a, row["label"], family) for a in answers]
        cots += len(answers)
        unparsable += answers.count(None)
        right_cots += sum(right)
        truncated_cots += row["truncated_cots"]
        truncated_evals += row["truncated_evaluations"]
        if right:
            first_right += right[0]
            vote_right += _correct(vote([a for a in answers if a is not None], kind), row["label"], family)
            selected = rec["steps"][0]["select_new_ys"][0]
            selected_right += right[row["cots"].index(selected)]
        for is_right, evaluations in zip(right, row["evaluations"]):
            for evaluation in evaluations:
                parsed = formats.evaluation_verdict(evaluation)
                verdict = parsed[1] if parsed else "none"
                verdicts[verdict] += 1
                confusion["right_cot" if is_right else "wrong_cot"][verdict] += 1
    evaluations = sum(verdicts.values())
    decisive = sum(confusion[side][v] for side in confusion for v in ("correct", "wrong"))
    agree = confusion["right_cot"]["correct"] + confusion["wrong_cot"]["wrong"]
    failures = [{"idx": row["idx"], "reason": row["error"]} for row in rows if row["error"]]
    last = records[-1]["usage_so_far"] if records else {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
    return {
        "questions": len(rows),
        "failed_questions": len(failures),
        "failures": failures[:MAX_LISTED_FAILURES],
        "cots": cots,
        "unparsable_cots": unparsable,
        "unparsable_cot_share": _share(unparsable, cots),
        "truncated_cots": truncated_cots,
        "teacher_accuracy": {
            "all_cots": _share(right_cots, cots),
            "first_cot": _share(first_right, len(answered)),
            "majority_vote": _share(vote_right, len(answered)),
            "value_selected": _share(selected_right, len(answered)),
        },
        "evaluations": evaluations,
        "verdicts": verdicts,
        "unparsable_evaluation_share": _share(verdicts["none"], evaluations),
        "truncated_evaluations": truncated_evals,
        "verdict_agreement": {
            "agreement": _share(agree, decisive),
            "correct_on_right_cots": _share(confusion["right_cot"]["correct"], sum(confusion["right_cot"].values())),
            "wrong_on_wrong_cots": _share(confusion["wrong_cot"]["wrong"], sum(confusion["wrong_cot"].values())),
            "confusion": confusion,
        },
        "usage": dict(last),
        "settings": settings,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    """The card as Markdown."""
    family, splits = report["family"], report["splits"]
    names = list(splits)
    lines = [f"# Teacher data: {family}", "",
             f"Written by mindmirror-teacher into `{family}_tree1/` and `{family}_tree2/`. Accuracy compares the "
             "teacher's parsed answers with the ground truth; a CoT without a parsable answer counts as wrong. "
             "Agreement is the share of `correct`/`wrong` verdicts that match the judged CoT's correctness.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(splits[s]) for s in names) + " |")

    row("questions (failed)", lambda s: f"{s['questions']} ({s['failed_questions']})")
    row("CoTs (unparsable, cut at max_tokens)",
        lambda s: f"{s['cots']} ({s['unparsable_cots']}, {s['truncated_cots']})")
    for name, label in (("all_cots", "accuracy: every CoT"), ("first_cot", "accuracy: first CoT"),
                        ("majority_vote", "accuracy: majority vote"),
                        ("value_selected", "accuracy: CoT selected by its self-evaluations")):
        row(label, lambda s, name=name: _pct(s["teacher_accuracy"][name]))
    row("self-evaluations (cut at max_tokens)", lambda s: f"{s['evaluations']} ({s['truncated_evaluations']})")
    for verdict in (*formats.VERDICTS, "none"):
        row(f"verdict {verdict}",
            lambda s, v=verdict: f"{s['verdicts'][v]} ({_pct(_share(s['verdicts'][v], s['evaluations']))})")
    row("verdict agreement with correctness", lambda s: _pct(s["verdict_agreement"]["agreement"]))
    row("'correct' on right CoTs", lambda s: _pct(s["verdict_agreement"]["correct_on_right_cots"]))
    row("'wrong' on wrong CoTs", lambda s: _pct(s["verdict_agreement"]["wrong_on_wrong_cots"]))
    row("prompt / completion tokens",
        lambda s: f"{s['usage']['prompt_tokens']:,} / {s['usage']['completion_tokens']:,}")
    row("cost", lambda s: f"${s['usage']['cost']:.4f}")
    settings = [splits[s]["settings"] for s in names]
    groups = [("all splits", settings[0])] if all(s == settings[0] for s in settings) else \
        [(name, s) for name, s in zip(names, settings)]
    for title, values in groups:
        lines += ["", f"## Settings ({title})", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in values.items()]
    for name in names:
        failures = splits[name]["failures"]
        if failures:
            lines += ["", f"## Failed questions of {name} ({splits[name]['failed_questions']}; the first "
                          f"{len(failures)})", ""]
            lines += [f"- {f['idx']}: {f['reason']}" for f in failures]
    return "\n".join(lines) + "\n"
