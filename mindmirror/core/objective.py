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


def find_target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major) of the real target tokens of a padded label tensor."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)


def prepared_mask(attention_mask: torch.Tensor, config) -> torch.Tensor:
    """The 4-D form of a padding mask (rows x 1 x 1 x keys; True: attend) for SDPA attention, which transformers'
    T5 takes as it is. From a 2-D mask it first reads whether any position is padded (``padding_mask.all()`` in
    ``masking_utils``), to leave the mask out when none is: a device-to-host read in every encoder and every
    cross-attention. T5 adds its position bias to the mask either way (``torch.where(mask, bias, min)``), so the
    attention computes the same. Other attention implementations get the 2-D mask."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return attention_mask
    return attention_mask[:, None, None, :].bool()


class DistillationObjective(nn.Module):
    """Wraps a ``T5ForConditionalGeneration``; ``forward`` returns the token-loss sums of both tasks.

    The answer task's tensors are ``input_ids``, ``attention_mask``, ``decoder_input_ids`` and
    ``labels``; the rationale task's the same names with an ``expl_`` prefix (absent for the
    ``standard`` model). Both passes run inside one ``forward`` so DDP and DeepSpeed see one forward
    and one backward per micro-batch. A stacked batch (:class:`mindmirror.core.collate.Collator`'s ``stacked``:
    both tasks' rows in the first four tensors, no ``expl_`` tensors but ``expl_target_positions``) runs in
    one pass of the model: every module is called once per forward, which ZeRO-3 needs to release what it
    gathered as the backward goes.
    """

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5

    def token_loss_sums(self, input_ids, attention_mask, decoder_input_ids, labels, groups):
        """The summed cross-entropy of the target tokens at each of ``groups`` (flat indices of real targets, one
        tensor per task), in one pass of the model (the output projection, too, runs once on all of them)."""
        t5 = self.t5
        attention_mask = prepared_mask(attention_mask, t5.config)
        encoded = t5.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        hidden = t5.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoded,
                            encoder_attention_mask=attention_mask)[0]
        positions = groups[0] if len(groups) == 1 else torch.cat(groups)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        # Original T5 scales the decoder output before its tied projection; t5-v1_1 does not.
        if getattr(t5.config, "scale_decoder_outputs", t5.config.tie_word_embeddings):
            hidden = hidden * (t5.config.d_model ** -0.5)
        logits = t5.lm_head(hidden).float()
        targets = labels.reshape(-1).index_select(0, positions)
        if len(groups) == 1:
            return [F.cross_entropy(logits, targets, reduction="sum")]
        sums, start = [], 0
        for group in groups:  # slices by the groups' sizes: tensor shapes, known without a device read
            end = start + group.shape[0]
            sums.append(F.cross_entropy(logits[start:end], targets[start:end], reduction="sum"))
            start = end
        return sums

    def token_loss_sum(self, input_ids, attention_mask, decoder_input_ids, labels, target_positions=None):
        """The summed cross-entropy of one task's target tokens. ``target_positions`` (the flat indices of the
        real targets, from the collator) select them without a host sync; without them they are found here."""
        if target_positions is None:
            target_positions = find_target_positions(labels)
        return self.token_loss_sums(input_ids, attention_mask, decoder_input_ids, labels, [target_positions])[0]

    def forward(self, input_ids, attention_mask, decoder_input_ids, labels, expl_input_ids=None,
                expl_attention_mask=None, expl_decoder_input_ids=None, expl_labels=None, target_positions=None,
                expl_target_positions=None):
        if expl_input_ids is None and expl_target_positions is not None:  # stacked: both tasks in one pass
            return torch.stack(self.token_loss_sums(input_ids, attention_mask, decoder_input_ids, labels,
                                                    [target_positions, expl_target_positions]))
        label_sum = self.token_loss_sum(input_ids, attention_mask, decoder_input_ids, labels, target_positions)
        if expl_input_ids is None:
            return torch.stack([label_sum, torch.zeros_like(label_sum)])
        rationale_sum = self.token_loss_sum(expl_input_ids, expl_attention_mask, expl_decoder_input_ids, expl_labels,
                                            expl_target_positions)
        return torch.stack([label_sum, rationale_sum])


def combine(loss_sums: torch.Tensor, token_counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * label_sum / n_label + (1 - alpha) * rationale_sum / n_rationale``.

    ``token_counts`` are the step's global counts; a task with no tokens contributes nothing.
    """
    weights = torch.tensor([alpha, 1.0 - alpha], dtype=loss_sums.dtype, device=loss_sums.device)
    counts = token_counts.to(loss_sums.device, loss_sums.dtype).clamp(min=1.0)
    return (weights * loss_sums / counts).sum()
