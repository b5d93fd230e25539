"""Which rows go into which micro-batch, and how a micro-batch becomes tensors.

Batching choice: each micro-batch holds its answer rows (``predict:``) and its rationale rows
(``explain:``) as two sets of tensors, each padded to its own lengths. The objective runs both tasks'
questions as one encoder pass (they differ by their prefix only) and each task's decoder as a pass of
its own: stacking the decoders into one tensor of 2B rows pads the short answers (~17 tokens) to the
rationale's length (~55); measured on 2 CPU cores with the tiny model, batch 64, one step took 0.58 s
stacked and 0.50 s as two passes. Under ZeRO-3 the collator stacks all four (``stacked``): there a
module called twice in one forward is never released by DeepSpeed after its backward (each call resets
its pending-gradient count), so every module called twice ends every backward gathered on every rank
(docs/benchmarks.md, "ZeRO-3 memory per rank"). Rows are grouped by length inside large shuffled windows, which cuts
padding without giving up randomness between steps.

Step batches are built globally (the same rows for the same seed, epoch and global batch size),
then dealt to ranks and accumulation micro-steps, so 8 rows x 1 step, 4 rows x 2 accumulation
steps and 2 processes x 4 rows train on exactly the same rows.
"""

from __future__ import annotations

import numpy as np
import torch

from mindmirror.core.objective import find_target_positions
from mindmirror.model import IGNORE, pad

LENGTH_WINDOW = 50  # global batches per length-sorting window


def grouping_lengths(lengths: dict[str, np.ndarray]) -> np.ndarray:
    """The length-grouping key of each row: all the tokens it puts through the model (both tasks' inputs
    and targets), from the per-column token lengths of :func:`mindmirror.data.loader.token_lengths`."""
    return np.sum(list(lengths.values()), axis=0)


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


class Collator:
    """Rows -> the answer task's ``input_ids, attention_mask, decoder_input_ids, labels, target_positions`` and,
    with rationales, the same for the explain task under ``expl_`` names, plus ``token_counts``. ``stacked``
    (with rationales): both tasks' rows in one set of tensors instead, answers first (2B rows, padded to the
    longer task), with ``target_positions`` and ``expl_target_positions`` the flat indices of each task's
    targets in it, for one pass of the model (what ZeRO-3 needs; see the module's docstring).

    ``target_positions`` are the flat indices of the real (not padding) target tokens, found here on the host
    so that the objective selects them with an index, not a boolean mask (which makes the device wait for
    the host); ``token_counts`` are their numbers. With ``pin_memory`` (on GPU) the tensors are in pinned
    host memory, so their copies to the device can overlap the work already queued."""

    def __init__(self, pad_id: int, with_rationale: bool, pad_to_multiple_of: int = 1, pin_memory: bool = False,
                 stacked: bool = False):
        self.pad_id, self.with_rationale, self.multiple = pad_id, with_rationale, pad_to_multiple_of
        self.pin_memory, self.stacked = pin_memory, stacked and with_rationale

    def task_tensors(self, inputs: list[list[int]], targets: list[list[int]], prefix: str = "") -> dict:
        input_ids = pad(inputs, self.pad_id, self.multiple)
        labels = pad(targets, IGNORE, self.multiple)
        # Teacher forcing: the decoder sees the target shifted right, starting from the pad token.
        decoder_input_ids = torch.cat([torch.full((len(targets), 1), self.pad_id), labels[:, :-1]], dim=1)
        decoder_input_ids[decoder_input_ids == IGNORE] = self.pad_id
        return {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": (input_ids != self.pad_id).long(),
                f"{prefix}decoder_input_ids": decoder_input_ids, f"{prefix}labels": labels,
                f"{prefix}target_positions": find_target_positions(labels)}

    def __call__(self, rows: list[dict] | dict[str, list]) -> dict[str, torch.Tensor]:
        """Tensors of a micro-batch given as rows, or as columns (what indexing a ``datasets`` table gives)."""
        cols = rows if isinstance(rows, dict) else {k: [r[k] for r in rows] for k in rows[0]}
        if self.stacked:
            batch = self.task_tensors(list(cols["input_ids"]) + list(cols["expl_input_ids"]),
                                      list(cols["labels"]) + list(cols["rationale_ids"]))
            positions = batch["target_positions"]  # in row order: the answers' come first
            answers = int(sum(len(t) for t in cols["labels"]))
            batch["target_positions"], batch["expl_target_positions"] = positions[:answers], positions[answers:]
        else:
            batch = self.task_tensors(cols["input_ids"], cols["labels"])
            if self.with_rationale:
                batch |= self.task_tensors(cols["expl_input_ids"], cols["rationale_ids"], "expl_")
        batch["token_counts"] = torch.tensor([len(batch["target_positions"]),
                                              len(batch["expl_target_positions"]) if self.with_rationale else 0])
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

