"""Test-time self-evaluation: the votes on hand-made cases, the teacher-format CoTs, the verdict
probabilities against a plain forward pass, and evaluate_split against the model's own generations."""

from __future__ import annotations

import math

import pytest
import torch

from mindmirror.data import formats
from mindmirror.data.registry import SELF_EVAL
from mindmirror.evaluation import selfeval

# ---- votes ------------------------------------------------------------------------------------


def test_majority_vote_groups_equations_by_value():
    answers = ["( 1.0 + 2.0 )", "( 5.0 - 1.0 )", "3", "( 6.0 / 2.0 )", "( 2.0 * 2.0 )"]
    # 3 appears three times (written three ways), 4 twice; the first way of writing 3 speaks for it.
    assert selfeval.vote(answers, "equation") == "( 1.0 + 2.0 )"


def test_weights_can_outvote_the_majority():
    answers = ["( 1.0 + 2.0 )", "3", "( 2.0 * 2.0 )"]
    assert selfeval.vote(answers, "equation", [0.1, 0.2, 0.9]) == "( 2.0 * 2.0 )"
    assert selfeval.vote(answers, "equation", [0.5, 0.5, 0.9]) == "( 1.0 + 2.0 )"  # 1.0 against 0.9


def test_ties_go_to_the_group_sampled_first():
    assert selfeval.vote(["( 2.0 * 2.0 )", "( 1.0 + 2.0 )"], "equation") == "( 2.0 * 2.0 )"
    assert selfeval.vote(["b", "a", "a", "b"], "text") == "b"
    assert selfeval.vote(["b", "a"], "text", [0.3, 0.3]) == "b"


def test_broken_equations_vote_by_their_text_and_text_ignores_case_and_spacing():
    assert selfeval.vote(["( ( 3", "( ( 3", "( 1.0 + 1.0 )"], "equation") == "( ( 3"
    assert selfeval.answer_key("( ( 3", "equation") == selfeval.answer_key(" ( (  3 ", "equation")
    assert selfeval.answer_key("( 0.1 + 0.2 )", "equation") == selfeval.answer_key("0.3", "equation")
    assert selfeval.vote(["Neutral", "entailment", " neutral "], "text") == "Neutral"


def test_vote_without_answers_and_with_mismatched_weights():
    assert selfeval.vote([], "text") is None
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        selfeval.vote(["a", "b"], "text", [1.0])


@pytest.mark.parametrize("answer, teacher", [
    ("( 98.0 - 74.0 )", "(98 - 74)"),
    ("( ( 87.0 - 73.0 ) * 7.0 )", "((87 - 73) * 7)"),
    ("( 1.0 ) + ( 2.5 )", "((1) + (2.5))"),
    ("98 - 74", "(98 - 74)"),
    ("3.0", "(3)"),
])
def test_equations_are_written_as_the_teacher_writes_them(answer, teacher):
    assert selfeval.teacher_equation(answer) == teacher


@pytest.mark.parametrize("family, answer, expected", [
    ("svamp", "( 98.0 - 74.0 )", "(98 - 74)"),
    ("svamp", "( ( 84.0 / 2.0 ) )", "((84 / 2))"),
    ("cqa", "bank", "bank"),
    ("anli1", "neutral", "neutral"),
])
def test_composed_cots_read_back_with_the_teacher_parsers(family, answer, expected):
    rationale = "First there were 98. Then 74 left."
    cot = selfeval.compose_cot(rationale, answer, family)
    assert formats.tree_cot_answer(cot, family) == expected
    assert formats.tree_cot_rationale(cot, family) == rationale


# ---- the model's side ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from mindmirror.model import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("", "tiny", False)
    return load_model("tiny", tokenizer).eval(), tokenizer


def test_verdict_probabilities_match_a_plain_forward_pass(tiny):
    t5, tokenizer = tiny
    cots = ["Mia has 74 fewer. The answer is (98 - 74).", "Add them. The answer is (3 + 4).",
            "Beth kept 73 cards and shared the rest among 7 friends, so each gets 2. The answer is ((87 - 73) / 7)."]
    batched = selfeval.verdict_probabilities(t5, tokenizer, cots, device="cpu", batch_size=2)
    for cot, p in zip(cots, batched, strict=True):
        enc = tokenizer(["predict: " + cot], return_tensors="pt")
        logp = {}
        for verdict in formats.VERDICTS:
            labels = tokenizer([verdict], return_tensors="pt").input_ids
            with torch.no_grad():
                loss = t5(**enc, labels=labels).loss  # mean over the verdict's tokens
            logp[verdict] = -loss.item() * labels.shape[1]
        expected = math.exp(logp["correct"]) / sum(math.exp(v) for v in logp.values())
        assert p == pytest.approx(expected, rel=1e-4)
        assert 0.0 < p < 1.0


