"""The synthetic SVAMP-style data generator, the bundled assets and the bundled tokenizer."""

from __future__ import annotations

import ast
import gzip
import json
import operator
import re
import string
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from datafixtures import seed_dir  # noqa: F401  (a fixture)
from mindmirror.data import build_assets, formats, synthetic

ASSETS = Path(synthetic.__file__).resolve().parents[1] / "assets"
DATA = ASSETS / "data"
TOKENIZER = ASSETS / "tokenizer"
ANSWER_RE = re.compile(r"The answer is (\([0-9+\-*/() ]+\))\.$")
VERDICT_RE = re.compile(r"\n\nEvaluation result: the given answer is (correct|wrong|uncertain)\.$")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def value(expr: str) -> Fraction:
    """Exact value of an arithmetic expression (numbers, + - * /, parentheses); no eval()."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        raise ValueError(f"not a plain arithmetic expression: {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval"))


def read_gz(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_gz(path).split("\n")]


@pytest.fixture(scope="module")
def small():
    return synthetic.generate(seed=0, n_train=300, n_test=40)


@pytest.fixture(scope="module")
def shipped_train_records():
    return json.loads(read_gz(DATA / "svamp_tree1" / "llm" / "train_CoT_0.json.gz"))


# ------------------------------------------------------------------------------------------------
# Generator


def test_generate_is_deterministic(small):
    again = synthetic.generate(seed=0, n_train=300, n_test=40)
    assert again == small
    assert [len(small["train"]), len(small["test"])] == [300, 40]
    other = synthetic.generate(seed=1, n_train=300, n_test=40)
    assert [p.input for p in other["train"]] != [p.input for p in small["train"]]


def test_a_smaller_generation_is_a_prefix(small):
    # the train split does not depend on n_test (same seed: same first problems)
    assert synthetic.generate(seed=0, n_train=50, n_test=0)["train"] == small["train"][:50]


def test_gold_labels_are_svamp_equations(small):
    for p in small["train"] + small["test"]:
        assert re.fullmatch(r"\( (?:\(|\)|\d+\.0|[-+*/]| )+ \)", p.equation), p.equation
        v = value(p.equation)
        assert v == p.answer and v >= 0 and v.denominator == 1
        assert "\n" not in p.body and "\n" not in p.question and p.input == p.body + "\n" + p.question
    templates = Counter(p.template for p in small["train"])
    assert len(synthetic.TEMPLATES) >= 30 and len(templates) >= 30


def test_cots_are_right_or_consistently_wrong(small):
    for p in small["train"] + small["test"]:
        assert len(p.cots) == synthetic.NUM_COTS and sum(p.cot_correct) >= 3
        for cot, right in zip(p.cots, p.cot_correct, strict=True):
            m = ANSWER_RE.search(cot)
            assert m, cot
            v = value(m.group(1))
            assert (v == p.answer) == right, (cot, p.equation)
            # the reasoning computes the expression it answers: "<inline> = <value>" when a value is stated
            inline = m.group(1)[1:-1]
            stated = re.findall(re.escape(inline) + r" = (\d+)", cot)
            assert all(Fraction(s) == v for s in stated), cot
            assert len(cot) <= 220, cot


def test_evaluations_fit_their_cot(small):
    for p in small["train"]:
        assert len(p.evaluations) == len(p.verdicts) == synthetic.NUM_COTS
        for evs, vs in zip(p.evaluations, p.verdicts, strict=True):
            assert len(evs) == len(vs) == synthetic.NUM_EVALS
            for ev, v in zip(evs, vs, strict=True):
                assert ev.startswith("Evaluation:\n\n") and VERDICT_RE.search(ev).group(1) == v
                assert len(ev) <= 260, ev
        values = p.values
        assert values == [round(sum(synthetic.VERDICT_VALUE[v] for v in vs), 3) for vs in p.verdicts]
        assert p.best_cot == p.cots[values.index(max(values))]


def test_writer_output_is_byte_identical(tmp_path, small):
    a = synthetic.write_dataset(tmp_path / "a", small)
    b = synthetic.write_dataset(tmp_path / "b", synthetic.generate(seed=0, n_train=300, n_test=40))
    rel = lambda paths, root: sorted(str(p.relative_to(root)) for p in paths)  # noqa: E731
    assert rel(a, tmp_path / "a") == rel(b, tmp_path / "b")
    assert len(a) == 8
    for pa in a:
        pb = tmp_path / "b" / pa.relative_to(tmp_path / "a")
        assert pa.read_bytes() == pb.read_bytes(), pa
        assert pa.name.endswith(".json.gz")
    # the teacher files of the two datasets are the same
    for split in ("train", "test"):
        one = tmp_path / "a" / "svamp_tree1" / "llm" / f"{split}_CoT_0.json.gz"
        two = tmp_path / "a" / "svamp_tree2" / "llm" / f"{split}_CoT_0.json.gz"
        assert one.read_bytes() == two.read_bytes()


def test_training_corpus(small):
    corpus = synthetic.training_corpus(small["train"][:3])
    p = small["train"][0]
    assert corpus[:3] == ["predict: " + p.input, "explain: " + p.input, p.equation]
    assert p.cots[0] in corpus and "correct" in corpus
    assert synthetic.training_corpus(small) == synthetic.training_corpus(small["test"] + small["train"])


# ------------------------------------------------------------------------------------------------
# The shipped data files


def test_shipped_files_exist():
    names = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file())
    expected = sorted(
        f"{name}/{f}"
        for name in ("svamp_tree1", "svamp_tree2")
        for split in ("train", "test")
        for f in (f"{name}_{split}.json.gz", f"llm/{split}_CoT_0.json.gz")
    )
    assert names == expected


def test_shipped_questions_are_distinct():
    train = jsonl(DATA / "svamp_tree1" / "svamp_tree1_train.json.gz")
    test = jsonl(DATA / "svamp_tree1" / "svamp_tree1_test.json.gz")
    assert (len(train), len(test)) == (6000, 400)
    inputs = [r["input"] for r in train + test]
    assert len(set(inputs)) == len(inputs)


def test_shipped_files_are_consistent(shipped_train_records):
    gt = jsonl(DATA / "svamp_tree1" / "svamp_tree1_train.json.gz")
    tree2 = jsonl(DATA / "svamp_tree2" / "svamp_tree2_train.json.gz")
    assert len(shipped_train_records) == len(gt) and len(tree2) == 25 * len(gt)
    completion = 0
    for i, (rec, row) in enumerate(zip(shipped_train_records, gt, strict=True)):
        step = rec["steps"][0]
        assert rec["idx"] == i and step["step"] == 0 and step["ys"] == [""]
        assert step["x"] == '"input":' + json.dumps(row["input"]) + "\n"
        assert rec["ys"] == step["select_new_ys"] == [step["new_ys"][step["values"].index(max(step["values"]))]]
        assert rec["usage_so_far"]["completion_tokens"] > completion  # cumulative, like the real file
        completion = rec["usage_so_far"]["completion_tokens"]
        for j, (cot, evs) in enumerate(zip(step["new_ys"], step["value_outputs_list"], strict=True)):
            verdicts = [VERDICT_RE.search(e).group(1) for e in evs]
            assert step["values"][j] == round(sum(synthetic.VERDICT_VALUE[v] for v in verdicts), 3)
            for k, v in enumerate(verdicts):
                assert tree2[25 * i + 5 * j + k] == {"input": cot, "label": v}


def test_shipped_fractions(shipped_train_records):
    gt = jsonl(DATA / "svamp_tree1" / "svamp_tree1_train.json.gz")
    verdicts = Counter()
    wrong = total = 0
    for rec, row in zip(shipped_train_records, gt, strict=True):
        gold = value(row["label"])
        step = rec["steps"][0]
        right_here = 0
        for cot, evs in zip(step["new_ys"], step["value_outputs_list"], strict=True):
            assert len(cot) <= 220 and cot.endswith(").")
            right = value(ANSWER_RE.search(cot).group(1)) == gold
            right_here += right
            total += 1
            wrong += not right
            for e in evs:
                verdicts[right, VERDICT_RE.search(e).group(1)] += 1
        assert right_here >= 3  # the majority answer is always right
    assert 0.10 <= wrong / total <= 0.25
    n_right = sum(n for (r, _), n in verdicts.items() if r)
    n_wrong = sum(n for (r, _), n in verdicts.items() if not r)
    assert 0.85 <= verdicts[True, "correct"] / n_right <= 0.96
    assert 0.03 <= verdicts[True, "uncertain"] / n_right <= 0.11
    assert 0.80 <= verdicts[False, "wrong"] / n_wrong <= 0.92
    assert 0.03 <= verdicts[False, "uncertain"] / n_wrong <= 0.13
    uncertain = (verdicts[True, "uncertain"] + verdicts[False, "uncertain"]) / (n_right + n_wrong)
    assert 0.05 <= uncertain <= 0.10


def _shape(obj):
    """Keys at every level (dict keys; for lists, the shapes of their items) and leaf types."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        shapes = []
        for item in obj:
            s = _shape(item)
            if s not in shapes:
                shapes.append(s)
        return ["list", shapes]
    return "number" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else type(obj).__name__


