"""Readers and teacher-text parsers of mindmirror.data.formats, against the parsing rules of
MISSION.md ("Parsing rules"): every rule that decides a label or a rationale is pinned here."""

from __future__ import annotations

import numpy as np
import pytest

from datafixtures import gzip_file, write_json, write_jsonl
from mindmirror.data import formats
from mindmirror.data.formats import (
    DataError,
    dss_cot,
    evaluation_verdict,
    tree_cot_answer,
    tree_cot_rationale,
)

# ---------------------------------------------------------------------------------------------
# Tree-of-thought CoTs


@pytest.mark.parametrize("cot, rationale, answer", [
    ("Luke scored 84 points in 2 rounds. So he scored 84 / 2 = 42 points per round. The answer is (84 / 2).",
     "Luke scored 84 points in 2 rounds. So he scored 84 / 2 = 42 points per round.", "(84 / 2)"),
    # the real sample's layout: blank line before the answer
    ("Therefore, the equation is 84 / 2. \n\nThe answer is (84 / 2).", "Therefore, the equation is 84 / 2.",
     "(84 / 2)"),
    # nested parentheses survive
    ("He received 10 - (3 + 6) = 1 email. The answer is (10 - (3 + 6)).", "He received 10 - (3 + 6) = 1 email.",
     "(10 - (3 + 6))"),
    # '= 42' inside the answer: only the part before '='
    ("So he scored 42 points. The answer is (84 / 2) = 42.", "So he scored 42 points.", "(84 / 2)"),
    ("So he scored 42 points. The answer is 84 / 2 = 42 points.", "So he scored 42 points.", "84 / 2"),
    # characters other than 0-9+-*/.() and space are dropped
    ("She pays 30 dollars 7 times. The answer is $(7 * 30) dollars.", "She pays 30 dollars 7 times.", "(7 * 30)"),
])
def test_tree_cot_svamp(cot, rationale, answer):
    assert tree_cot_answer(cot, "svamp") == answer
    assert tree_cot_rationale(cot, "svamp") == rationale


def test_tree_cot_svamp_rationale_is_cut_after_last_period_before_answer():
    cot = "Step one. Step two gives 7. So the answer is (3 + 4)."
    # 'So the ' sits between the last period and 'answer is ': it is cut off
    assert tree_cot_rationale(cot, "svamp") == "Step one. Step two gives 7."
    assert "answer is" not in tree_cot_rationale(cot, "svamp")


@pytest.mark.parametrize("family", ["svamp", "cqa", "anli1"])
def test_tree_cot_without_answer_phrase_is_none(family):
    cot = "I am not sure what to do here. Maybe 7."
    assert tree_cot_answer(cot, family) is None
    assert tree_cot_rationale(cot, family) is None


def test_tree_cot_svamp_answer_without_equation_characters_is_none():
    assert tree_cot_answer("I give up. The answer is unknown.", "svamp") is None


@pytest.mark.parametrize("cot, answer", [
    ('Fish live in water. A river has water. So the answer is "river bank".', "river bank"),
    ("Fish live in water. A river has water. So the answer is river.", "river"),
    ("People fish there. So the answer is fishing pole.", "fishing pole"),
    ('Mr. Smith lives there. So the answer is "mr. smith".', "mr. smith"),  # period inside quotes
])
def test_tree_cot_cqa(cot, answer):
    assert tree_cot_answer(cot, "cqa") == answer
    rationale = tree_cot_rationale(cot, "cqa")
    assert rationale.endswith(".") and "the answer is" not in rationale
    assert cot.startswith(rationale)


@pytest.mark.parametrize("cot, answer", [
    ("The cat was on the mat. So the answer is entailment.", "entailment"),
    ("Nothing is said about sleep. So the answer is Neutral.", "neutral"),
    ("Space is not a mat. So the answer is 'contradiction'.", "contradiction"),
    ("It follows. So the answer is \"ENTAILMENT\".", "entailment"),
])
def test_tree_cot_anli_case_insensitive(cot, answer):
    assert tree_cot_answer(cot, "anli1") == answer
    assert tree_cot_rationale(cot, "anli1") == cot.split(" So the answer is")[0]


