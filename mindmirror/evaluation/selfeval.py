"""Test-time self-evaluation: the student judges its own chains of thought and answers by vote.

The original code trains the self-evaluation task but never uses it when answering. Here the
student samples ``k`` rationales (``explain: <question>``) and ``k`` answers (``predict:
<question>``); sample ``j`` pairs rationale ``j`` with answer ``j`` into a CoT written as the teacher
writes one (``<rationale> The answer is (<answer>).``). Fed in the self-evaluation format
(``predict: <CoT>``, the input of ``task_prefix_tree2`` rows), the student's own verdict scores the
CoT: its weight is the probability of ``correct`` among the three verdicts (each verdict's sequence
probability, renormalised over ``correct``, ``wrong`` and ``uncertain``). The answer is then chosen
three ways: greedy decoding, a majority vote over the ``k`` sampled answers, and a vote weighted by
the verdicts. Answers vote as equals when they mean the same: equations by their value, other
answers by their text (case and spacing ignored).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mindmirror.data.formats import VERDICTS
from mindmirror.data.tokenize import PREDICT
from mindmirror.evaluation import metrics

CORRECT = "correct"


def teacher_equation(answer: str) -> str:
    """An equation as the teacher writes one, ``((87 - 73) * 7)``, from a label such as
    ``( ( 87.0 - 73.0 ) * 7.0 )``: whole numbers without ``.0``, no spaces inside brackets, one outer
    pair of brackets. (The teacher's answer sentence ends at its first period, so ``.0`` must go.)"""
    text = re.sub(r"(\d+)\.0+(?!\d)", r"\1", " ".join(answer.split()))
    text = text.replace("( ", "(").replace(" )", ")")
    return text if _wrapped(text) else f"({text})"


def _wrapped(text: str) -> bool:
    """True when one pair of brackets encloses all of ``text`` (``(1 + 2)``, not ``(1) + (2)``)."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and i < len(text) - 1:
            return False
    return text.startswith("(") and depth == 0


def answer_sentence(answer: str, family: str) -> str:
    """The teacher's closing sentence for ``answer``, so the parsers of ``formats`` read it back."""
    answer = answer.strip()
    if family == "svamp":
        return f"The answer is {teacher_equation(answer)}."
    if family == "cqa":
        return f'So the answer is "{answer}".'
    return f"So the answer is {answer}."


def compose_cot(rationale: str, answer: str, family: str) -> str:
    """A CoT in the teacher's format from a generated rationale and a generated answer."""
    return f"{rationale.strip()} {answer_sentence(answer, family)}".strip()


def answer_key(answer: str, kind: str) -> tuple:
    """What makes two answers the same vote: an equation's value (6 significant digits) where it
    computes, otherwise the text without case or spacing differences."""
    if kind == "equation":
        try:
            return ("value", float(f"{metrics.safe_eval(metrics.extract_equation(answer)):.6g}"))
        except metrics.InvalidExpression:
            pass
    return ("text", metrics.normalize_text(answer))


def vote(answers: Sequence[str], kind: str, weights: Sequence[float] | None = None) -> str | None:
    """The answer whose group of equal answers has the largest total weight (1 each without weights).

    Ties go to the group sampled first; the group's first answer speaks for it. ``None`` without answers.
    """
    if weights is None:
        weights = [1.0] * len(answers)
    if len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    totals: dict[tuple, float] = {}
    first: dict[tuple, str] = {}
    for answer, weight in zip(answers, weights, strict=True):
        key = answer_key(answer, kind)
        totals[key] = totals.get(key, 0.0) + float(weight)
        first.setdefault(key, answer)
    if not totals:
        return None
    return first[max(totals, key=totals.__getitem__)]  # max keeps the first of equal totals


def verdict_probabilities(t5, tokenizer, cots: Sequence[str], *, device, batch_size: int = 32,
                          max_input_length: int = 1024, prefix: str = PREDICT):
    """For each CoT, the probability of ``correct`` among the three verdicts, as the student judges it.

    Each verdict's probability is the product of its target tokens' probabilities (end-of-sequence
    token included) given ``prefix + cot``; the three are renormalised to sum to one.
    """
    import torch

    from mindmirror.model import IGNORE, eval_mode, pad

    labels_one = pad([tokenizer(v)["input_ids"] for v in VERDICTS], IGNORE)
    out = []
    with eval_mode(t5):
        for start in range(0, len(cots), batch_size):
            batch = [prefix + c for c in cots[start:start + batch_size]]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_input_length,
                            return_tensors="pt").to(device)
            encoded = t5.get_encoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            n = len(batch)
            # Every CoT against every verdict in one decoder pass: rows are (cot, verdict) pairs.
            hidden = encoded.last_hidden_state.repeat_interleave(len(VERDICTS), dim=0)
            mask = enc.attention_mask.repeat_interleave(len(VERDICTS), dim=0)
            labels = labels_one.repeat(n, 1).to(device)
            logits = t5(encoder_outputs=(hidden,), attention_mask=mask, labels=labels).logits.float()
            logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            seq = (logp * (labels != IGNORE)).sum(-1).view(n, len(VERDICTS))
            out += torch.softmax(seq, -1)[:, VERDICTS.index(CORRECT)].tolist()
    return out
