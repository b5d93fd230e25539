"""The objective against transformers' own loss, over the batches the collator makes (tests/test_collate.py)."""

import torch

from mindmirror.core.collate import Collator
from mindmirror.core.objective import DistillationObjective, combine
from mindmirror.model import model_config, untie_lm_head


def tiny_t5(vocab=200, seed=0):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    return untie_lm_head(T5ForConditionalGeneration(model_config("tiny", vocab))).eval()


def rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    def seq(lo, hi):
        return torch.randint(3, 150, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() + [1]
    return [{"input_ids": seq(3, 12), "labels": seq(1, 5), "expl_input_ids": seq(4, 14), "rationale_ids": seq(5, 20)}
            for _ in range(n)]


def test_label_loss_equals_transformers_mean_cross_entropy():
    t5 = tiny_t5()
    batch = Collator(pad_id=0, with_rationale=False)(rows(5))
    sums = DistillationObjective(t5)(**{k: v for k, v in batch.items() if k != "token_counts"})
    ours = sums[0] / batch["token_counts"][0]
    theirs = t5(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert sums[1] == 0 and batch["token_counts"][1] == 0


def test_both_tasks_get_their_own_token_mean():
    t5 = tiny_t5()
    data = rows(4)
    both = Collator(0, with_rationale=True)(data)
    sums = DistillationObjective(t5)(**{k: v for k, v in both.items() if k != "token_counts"})
    label_only = Collator(0, False)(data)
    expl_only = Collator(0, False)([{"input_ids": r["expl_input_ids"], "labels": r["rationale_ids"]} for r in data])
    ref_label = t5(input_ids=label_only["input_ids"], attention_mask=label_only["attention_mask"],
                   labels=label_only["labels"]).loss
    ref_expl = t5(input_ids=expl_only["input_ids"], attention_mask=expl_only["attention_mask"],
                  labels=expl_only["labels"]).loss
    loss = combine(sums, both["token_counts"], alpha=0.3)
    assert torch.allclose(loss, 0.3 * ref_label + 0.7 * ref_expl, atol=1e-5)


def test_token_normalised_loss_does_not_depend_on_how_the_step_is_split():
    t5 = tiny_t5()
    objective = DistillationObjective(t5)
    data = rows(8, seed=3)
    collate = Collator(0, True)

    def grads(chunks):
        t5.zero_grad()
        batches = [collate(c) for c in chunks]
        counts = sum(b["token_counts"] for b in batches)
        for b in batches:
            combine(objective(**{k: v for k, v in b.items() if k != "token_counts"}), counts, 0.5).backward()
        return torch.cat([p.grad.flatten() for p in t5.parameters() if p.grad is not None]).clone()

    whole = grads([data])
    split = grads([data[:3], data[3:5], data[5:]])
    assert torch.allclose(whole, split, atol=1e-6)


def test_stacked_batch_gives_both_tasks_sums_in_one_pass_of_the_model():
    """ZeRO-3's layout (both tasks' rows in one set of tensors) computes what the two passes compute (not to the
    bit: the matrix products run over other row counts and widths), and calls every module of the model as often
    as one forward of the model does."""
    t5 = tiny_t5()
    objective = DistillationObjective(t5)
    data = rows(6, seed=5)
    two = Collator(0, True)(data)
    one = Collator(0, True, stacked=True)(data)
    assert one["token_counts"].tolist() == two["token_counts"].tolist()
    assert one["input_ids"].shape[0] == 12 and "expl_input_ids" not in one
    assert one["labels"].reshape(-1)[one["target_positions"]].tolist() == \
        two["labels"].reshape(-1)[two["target_positions"]].tolist()
    assert one["labels"].reshape(-1)[one["expl_target_positions"]].tolist() == \
        two["expl_labels"].reshape(-1)[two["expl_target_positions"]].tolist()
    calls = {}
    hooks = [m.register_forward_pre_hook(lambda m, _: calls.__setitem__(m, calls.get(m, 0) + 1))
             for m in t5.modules()]

    def sums_and_grads(batch):
        t5.zero_grad()
        calls.clear()
        sums = objective(**{k: v for k, v in batch.items() if k != "token_counts"})
        combine(sums, batch["token_counts"], 0.5).backward()
        return sums.detach(), torch.cat([p.grad.flatten() for p in t5.parameters() if p.grad is not None])

    sums_two, grads_two = sums_and_grads(two)
    called_two = dict(calls)
    sums_one, grads_one = sums_and_grads(one)
    # stacked: every module once, as one forward of the model; two passes: one encoder pass over both tasks'
    # questions, a decoder pass per task, one embedding call for every id and one output projection for every target
    assert {n for m, n in calls.items() if list(m.parameters(recurse=False))} == {1}
    assert calls.keys() == called_two.keys()
    assert called_two[t5.encoder.block[0]] == 1 and called_two[t5.decoder.block[0]] == 2
    assert called_two[t5.shared] == 1 and called_two[t5.lm_head] == 1
    for h in hooks:
        h.remove()
    assert torch.allclose(sums_one, sums_two, rtol=1e-6, atol=1e-5), (sums_one, sums_two)
    assert torch.allclose(grads_one, grads_two, atol=1e-6)