def test_tree_cot_anli_unknown_label_is_none():
    assert tree_cot_answer("Hard to say. So the answer is maybe.", "anli1") is None


# ---------------------------------------------------------------------------------------------
# DSS strings


def test_dss_svamp_spill_over_is_cut_at_first_q():
    text = ("Jack has 3 apples and buys 4 more, so he has 3 + 4 = 7. The answer is (3 + 4).\n\n"
            "Q: Mary has 5 cats and gives away 2. How many are left?\nA: 5 - 2 = 3. The answer is (5 - 2).")
    rationale, answer = dss_cot(text, "svamp")
    assert answer == "(3 + 4)"
    assert rationale == "Jack has 3 apples and buys 4 more, so he has 3 + 4 = 7."
    assert "Mary" not in rationale


def test_dss_svamp_spill_over_on_the_same_line():
    rationale, answer = dss_cot("3 + 4 = 7. The answer is (3 + 4). Q: Tom has (2) cars. The answer is (2).",
                                "svamp")
    assert answer == "(3 + 4)"
    assert rationale == "3 + 4 = 7."


def test_dss_svamp_nested_parentheses():
    assert dss_cot("Add, then double. The answer is ((3 + 4) * 2).\n", "svamp") == \
        ("Add, then double.", "((3 + 4) * 2)")


@pytest.mark.parametrize("text", [
    "No answer given here.",
    "The result is seven. The answer is 7.",  # no parenthesised expression
    "Unsure.\n\nQ: Next question. The answer is (1 + 1).",  # the only answer is in the spill-over
])
def test_dss_svamp_unparsable_is_none(text):
    assert dss_cot(text, "svamp") is None


def test_dss_cqa_label_is_text_after_letter_without_period():
    text = ("Fish live in rivers. So the answer is (b) river.\n\nQ: What do people drink?\n"
            "Answer Choices:\n(a) water\n(b) sand\nA: So the answer is (a) water.")
    assert dss_cot(text, "cqa") == ("Fish live in rivers.", "river")


def test_dss_cqa_multiword_label_and_no_letter():
    assert dss_cot("It is a place. So the answer is (e) fishing pole.", "cqa") == ("It is a place.", "fishing pole")
    assert dss_cot("It is a place. So the answer is river.", "cqa") is None


def test_dss_anli():
    assert dss_cot("The premise says so. So the answer is neutral.\n\nQ: x\nA: So the answer is entailment.",
                   "anli1") == ("The premise says so.", "neutral")
    assert dss_cot("The premise says so. So the answer is Contradiction.", "anli1")[1] == "contradiction"
    assert dss_cot("The premise says so. So the answer is unclear.", "anli1") is None


# ---------------------------------------------------------------------------------------------
# Self-evaluations

BODY = "Evaluation:\n\nThe given answer divides 84 by 2.\nThis is accurate."


@pytest.mark.parametrize("verdict", ["correct", "wrong", "uncertain"])
def test_evaluation_verdict_each(verdict):
    text = f"{BODY}\n\nEvaluation result: the given answer is {verdict}."
    assert evaluation_verdict(text) == (BODY, verdict)


@pytest.mark.parametrize("line, verdict", [
    ("Evaluation result: the given answer is 'wrong'.", "wrong"),
    ('Evaluation result: the given answer is "uncertain".', "uncertain"),
    ("Evaluation result: the given answer is \"correct\"", "correct"),
    ("EVALUATION RESULT: The Given Answer Is CORRECT.", "correct"),
])
def test_evaluation_verdict_quoted_and_case_insensitive(line, verdict):
    rationale, found = evaluation_verdict(f"{BODY}\n{line}")
    assert found == verdict
    assert rationale == BODY