def test_structure_matches_the_seed_form(shipped_train_records, seed_dir):
    for name in ("svamp_tree1", "svamp_tree2"):
        for split in ("train", "test"):
            sample = json.loads((seed_dir / name / "llm" / f"{split}_CoT_0.json").read_text())
            ours = shipped_train_records if split == "train" else json.loads(
                read_gz(DATA / name / "llm" / f"{split}_CoT_0.json.gz"))
            sample_shapes = {json.dumps(_shape(r), sort_keys=True) for r in sample}
            our_shapes = {json.dumps(_shape(r), sort_keys=True) for r in ours[:200]}
            assert our_shapes == sample_shapes
            assert [list(r) for r in ours[:3]] == [list(r) for r in sample[:1]] * 3  # key order too
            assert list(ours[0]["steps"][0]) == list(sample[0]["steps"][0])
            assert list(ours[0]["usage_so_far"]) == list(sample[0]["usage_so_far"])
            step, sample_step = ours[0]["steps"][0], sample[0]["steps"][0]
            assert len(step["new_ys"]) == len(sample_step["new_ys"]) == 5
            assert [len(e) for e in step["value_outputs_list"]] == [len(e) for e in sample_step["value_outputs_list"]]
            assert step["x"].startswith('"input":"') and sample_step["x"].startswith('"input":"')
            assert step["x"].endswith('"\n') and sample_step["x"].endswith('"\n')
            prepared = seed_dir / name / f"{name}_{split}.json"
            sample_rows = [json.loads(line) for line in prepared.read_text().splitlines()]
            our_rows = jsonl(DATA / name / f"{name}_{split}.json.gz")
            assert {tuple(r) for r in our_rows} == {tuple(r) for r in sample_rows} == {("input", "label")}
            assert len(our_rows) == len(ours) * (25 if name == "svamp_tree2" else 1)
            assert len(sample_rows) == len(sample) * (25 if name == "svamp_tree2" else 1)