def test_evaluate_split_records_are_the_models_own_generations(tiny, tmp_path):
    from mindmirror.data.registry import build_task_rows
    from mindmirror.data.tokenize import tokenize_rows
    from mindmirror.evaluation.evaluate import evaluate_split, score

    t5, tokenizer = tiny
    rows, _ = build_task_rows("svamp_tree1", subsample=0.01)
    rows = rows["test"][:6]
    table = tokenize_rows(rows, tokenizer, with_rationale=True, max_input_length=256, cache_dir=tmp_path)
    k = 3
    result, records = evaluate_split(t5, tokenizer, table, family="svamp", kind="equation",
                                      model_type="task_prefix_tree1", device="cpu", batch_size=4, gen_max_len=10,
                                      rationale_max_len=12, samples=k, temperature=1.0, seed=0)
    assert len(records) == len(rows) == result["rows"]

    def own(text, max_new_tokens):
        ids = tokenizer([text], return_tensors="pt").input_ids
        out = t5.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return tokenizer.decode(out[0], skip_special_tokens=True).strip()

    for row, record in zip(rows, records, strict=True):
        assert record["input"] == row.input and record["gold"] == row.label
        assert record["prediction"] == own("predict: " + row.input, 10)
        assert record["rationale"] == own("explain: " + row.input, 12)
        assert len(record["samples"]) == k
        answers = [s["answer"] for s in record["samples"]]
        weights = [s["p_correct"] for s in record["samples"]]
        assert record["majority_vote"] == selfeval.vote(answers, "equation")
        assert record["self_eval_vote"] == selfeval.vote(answers, "equation", weights)
        cots = [selfeval.compose_cot(s["rationale"], s["answer"], "svamp") for s in record["samples"]]
        assert weights == pytest.approx(selfeval.verdict_probabilities(t5, tokenizer, cots, device="cpu"), rel=1e-4)
    for key, field in (("accuracy", "prediction"), ("majority_vote_accuracy", "majority_vote"),
                       ("self_eval_vote_accuracy", "self_eval_vote")):
        assert result[key] == score([r[field] for r in records], [r.label for r in rows], "equation")[0]
        assert result[key] == sum(r[{"prediction": "correct"}.get(field, field + "_correct")] for r in records) / 6

    # The same seed samples the same answers and rationales.
    _, again = evaluate_split(t5, tokenizer, table, family="svamp", kind="equation",
                              model_type="task_prefix_tree1", device="cpu", batch_size=4, gen_max_len=10,
                              rationale_max_len=12, samples=k, temperature=1.0, seed=0)
    assert again == records


@pytest.mark.parametrize("model_type, dataset, samples, expected_keys", [
    ("standard", "svamp_tree1", 2, {"rows", "accuracy", "majority_vote_accuracy"}),  # no rationale: no judge
    (SELF_EVAL, "svamp_tree2", 2, {"rows", "accuracy"}),  # verdicts are what it answers: no votes
    ("task_prefix_tree1", "svamp_tree1", 0, {"rows", "accuracy"}),  # greedy only
])
def test_evaluate_split_votes_only_where_they_mean_something(tiny, tmp_path, model_type, dataset, samples,
                                                             expected_keys):
    from mindmirror.data.registry import build_task_rows
    from mindmirror.data.tokenize import tokenize_rows
    from mindmirror.evaluation.evaluate import evaluate_split

    t5, tokenizer = tiny
    rows, _ = build_task_rows(dataset, model_type=model_type, subsample=0.01)
    rows = rows["test"][:3]
    table = tokenize_rows(rows, tokenizer, with_rationale=model_type != "standard", max_input_length=256,
                          cache_dir=tmp_path)
    result, records = evaluate_split(t5, tokenizer, table, family="svamp",
                                     kind="text" if model_type == SELF_EVAL else "equation",
                                     model_type=model_type, device="cpu", batch_size=4, gen_max_len=6,
                                     rationale_max_len=6, samples=samples)
    assert set(result) == expected_keys and len(records) == 3
    assert all(("samples" in r) == ("majority_vote_accuracy" in result) for r in records)
    assert all((r["rationale"] is None) == (model_type == "standard") for r in records)
    if "majority_vote_accuracy" in result:
        assert all("p_correct" not in s for r in records for s in r["samples"])