@pytest.mark.parametrize("text", [
    f"{BODY}\nEvaluation result: the answer seems fine.",
    f"{BODY}\nEvaluation result: the given answer is incorrect.",
    f"{BODY}\nEvaluation result: I cannot tell.",
    "",
])
def test_evaluation_verdict_unparsable_is_none(text):
    assert evaluation_verdict(text) is None


def test_evaluation_rationale_drops_verdict_line_despite_trailing_newline():
    """The rationale is the evaluation without its last line: a trailing newline must not make the
    empty string the 'last line' and leak the verdict line into the rationale."""
    rationale, verdict = evaluation_verdict(f"{BODY}\nEvaluation result: the given answer is wrong.\n")
    assert verdict == "wrong"
    assert "Evaluation result" not in rationale
    assert rationale == BODY


# ---------------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("verdicts, value", [
    (["correct"] * 5, 100.0),  # the real files' values of five self-evaluations
    (["correct"] * 4 + ["uncertain"], 81.0),
    (["correct"] * 4 + ["wrong"], 80.001),
    (["correct", "wrong", "correct", "wrong", "uncertain"], 41.002),
    (["wrong"] * 3, 0.003),
    ([], 0),
])
def test_cot_value(verdicts, value):
    assert formats.cot_value(verdicts) == value
    assert set(formats.VERDICT_VALUE) == set(formats.VERDICTS)