def test_shipped_files_parse_with_the_project_readers():
    for name in ("svamp_tree1", "svamp_tree2"):
        for split in ("train", "test"):
            files = formats.chunk_files(DATA / name / "llm", split)
            assert [f.name for f in files] == [f"{split}_CoT_0.json.gz"]
            records = formats.read_teacher_records(files)
            rows = formats.read_jsonl(DATA / name / f"{name}_{split}.json")  # finds the .gz
            gt = formats.read_jsonl(DATA / "svamp_tree1" / f"svamp_tree1_{split}.json")
            assert len(records) == len(gt)
            for rec, row in zip(records[:500], gt, strict=False):  # the first 500 records are checked
                assert rec.question == row["input"]
                for cot, evs in zip(rec.cots, rec.evaluations, strict=True):
                    answer = formats.tree_cot_answer(cot, "svamp")
                    assert answer and ANSWER_RE.search(cot).group(1) == answer
                    rationale = formats.tree_cot_rationale(cot, "svamp")
                    assert rationale and rationale.endswith(".") and cot.startswith(rationale)
                    for ev in evs:
                        rationale, verdict = formats.evaluation_verdict(ev)
                        assert ev.endswith(f"the given answer is {verdict}.")
                        assert rationale.startswith("Evaluation:") and "Evaluation result" not in rationale
            if name == "svamp_tree2":
                assert len(rows) == 25 * len(records)
                assert {r["label"] for r in rows} == {"correct", "wrong", "uncertain"}


# ------------------------------------------------------------------------------------------------
# Rebuilding the assets


