"""Greedy generation over an evaluation split, sharded over ranks, scored on the main process."""

from __future__ import annotations

import math

import torch
from accelerate.utils import gather_object

from mindmirror import metrics


def shard(n: int, world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of row indices; every rank gets the same number of batches (ZeRO-3
    ``generate`` must be called in lockstep), so short ranks repeat row indices marked negative."""
    per_rank = math.ceil(n / world)
    mine = list(range(rank, n, world))
    mine += [-(1 + (i % max(n, 1))) for i in range(per_rank - len(mine))]  # filler, dropped after generation
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


@torch.no_grad()
def generate(t5, tokenizer, rows, column: str, *, world: int, rank: int, device, batch_size: int,
             max_new_tokens: int, synced_gpus: bool = False) -> list[str]:
    """Greedy outputs for ``rows[i][column]`` (token ids), in row order, on every rank."""
    was_training = t5.training
    t5.eval()
    mine = []
    for batch in shard(len(rows), world, rank, batch_size):
        seqs = [rows[abs(i) - 1 if i < 0 else i][column] for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
        ids = ids.to(device)
        out = t5.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, synced_gpus=synced_gpus)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        mine += [(i, t.strip()) for i, t in zip(batch, texts) if i >= 0]
    t5.train(was_training)
    everything = gather_object(mine) if world > 1 else mine
    return [text for _, text in sorted(everything)]


def score(predictions: list[str], golds: list[str], kind: str) -> tuple[float, list[bool]]:
    """Accuracy and per-row correctness: safe arithmetic value match or exact text match."""
    match = metrics.equation_value_equal if kind == "equation" else metrics.exact_match
    correct = [bool(match(p, g)) for p, g in zip(predictions, golds)]
    return (sum(correct) / len(correct) if correct else 0.0), correct
