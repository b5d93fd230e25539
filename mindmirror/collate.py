"""Which rows go into which micro-batch, and how a micro-batch becomes tensors.

Batching choice: the answer rows (``predict:``) and rationale rows (``explain:``) of a
micro-batch are stacked into one tensor and run in one forward pass, with a per-row task id: one
pass of 2B rows issues half the kernel launches of two passes of B rows, and the padding this adds
to the short answers is cheap because the output projection and loss run only on real target
tokens (see objective.py). The speed benchmark (docs/benchmarks.md) is where this is measured. Rows are grouped by length inside large
shuffled windows, which cuts padding without giving up randomness between steps.

Step batches are built globally (the same rows for the same seed, epoch and global batch size),
then dealt to ranks and accumulation micro-steps, so 8 rows x 1 step, 4 rows x 2 accumulation
steps and 2 processes x 4 rows train on exactly the same rows.
"""

from __future__ import annotations

import numpy as np
import torch

from mindmirror.objective import IGNORE, LABEL_TASK, RATIONALE_TASK

LENGTH_WINDOW = 50  # global batches per length-sorting window


def step_batches(lengths: list[int], global_batch: int, seed: int, epoch: int,
                 group_by_length: bool = True) -> list[list[int]]:
    """The epoch's optimizer steps as lists of row indices (a trailing partial step is dropped)."""
    rng = np.random.RandomState([seed, epoch])
    order = rng.permutation(len(lengths))
    steps = len(order) // global_batch
    order = order[: steps * global_batch]
    if group_by_length:
        lengths = np.asarray(lengths)
        window = LENGTH_WINDOW * global_batch
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, len(order), window))]) \
            if len(order) else order
        batches = order.reshape(steps, global_batch)
        batches = batches[rng.permutation(steps)]
    else:
        batches = order.reshape(steps, global_batch)
    return [b.tolist() for b in batches]


def rank_micro_batches(step: list[int], micro_batch: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of one global step (rows dealt in contiguous chunks)."""
    assert len(step) == micro_batch * accum * world
    return [step[(g * world + rank) * micro_batch:(g * world + rank + 1) * micro_batch] for g in range(accum)]


def _pad(seqs: list[list[int]], value: int, multiple: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Collator:
    """Rows -> ``input_ids, attention_mask, decoder_input_ids, labels, task`` (+ token counts)."""

    def __init__(self, pad_id: int, with_rationale: bool, pad_to_multiple_of: int = 1):
        self.pad_id, self.with_rationale, self.multiple = pad_id, with_rationale, pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [r["input_ids"] for r in rows]
        targets = [r["labels"] for r in rows]
        tasks = [LABEL_TASK] * len(rows)
        if self.with_rationale:
            inputs += [r["expl_input_ids"] for r in rows]
            targets += [r["rationale_ids"] for r in rows]
            tasks += [RATIONALE_TASK] * len(rows)
        input_ids = _pad(inputs, self.pad_id, self.multiple)
        labels = _pad(targets, IGNORE, self.multiple)
        # Teacher forcing: the decoder sees the target shifted right, starting from the pad token.
        decoder_input_ids = torch.cat([torch.full((len(targets), 1), self.pad_id), labels[:, :-1]], dim=1)
        decoder_input_ids[decoder_input_ids == IGNORE] = self.pad_id
        task = torch.tensor(tasks, dtype=torch.long)
        counts = torch.stack([((labels != IGNORE) & (task[:, None] == t)).sum() for t in (LABEL_TASK, RATIONALE_TASK)])
        return {"input_ids": input_ids, "attention_mask": (input_ids != self.pad_id).long(),
                "decoder_input_ids": decoder_input_ids, "labels": labels, "task": task, "token_counts": counts}
