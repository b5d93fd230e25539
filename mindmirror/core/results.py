"""A run's evaluations: the validation accuracy of the model in training, which picks the ``best/`` export
(:func:`validate`), and the test of that export once training is over (:func:`evaluate_best_export`). Both
generate greedily with the rows shared out over the ranks (in lockstep under ZeRO-3) and can stop between two
batches (``between_batches``: see :func:`mindmirror.evaluation.evaluate.generate`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from mindmirror import runfiles
from mindmirror.core import runtime, weights
from mindmirror.core.build import Run, eval_batch_size
from mindmirror.data.registry import DATASETS
from mindmirror.evaluation import evaluate

EXAMPLES = 3  # test questions shown with the student's rationale at the end of a run


def split_evaluator(run: Run, t5, tokenizer, between_batches: Callable[[], bool] | None):
    """:func:`mindmirror.evaluation.evaluate.evaluate_split` with this run's settings for the model ``t5``, given a
    table."""
    cfg, accelerator = run.cfg, run.accelerator
    return functools.partial(evaluate.evaluate_split, t5, tokenizer, family=DATASETS[cfg.dataset].family,
                             kind=run.metric_kind, model_type=cfg.model_type, device=accelerator.device,
                             batch_size=eval_batch_size(cfg), gen_max_len=cfg.gen_max_len,
                             rationale_max_len=cfg.max_target_length, synced_gpus=runtime.is_zero3(accelerator),
                             between_batches=between_batches)


def validate(run: Run, between_batches: Callable[[], bool] | None = None) -> tuple[dict, list[dict]]:
    """The accuracy (and the records) of the model in training on the validation split, answers only."""
    with runtime.generation_autocast(run.accelerator), runtime.zero3_generation(run.objective, run.t5):
        return split_evaluator(run, run.t5, run.tokenizer, between_batches)(
            run.tables["valid"], rationales=False, world=run.world, rank=run.accelerator.process_index)


def evaluate_best_export(run: Run, between_batches: Callable[[], bool] | None = None) -> tuple[dict, list[dict]]:
    """The test line of the validation-selected export (``step``: the step it was taken at, ``split``, ``accuracy``,
    ``rows``), computed once; predictions to ``predictions.jsonl``. Also returns a few test records with the
    student's rationale, to show at the end.

    Under ZeRO-3 the export is loaded into the training model's partitioned module (training is over) and
    generation is synced across ranks, as in validation, so no rank ever holds a whole model. Otherwise
    every rank holds the whole model anyway, and a copy is loaded from the export next to it."""
    from transformers import AutoTokenizer

    cfg, accelerator, best = run.cfg, run.accelerator, run.out / runfiles.BEST
    tokenizer = AutoTokenizer.from_pretrained(best)  # every rank reads best/
    step = json.loads((best / runfiles.EXPORT_INFO).read_text())["step"]
    t5 = run.t5
    if runtime.is_zero3(accelerator):
        weights.load_partitioned(t5, best, run.is_main)
    else:
        t5 = weights.load_export(best).to(accelerator.device)
    table = run.tables["test"]
    split = split_evaluator(run, t5, tokenizer, between_batches)
    with runtime.generation_autocast(accelerator), runtime.zero3_generation(run.objective, t5):
        result, records = split(table, rationales=cfg.output_rationale, world=run.world,
                                rank=accelerator.process_index)
        # A few questions with the student's rationale, generated on every rank alike (ZeRO-3 generates in lockstep).
        examples = records[:EXAMPLES] if cfg.output_rationale else \
            split(table.select(range(min(EXAMPLES, len(table)))), rationales=True)[1]
    if run.is_main:
        evaluate.write_records(run.out / runfiles.PREDICTIONS, records)
    return {"step": step, "split": "test", "accuracy": result["accuracy"], "rows": result["rows"]}, examples
