"""The multi-task distillation objective as a module, so DDP/DeepSpeed wrap the whole computation.

``loss = alpha * label_loss + (1 - alpha) * rationale_loss``, where each task's loss is the mean
cross-entropy over that task's target tokens in the whole optimizer step (all micro-batches, all
ranks). The module returns per-task *sums*; the loop divides by the step's global token counts,
so the result does not depend on how a step is split over accumulation steps or processes.

The output projection (``lm_head``) runs only on real target positions: a 32k-entry vocabulary
projection of padding would be pure waste.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mindmirror.model import IGNORE
from mindmirror.speedups import ATTENTION, token_cross_entropy


def find_target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major) of the real target tokens of a padded label tensor."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)


def prepared_mask(attention_mask: torch.Tensor, config) -> torch.Tensor:
    """The 4-D form of a padding mask (rows x 1 x 1 x keys; True: attend) for SDPA attention, which transformers'
    T5 takes as it is. From a 2-D mask it first reads whether any position is padded (``padding_mask.all()`` in
    ``masking_utils``), to leave the mask out when none is: a device-to-host read in every encoder and every
    cross-attention. T5 adds its position bias to the mask either way (``torch.where(mask, bias, min)``), so the
    attention computes the same. Other attention implementations get the 2-D mask."""
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return attention_mask
    return attention_mask[:, None, None, :].bool()


class DistillationObjective(nn.Module):
    """Wraps a ``T5ForConditionalGeneration``; ``forward`` returns the token-loss sums of both tasks.

    The answer task's tensors are ``input_ids``, ``attention_mask``, ``decoder_input_ids`` and
    ``labels``; the rationale task's the same names with an ``expl_`` prefix (absent for the
    ``standard`` model). Both tasks run inside one ``forward`` so DDP and DeepSpeed see one forward
    and one backward per micro-batch: one encoder pass over both tasks' questions (their widths differ by a
    token or two, so stacking them costs almost no padding and halves the encoder's calls), one decoder pass
    per task (a rationale is ~3x an answer, so stacking the decoders would pad the answers to it), one call of
    the embedding for every token id and one of the output projection for every target. A stacked batch
    (:class:`mindmirror.core.collate.Collator`'s ``stacked``: both tasks' rows in the first four tensors, no ``expl_``
    tensors but ``expl_target_positions``) runs in one pass of the model: every module is called once per
    forward, which ZeRO-3 needs to release what it gathered as the backward goes.
    """

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5

    def embed(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """T5's shared embedding of each id tensor, in one call: the table's gradient is then one buffer filled
        once, not one per call added up (for t5-v1_1-small a 32,128 x 512 table: 66 MB zeroed and added per call)."""
        flat = self.t5.get_input_embeddings()(torch.cat([i.reshape(-1) for i in ids]) if len(ids) > 1 else ids[0])
        return [part.view(*i.shape, -1) for part, i in zip(flat.split([i.numel() for i in ids]), ids, strict=True)]

    def token_loss_sums(self, input_ids, attention_mask, decoders) -> list[torch.Tensor]:
        """The summed cross-entropy of each group of targets, from one encoder pass over ``input_ids`` and one
        decoder pass per entry of ``decoders``: ``(decoder_input_ids, labels, groups)``, each decoder attending
        to as many encoder rows as it has rows, in order, and ``groups`` the flat indices of its real targets, one
        tensor per group. The output projection runs once, on every group's targets."""
        t5 = self.t5
        embedded = self.embed([input_ids] + [decoder[0] for decoder in decoders])
        attention_mask = prepared_mask(attention_mask, t5.config)
        encoded = t5.encoder(inputs_embeds=embedded[0], attention_mask=attention_mask)[0]
        rows = [decoder[0].shape[0] for decoder in decoders]  # split, not sliced: a slice's backward zero-fills
        encoded, attention_mask = (encoded,), (attention_mask,)  # the whole of its input for each slice
        if len(rows) > 1:
            encoded, attention_mask = encoded[0].split(rows), attention_mask[0].split(rows)
        hidden, targets = [], []
        for (_, labels, groups), inputs_embeds, states, mask in zip(decoders, embedded[1:], encoded, attention_mask,
                                                                      strict=True):
            out = t5.decoder(inputs_embeds=inputs_embeds, encoder_hidden_states=states, encoder_attention_mask=mask)[0]
            for positions in groups:
                hidden.append(out.reshape(-1, out.shape[-1]).index_select(0, positions))
                targets.append(labels.reshape(-1).index_select(0, positions))
        hidden = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
        # Original T5 scales the decoder output before its tied projection; t5-v1_1 does not.
        if getattr(t5.config, "scale_decoder_outputs", t5.config.tie_word_embeddings):
            hidden = hidden * (t5.config.d_model ** -0.5)
        logits = t5.lm_head(hidden).float()
        # one cross-entropy, its per-token losses summed by group (the groups' sizes are tensor shapes, known
        # without a device read): slicing the logits instead would zero-fill a gradient of their size per group
        losses = token_cross_entropy(logits, targets[0] if len(targets) == 1 else torch.cat(targets))
        return [part.sum() for part in losses.split([t.shape[0] for t in targets])]

    def token_loss_sum(self, input_ids, attention_mask, decoder_input_ids, labels, target_positions=None):
        """The summed cross-entropy of one task's target tokens. ``target_positions`` (the flat indices of the
        real targets, from the collator) select them without a host sync; without them they are found here."""
        if target_positions is None:
            target_positions = find_target_positions(labels)
        return self.token_loss_sums(input_ids, attention_mask, [(decoder_input_ids, labels, [target_positions])])[0]

    def forward(self, input_ids, attention_mask, decoder_input_ids, labels, expl_input_ids=None,
                expl_attention_mask=None, expl_decoder_input_ids=None, expl_labels=None, target_positions=None,
                expl_target_positions=None):
        if target_positions is None:
            target_positions = find_target_positions(labels)
        if expl_input_ids is None and expl_target_positions is not None:  # stacked: both tasks in one pass
            return torch.stack(self.token_loss_sums(input_ids, attention_mask, [
                (decoder_input_ids, labels, [target_positions, expl_target_positions])]))
        if expl_input_ids is None:
            label_sum = self.token_loss_sum(input_ids, attention_mask, decoder_input_ids, labels, target_positions)
            return torch.stack([label_sum, torch.zeros_like(label_sum)])
        if expl_target_positions is None:
            expl_target_positions = find_target_positions(expl_labels)
        width = max(input_ids.shape[1], expl_input_ids.shape[1])
        pad_id = self.t5.config.pad_token_id
        questions = torch.cat([F.pad(input_ids, (0, width - input_ids.shape[1]), value=pad_id),
                               F.pad(expl_input_ids, (0, width - expl_input_ids.shape[1]), value=pad_id)])
        masks = torch.cat([F.pad(attention_mask, (0, width - attention_mask.shape[1])),
                           F.pad(expl_attention_mask, (0, width - expl_attention_mask.shape[1]))])
        return torch.stack(self.token_loss_sums(questions, masks, [
            (decoder_input_ids, labels, [target_positions]),
            (expl_decoder_input_ids, expl_labels, [expl_target_positions])]))


def combine(loss_sums: torch.Tensor, token_counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * label_sum / n_label + (1 - alpha) * rationale_sum / n_rationale``.

    ``token_counts`` are the step's global counts; a task with no tokens contributes nothing.
    """
    weights = torch.tensor([alpha, 1.0 - alpha], dtype=loss_sums.dtype, device=loss_sums.device)
    counts = token_counts.to(loss_sums.device, loss_sums.dtype).clamp(min=1.0)
    return (weights * loss_sums / counts).sum()