def _payload(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


@pytest.mark.slow
def test_rebuilding_gives_the_shipped_assets(tmp_path, capsys):
    """The default command (seed 0, 6000/400) reproduces the shipped data and tokenizer (~20 s).

    Data files are compared after decompression (another zlib may compress the same bytes
    differently); the tokenizer files byte for byte.
    """
    assert build_assets.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "spiece.model" in printed and "total" in printed
    for sub in ("data", "tokenizer"):
        shipped = sorted(p.relative_to(ASSETS) for p in (ASSETS / sub).rglob("*") if p.is_file())
        rebuilt = sorted(p.relative_to(tmp_path) for p in (tmp_path / sub).rglob("*") if p.is_file())
        assert rebuilt == shipped
        for rel in shipped:
            assert _payload(tmp_path / rel) == _payload(ASSETS / rel), f"{rel} differs: rebuild the assets"


def test_small_build_is_deterministic(tmp_path):
    args = ["--n_train", "150", "--n_test", "10", "--seed", "3"]
    assert build_assets.main(["--out", str(tmp_path / "a"), *args]) == 0
    assert build_assets.main(["--out", str(tmp_path / "b"), *args]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 11
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# ------------------------------------------------------------------------------------------------
# The bundled tokenizer


@pytest.fixture(scope="module")
def tok():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def texts():
    """Texts the trainer feeds: prefixed inputs, gold labels, CoT and evaluation rationales, verdicts."""
    gt = jsonl(DATA / "svamp_tree1" / "svamp_tree1_test.json.gz")
    records = json.loads(read_gz(DATA / "svamp_tree1" / "llm" / "test_CoT_0.json.gz"))
    out = {"input": [], "label": [], "cot_rationale": [], "cot": [], "eval_rationale": []}
    for row, rec in zip(gt, records, strict=True):
        out["input"] += ["predict: " + row["input"], "explain: " + row["input"]]
        out["label"].append(row["label"])
        step = rec["steps"][0]
        for cot, evs in zip(step["new_ys"], step["value_outputs_list"], strict=True):
            out["cot"].append(cot)
            out["cot_rationale"].append(formats.tree_cot_rationale(cot, "svamp"))
            out["eval_rationale"] += [formats.evaluation_verdict(e)[0] for e in evs]
    out["verdict"] = ["correct", "wrong", "uncertain"]
    return out


def test_tokenizer_layout(tok):
    assert type(tok).__name__ == "T5Tokenizer"
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id is None
    sentinels = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert sentinels == list(range(len(tok) - 1, len(tok) - 101, -1))  # T5's order: <extra_id_0> last
    assert tok.convert_tokens_to_ids("<extra_id_100>") == tok.unk_token_id
    assert 300 <= len(tok) - 100 <= 1100
    ids = tok("predict: a b").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids


def test_tokenizer_files_hold_no_paths_or_times():
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5Tokenizer" and config["extra_ids"] == 100
    text = (TOKENIZER / "tokenizer_config.json").read_text() + (TOKENIZER / "tokenizer.json").read_text()
    assert "/work" not in text and "/tmp" not in text and "mindmirror" not in text
    assert sorted(p.name for p in TOKENIZER.iterdir()) == ["spiece.model", "tokenizer.json", "tokenizer_config.json"]


def test_digits_are_split(tok):
    text = "0 7 42 99 305 1234567890 84.0 (84 / 2) x12y"
    pieces = tok.convert_ids_to_tokens(tok(text).input_ids)
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == [c for c in text if c.isdigit()]
    pieces = [p for p in tok.get_vocab() if not p.startswith("<extra_id_")]
    assert all(sum(c.isdigit() for c in piece) <= 1 for piece in pieces)


def test_round_trip(tok, texts):
    """decode(encode(text)) == " ".join(text.split()) (whitespace runs, newlines included, become one space)."""
    extra = [string.printable, "Tom's $5 costs 100% more ~ `x` {y} [z] <a> | b \\ c ^ d _ e @ f # g & h; i"]
    for kind, items in list(texts.items()) + [("ascii", extra)]:
        for text in items:
            ids = tok(text).input_ids
            assert tok.unk_token_id not in ids, (kind, text)
            assert tok.decode(ids, skip_special_tokens=True) == " ".join(text.split()), (kind, text)
    # labels, rationales and verdicts come back exactly; inputs with their newline made a space
    for kind in ("label", "cot_rationale", "verdict"):
        for text in texts[kind]:
            assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    text = texts["input"][0]
    assert "\n" in text and tok.decode(tok(text).input_ids, skip_special_tokens=True) == text.replace("\n", " ")


def test_spiece_model_and_hf_tokenizer_agree(tok, texts):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "spiece.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == len(tok) - 100
    for kind in ("input", "label", "cot", "eval_rationale"):
        for text in texts[kind][:300]:
            assert tok(text).input_ids[:-1] == sp.encode(" ".join(text.split())), text


def test_token_lengths_are_small(tok, texts):
    def mean(kind):
        return sum(len(tok(t).input_ids) for t in texts[kind]) / len(texts[kind])

    lengths = {kind: mean(kind) for kind in ("input", "label", "cot_rationale", "cot", "eval_rationale")}
    assert 20 <= lengths["input"] <= 45, lengths
    assert 8 <= lengths["label"] <= 30, lengths
    assert 15 <= lengths["cot_rationale"] <= 50, lengths
    assert 15 <= lengths["eval_rationale"] <= 45, lengths
    assert max(len(tok(t).input_ids) for t in texts["input"]) <= 80
