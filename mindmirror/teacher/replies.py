"""What makes a teacher reply usable, and the text form it is written in.

A reply is stored as the server sent it; what is written is its usable form, computed again on
every run (so a change here never costs a request):

- a reply the server cut at the token limit (``finish_reason: "length"``) is never usable;
- the text is cut where the model starts a new few-shot example (the prompt's question header on
  a new line, such as ``"\\nProblem:"``, which the request also sends as a ``stop`` sequence) and
  stripped;
- a CoT is usable when the trainer's parsers find its rationale and answer
  (``formats.tree_cot_rationale`` and ``formats.tree_cot_answer``); a leading ``Answer:`` the model
  repeated from the prompt is dropped;
- a self-evaluation is usable when it has a verdict (``formats.evaluation_verdict``) and is
  written as the seed's are: ``"Evaluation:\\n\\n<its text>\\n\\nEvaluation result: the given answer
  is <verdict>."``, whether or not the model repeated the ``Evaluation:`` header the value prompt
  ends with (or more of the prompt before it), and without what it wrote after its verdict line.
"""

from __future__ import annotations

import re

from mindmirror.data import formats

CUT = "length"  # the finish_reason of a reply cut at max_tokens
_EVALUATION_HEADER = re.compile(r"^\s*evaluation\s*:(?!\s*result)\s*", re.IGNORECASE)
_ANSWER_HEADER = re.compile(r"^\s*answer\s*:\s*", re.IGNORECASE)
_RESULT_LINE = re.compile(r"^\W*evaluation result\s*:", re.IGNORECASE)
_QUESTION_FIELDS = ("{question}", "{premise}")


def few_shot_markers(template: str) -> list[str]:
    """Where a new few-shot example starts: ``"\\n" + the header of the template's question line``.

    ``"Problem: {question}"`` gives ``"\\nProblem:"``, ANLI's ``"Premise: {premise}"`` gives
    ``"\\nPremise:"``; a template whose question line has no header gives none.
    """
    markers = []
    for line in template.splitlines():
        at = min((line.find(f) for f in _QUESTION_FIELDS if f in line), default=-1)
        header = line[:at].strip() if at > 0 else ""
        if header.endswith(":") and "\n" + header not in markers:
            markers.append("\n" + header)
    return markers


def cut_at(text: str, markers: list[str]) -> str:
    """``text`` up to the first of ``markers`` (a new few-shot example), stripped."""
    ends = [at for at in (text.find(m) for m in markers if m) if at >= 0]
    return (text[:min(ends)] if ends else text).strip()


def usable_cot(text: str, finish_reason: str | None, family: str, markers: list[str]) -> str | None:
    """The CoT as written, or ``None`` when it is cut or the parsers find no answer in it."""
    if finish_reason == CUT:
        return None
    cot = _ANSWER_HEADER.sub("", cut_at(text, markers), count=1).strip()
    if formats.tree_cot_rationale(cot, family) is None or formats.tree_cot_answer(cot, family) is None:
        return None
    return cot


def usable_evaluation(text: str, finish_reason: str | None, markers: list[str]) -> str | None:
    """The self-evaluation in the seed's form, or ``None`` when it is cut or has no verdict."""
    if finish_reason == CUT:
        return None
    lines = cut_at(text, markers).split("\n")
    at = next((i for i in reversed(range(len(lines))) if formats.evaluation_verdict(lines[i])), None)
    if at is None:
        return None
    verdict = formats.evaluation_verdict(lines[at])[1]
    body = lines[:at] if _RESULT_LINE.match(lines[at]) else lines[:at + 1]  # a verdict in a sentence stays
    for i in reversed(range(len(body))):  # the header the model repeated, and anything before it
        if _EVALUATION_HEADER.match(body[i]):
            body = [_EVALUATION_HEADER.sub("", body[i], count=1)] + body[i + 1:]
            break
    rationale = "\n".join(body).strip()
    return "Evaluation:\n\n" + (f"{rationale}\n\n" if rationale else "") + \
        f"Evaluation result: the given answer is {verdict}."
