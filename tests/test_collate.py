"""The collator and the step plan: decoder inputs, token counts and masks of a micro-batch, the same rows
however a step is dealt to ranks and accumulation steps, and length grouping."""

import numpy as np

from mindmirror.core.collate import Collator, rank_micro_batches, step_batches
from mindmirror.model import IGNORE


def test_decoder_inputs_are_labels_shifted_right_from_pad():
    batch = Collator(0, False)([{"input_ids": [5, 6, 1], "labels": [7, 8, 1]}, {"input_ids": [5, 1], "labels": [9, 1]}])
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 8], [0, 9, 1]]
    assert batch["token_counts"].tolist() == [5, 0]
    assert batch["labels"].tolist() == [[7, 8, 1], [9, 1, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_step_batches_are_the_same_rows_however_a_step_is_dealt():
    lengths = list(range(100))
    steps = step_batches(lengths, 8, seed=1, epoch=0)
    assert len(steps) == 12 and all(len(s) == 8 for s in steps)
    assert len({i for s in steps for i in s}) == 96  # no row twice; the partial last step is dropped
    assert steps == step_batches(lengths, 8, seed=1, epoch=0)
    assert steps != step_batches(lengths, 8, seed=1, epoch=1)
    step = steps[0]
    one = rank_micro_batches(step, 8, 1, 1, 0)
    accum = rank_micro_batches(step, 4, 2, 1, 0)
    ranks = [rank_micro_batches(step, 4, 1, 2, r) for r in (0, 1)]
    assert sorted(sum(one, [])) == sorted(sum(accum, [])) == sorted(sum(sum(ranks, []), [])) == sorted(step)


def test_length_grouping_reduces_padding():
    lengths = np.random.RandomState(0).randint(5, 200, size=4000).tolist()

    def padding(steps):
        return sum(max(lengths[i] for i in s) * len(s) - sum(lengths[i] for i in s) for s in steps)

    grouped = padding(step_batches(lengths, 32, 0, 0, group_by_length=True))
    plain = padding(step_batches(lengths, 32, 0, 0, group_by_length=False))
    assert grouped < 0.2 * plain
