"""Generation over an evaluation split (greedy, sharded over ranks; or sampled), scoring, and the
test-time self-evaluation of :mod:`mindmirror.evaluation.selfeval` over a whole split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from accelerate.utils import gather_object

from mindmirror.data.registry import DATASETS, SELF_EVAL
from mindmirror.evaluation import metrics, selfeval
from mindmirror.model import eval_mode, pad


class EvaluationStopped(Exception):
    """``between_batches`` asked to stop: the evaluation ends between two batches, unfinished."""

    def __init__(self, done: int, batches: int):
        super().__init__(f"stopped after batch {done} of {batches}")
        self.done, self.batches = done, batches


def shard(n: int, world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of row indices; every rank gets the same number of batches (ZeRO-3
    ``generate`` must be called in lockstep), so short ranks repeat row indices marked negative."""
    per_rank = math.ceil(n / world)
    mine = list(range(rank, n, world))
    mine += [-(1 + (i % max(n, 1))) for i in range(per_rank - len(mine))]  # filler, dropped after generation
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids on ``device`` and their attention mask."""
    ids = pad(seqs, pad_id).to(device)
    return ids, (ids != pad_id).long()


def metric_kind(dataset: str, model_type: str) -> str:
    """How answers are scored: verdicts as text, other answers by the data set's metric."""
    return "text" if model_type == SELF_EVAL else DATASETS[dataset].metric


def generate(t5, tokenizer, rows, column: str, *, world: int, rank: int, device, batch_size: int,
             max_new_tokens: int, synced_gpus: bool = False, between_batches=None) -> list[str]:
    """Greedy outputs for ``rows[i][column]`` (token ids), in row order, on every rank.

    ``between_batches()`` is called before each batch, on every rank alike (every rank has as many
    batches); when it returns True, :class:`EvaluationStopped` is raised. Under several processes it must
    give every rank the same answer (the trainer's sums a stop flag over the ranks)."""
    mine = []
    batches = shard(len(rows), world, rank, batch_size)
    with eval_mode(t5):
        for done, batch in enumerate(batches):
            if between_batches is not None and between_batches():
                raise EvaluationStopped(done, len(batches))
            ids, mask = padded([rows[abs(i) - 1 if i < 0 else i][column] for i in batch], tokenizer.pad_token_id,
                               device)
            out = t5.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              num_beams=1, synced_gpus=synced_gpus)
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            mine += [(i, t.strip()) for i, t in zip(batch, texts, strict=True) if i >= 0]
    everything = gather_object(mine) if world > 1 else mine
    return [text for _, text in sorted(everything)]


def sample(t5, tokenizer, seqs: list[list[int]], k: int, *, device, batch_size: int, max_new_tokens: int,
           temperature: float = 1.0) -> list[list[str]]:
    """``k`` sampled outputs (pure sampling at ``temperature``, no top-k/top-p cut) for every input."""
    out = []
    with eval_mode(t5):
        for start in range(0, len(seqs), batch_size):
            ids, mask = padded(seqs[start:start + batch_size], tokenizer.pad_token_id, device)
            generated = t5.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                    num_return_sequences=k)
            texts = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
            out += [texts[j:j + k] for j in range(0, len(texts), k)]
    return out


def score(predictions: list[str], golds: list[str], kind: str) -> tuple[float, list[bool]]:
    """Accuracy and per-row correctness: safe arithmetic value match or exact text match."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    correct = [metrics.is_correct(p, g, kind) for p, g in zip(predictions, golds, strict=True)]
    return (sum(correct) / len(correct) if correct else 0.0), correct


def write_records(path: Path, records: list[dict]) -> None:
    """One JSON line per evaluated row (``predictions.jsonl`` and its kin)."""
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def evaluate_split(t5, tokenizer, table, *, family: str, kind: str, model_type: str, device,
                   batch_size: int = 64, gen_max_len: int = 64, rationale_max_len: int = 256, samples: int = 0,
                   temperature: float = 1.0, seed: int = 0, max_input_length: int = 1024,
                   rationales: bool = True, world: int = 1, rank: int = 0,
                   synced_gpus: bool = False, between_batches=None) -> tuple[dict, list[dict]]:
    """Greedy answers (and, with ``rationales``, rationales) for a split's tokenized table (its ``input`` and
    ``label`` columns give the records' text and the gold answers), the rows shared out over ``world``
    ranks (``synced_gpus`` under ZeRO-3: every rank generates in lockstep) and gathered on every rank;
    with ``samples`` > 0 (one process) also the majority vote over that many sampled answers and, where the
    model has the rationale task, the vote weighted by the student's own verdicts
    (:mod:`mindmirror.evaluation.selfeval`). Returns the accuracies and one record per row, on every rank.
    ``between_batches``: see :func:`generate` (greedy generation only).
    """
    if samples > 0 and world > 1:
        raise ValueError("sampled votes run in one process (mindmirror-eval); greedy evaluation shards over ranks")
    sharded = {"world": world, "rank": rank, "device": device, "batch_size": batch_size, "synced_gpus": synced_gpus,
               "between_batches": between_batches}
    has_rationale = "expl_input_ids" in table.column_names
    golds, inputs = list(table["label"]), list(table["input"])
    greedy = generate(t5, tokenizer, table, "input_ids", max_new_tokens=gen_max_len, **sharded)
    rationales = generate(t5, tokenizer, table, "expl_input_ids", max_new_tokens=rationale_max_len, **sharded) \
        if has_rationale and rationales else [None] * len(golds)
    accuracy, correct = score(greedy, golds, kind)
    records = [{"input": x, "prediction": p, "rationale": e, "gold": g, "correct": ok}
               for x, g, p, e, ok in zip(inputs, golds, greedy, rationales, correct, strict=True)]
    result = {"rows": len(golds), "accuracy": accuracy}
    if samples > 0 and model_type != SELF_EVAL:  # votes pick answers, not verdicts
        torch.manual_seed(seed)
        sampling = {"device": device, "batch_size": max(1, batch_size // samples), "temperature": temperature}
        answers = sample(t5, tokenizer, list(table["input_ids"]), samples, max_new_tokens=gen_max_len, **sampling)
        majority = [selfeval.vote(a, kind) for a in answers]
        result["majority_vote_accuracy"], majority_ok = score(majority, golds, kind)
        for record, a, m, ok in zip(records, answers, majority, majority_ok, strict=True):
            record.update(samples=[{"answer": x} for x in a], majority_vote=m, majority_vote_correct=ok)
        if has_rationale:
            sampled = sample(t5, tokenizer, list(table["expl_input_ids"]), samples, max_new_tokens=rationale_max_len,
                             **sampling)
            cots = [selfeval.compose_cot(e, a, family) for es, as_ in zip(sampled, answers, strict=True)
                    for e, a in zip(es, as_, strict=True)]
            p = selfeval.verdict_probabilities(t5, tokenizer, cots, device=device, batch_size=batch_size,
                                               max_input_length=max_input_length)
            weights = [p[i:i + samples] for i in range(0, len(p), samples)]
            chosen = [selfeval.vote(a, kind, w) for a, w in zip(answers, weights, strict=True)]
            result["self_eval_vote_accuracy"], chosen_ok = score(chosen, golds, kind)
            for record, es, ws, c, ok in zip(records, sampled, weights, chosen, chosen_ok, strict=True):
                for s, e, w in zip(record["samples"], es, ws, strict=True):
                    s.update(rationale=e, p_correct=w)
                record.update(self_eval_vote=c, self_eval_vote_correct=ok)
    return result, records