def test_read_jsonl_broken_line_names_record_and_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"input": "a", "label": "1"}\n\n{"input": "b", "label": "2"}\n{"input": "c", "lab\n')
    with pytest.raises(DataError) as err:
        formats.read_jsonl(path)
    msg = str(err.value)
    assert "x.json" in msg and "record 2" in msg and "line 4" in msg
    assert err.value.record == 2 and err.value.path == str(path)


def test_read_jsonl_skips_blank_lines_and_rejects_non_objects(tmp_path):
    path = write_jsonl(tmp_path / "ok.json", [{"a": 1}, {"a": 2}])
    path.write_text(path.read_text() + "\n   \n")
    assert formats.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    bad = tmp_path / "list.json"
    bad.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.json: record 1: line 2 is a JSON list"):
        formats.read_jsonl(bad)


def test_gzipped_files_are_read(tmp_path):
    gz = gzip_file(write_jsonl(tmp_path / "g.json", [{"input": "q", "label": "l"}]))
    assert gz.name == "g.json.gz"
    assert formats.read_jsonl(tmp_path / "g.json") == [{"input": "q", "label": "l"}]
    gzip_file(write_json(tmp_path / "h.json", ["a", "b"]))
    assert formats.read_json(tmp_path / "h.json") == ["a", "b"]


def test_missing_and_invalid_json_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        formats.read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('[\n"a",\n')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON \(line \d+"):
        formats.read_json(tmp_path / "bad.json")


def test_chunk_files_consecutive_and_not(tmp_path):
    llm = tmp_path / "llm"
    for k in (0, 1):
        write_json(llm / f"train_CoT_{k}.json", [])
    gzip_file(write_json(llm / "train_CoT_2.json", []))
    write_json(llm / "test_CoT_0.json", [])
    assert [p.name for p in formats.chunk_files(llm, "train")] == \
        ["train_CoT_0.json", "train_CoT_1.json", "train_CoT_2.json.gz"]
    write_json(llm / "train_CoT_4.json", [])
    with pytest.raises(DataError) as err:
        formats.chunk_files(llm, "train")
    assert str(llm) in str(err.value) and "train_CoT_4.json" in str(err.value)
    assert formats.chunk_files(tmp_path / "missing", "train") == []


def test_read_dss_cots_rejects_non_strings(tmp_path):
    path = write_json(tmp_path / "train_CoT_0.json", ["a. The answer is (1).", 3])
    with pytest.raises(DataError, match=r"train_CoT_0\.json: record 1: expected a CoT string"):
        formats.read_dss_cots([path])


def test_teacher_record_structure_errors(tmp_path):
    path = write_json(tmp_path / "train_CoT_0.json",
                      [{"steps": [{"x": '"input":"q"', "new_ys": ["a"], "value_outputs_list": [["e"]]}]},
                       {"steps": []}])
    with pytest.raises(DataError, match=r"train_CoT_0\.json: record 1: expected an object with a non-empty 'steps'"):
        formats.read_teacher_records([path])
    write_json(path, [{"steps": [{"new_ys": "not a list"}]}])
    with pytest.raises(DataError, match="record 0: steps\\[0\\].new_ys"):
        formats.read_teacher_records([path])


def test_question_fragment_decoding():
    assert formats.parse_question_fragment('"input":"Luke scored 84\\nHow many?"\n') == "Luke scored 84\nHow many?"
    assert formats.parse_question_fragment('"input":"a \\/ b",') == "a / b"
    assert formats.parse_question_fragment("not json at all") is None


# ---------------------------------------------------------------------------------------------
# Ground truth records


def test_gt_example_cqa_layout():
    obj = {"id": "1", "question": "Where are fish?", "choices": ["river", "sky", "car", "book", "desert"],
           "answer": "river", "abstractive_explanation": "", "extractive_explanation": ""}
    text, label = formats.gt_example(obj, "cqa", "cqa_train.json", 0)
    assert text == "Where are fish?\nAnswer Choices:\n(a) river\n(b) sky\n(c) car\n(d) book\n(e) desert"
    assert label == "river"
    with pytest.raises(DataError, match=r"cqa_train\.json: record 3: expected 5 answer choices, found 4"):
        formats.gt_example({**obj, "choices": obj["choices"][:4]}, "cqa", "cqa_train.json", 3)


def test_gt_example_anli_layout():
    obj = {"uid": "u", "premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0, "reason": ""}
    labels = [formats.gt_example({**obj, "label": i}, "anli1", "a.json", 0)[1] for i in (0, 1, 2)]
    assert labels == ["entailment", "neutral", "contradiction"]
    assert formats.gt_example(obj, "anli1", "a.json", 0)[0] == "A cat sat.</s>An animal sat."
    with pytest.raises(DataError, match=r"a\.json: record 5: label must be 0, 1 or 2"):
        formats.gt_example({**obj, "label": 3}, "anli1", "a.json", 5)


def test_gt_example_svamp_and_prepared_and_missing_field():
    svamp = {"Body": "Mia has 3 pens.", "Question": "How many?", "Equation": " ( 3.0 + 0.0 ) ", "Answer": 3.0}
    assert formats.gt_example(svamp, "svamp", "SVAMP.json", 0) == ("Mia has 3 pens.\nHow many?", "( 3.0 + 0.0 )")
    assert formats.gt_example({"input": "q", "label": "l "}, "cqa", "p.json", 0) == ("q", "l")
    with pytest.raises(DataError, match=r"SVAMP\.json: record 7: missing field 'Equation'"):
        formats.gt_example({"Body": "b", "Question": "q"}, "svamp", "SVAMP.json", 7)


def test_svamp_split_is_seed0_permutation_80_20():
    problems = list(range(10))
    split = formats.svamp_split(problems)
    idx = np.random.RandomState(seed=0).permutation(10)
    assert split == {"train": idx[:8].tolist(), "test": idx[8:].tolist()}
    big = formats.svamp_split(list(range(1000)))
    assert len(big["train"]) == 800 and len(big["test"]) == 200
    assert sorted(big["train"] + big["test"]) == list(range(1000))


def test_data_error_message_format():
    err = DataError("/d/f.json", 4, "broken")
    assert str(err) == "/d/f.json: record 4: broken"
    assert str(DataError("/d/f.json", None, "broken")) == "/d/f.json: broken"
    assert isinstance(err, ValueError)
