"""tokenize_rows: task prefixes, truncation, and the on-disk cache (a hit for the same rows and
settings, a new cache file whenever rows, lengths or the tokenizer change).

The tokenizer is a tiny SentencePiece unigram model trained here, so the test does not depend on
downloaded or bundled assets."""

from __future__ import annotations

import random

import pytest

from mindmirror.data.registry import TaskRow
from mindmirror.data.tokenize import default_cache_dir, tokenize_rows, tokenizer_fingerprint

WORDS = ["predict", "explain", "the", "answer", "is", "correct", "wrong", "uncertain", "apples", "Jack", "has", "seeds",
         "flower", "bed", "how", "many", "points", "round", "game", "Luke", "scored", "after", "playing", "rounds",
         "trivia", "emails", "morning", "evening", "received", "total", "crayons", "pencils", "rows", "premise",
         "hypothesis", "entailment", "neutral", "contradiction", "choices", "river", "bank", "so", "he", "she", "buys",
         "more", "now", "gets", "from", "her", "friend", "stickers", "Mia", "each", "How", "A", "different",
         "explanation", "does", "have", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"]


def _train_spm(folder, vocab_size: int, seed: int):
    import sentencepiece as spm

    folder.mkdir(parents=True)
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) + " : ( ) + - * / . 0123456789 = ? ,"
             for _ in range(300)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, split_digits=True, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2)
    corpus.unlink()
    return folder


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return _train_spm(root / "a", 100, seed=0), _train_spm(root / "b", 130, seed=1)


def load(folder):
    """A freshly loaded tokenizer (transformers 5: from_pretrained(dir), not vocab_file=...)."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(folder), extra_ids=100)


@pytest.fixture
def tok(tok_dirs):
    return load(tok_dirs[0])


def make_rows(n=6, text="Jack has {i} apples and buys {j} more. How many apples does Jack have now?"):
    return [TaskRow(input=text.format(i=10 + i, j=2 + i), label=f"( {10 + i}.0 + {2 + i}.0 )",
                    rationale=f"Jack has {10 + i} apples, he buys {2 + i} more, so {10 + i} + {2 + i} = {12 + 2 * i}.",
                    branch=0, source="train_CoT_0.json", record=i) for i in range(n)]


def arrows(cache):
    return sorted(p.name for p in cache.glob("*.arrow"))


def tokenize(rows, tokenizer, cache, **kw):
    kw = {"with_rationale": True, "max_input_length": 64, "max_target_length": 32, **kw}
    return tokenize_rows(rows, tokenizer, cache_dir=cache, **kw)


def columns(ds):
    return {c: ds[c] for c in ds.column_names}


# ---------------------------------------------------------------------------------------------
# Cache


def test_second_call_hits_cache(tok, tmp_path):
    """The same rows, tokenizer and settings again: no new cache file, the same table."""
    cache = tmp_path / "cache"
    first = tokenize(make_rows(), tok, cache)
    files = arrows(cache)
    assert len(files) == 1
    second = tokenize(make_rows(), tok, cache)
    assert arrows(cache) == files
    assert columns(second) == columns(first)


def test_second_call_hits_cache_with_a_freshly_loaded_tokenizer(tok_dirs, tmp_path):
    cache = tmp_path / "cache"
    first = tokenize(make_rows(), load(tok_dirs[0]), cache)
    files = arrows(cache)
    stamp = (cache / files[0]).stat().st_mtime_ns
    second = tokenize(make_rows(), load(tok_dirs[0]), cache)
    assert arrows(cache) == files and len(files) == 1
    assert (cache / files[0]).stat().st_mtime_ns == stamp  # loaded, not recomputed and rewritten
    assert columns(second) == columns(first)


def test_fingerprint_does_not_depend_on_earlier_calls(tok):
    """Tokenizing with truncation must not change what the cache key says about the tokenizer:
    otherwise the same data gets a new cache entry depending on what ran before."""
    before = tokenizer_fingerprint(tok)
    tok(["Jack has 12 apples and some more apples"], max_length=4, truncation=True)
    assert tokenizer_fingerprint(tok) == before


@pytest.mark.parametrize("change", [
    {"rows": make_rows(text="Mia has {i} stickers and gets {j} more. How many stickers does Mia have?")},
    {"rows": make_rows(n=5)},
    {"max_input_length": 48},
    {"max_target_length": 16},
    {"with_rationale": False},
])
def test_changed_rows_or_settings_give_a_new_cache_file(tok_dirs, tmp_path, change):
    cache = tmp_path / "cache"
    tokenize(make_rows(), load(tok_dirs[0]), cache)
    tokenize(make_rows(), load(tok_dirs[0]), cache)  # same again: still one file
    assert len(arrows(cache)) == 1
    kw = dict(change)
    rows = kw.pop("rows", make_rows())
    changed = tokenize(rows, load(tok_dirs[0]), cache, **kw)
    assert len(arrows(cache)) == 2
    assert changed.num_rows == len(rows)


def test_changed_label_or_rationale_gives_a_new_cache_file(tok_dirs, tmp_path):
    cache = tmp_path / "cache"
    rows = make_rows()
    tokenize(rows, load(tok_dirs[0]), cache)
    rows[2].label = "( 99.0 - 1.0 )"
    out = tokenize(rows, load(tok_dirs[0]), cache)
    assert len(arrows(cache)) == 2
    assert load(tok_dirs[0]).decode(out[2]["labels"], skip_special_tokens=True) == "( 99.0 - 1.0 )"
    rows[3].rationale = "A different explanation."
    tokenize(rows, load(tok_dirs[0]), cache)
    assert len(arrows(cache)) == 3


def test_a_different_tokenizer_gives_a_new_cache_file(tok_dirs, tmp_path):
    cache = tmp_path / "cache"
    a = tokenize(make_rows(), load(tok_dirs[0]), cache)
    b = tokenize(make_rows(), load(tok_dirs[1]), cache)
    assert len(arrows(cache)) == 2
    assert a["input_ids"] != b["input_ids"]


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MINDMIRROR_CACHE", str(tmp_path / "mm"))
    assert default_cache_dir() == tmp_path / "mm"


# ---------------------------------------------------------------------------------------------
# Contents


def test_prefixes_and_columns_with_rationale(tok, tmp_path):
    rows = make_rows(3)
    ds = tokenize(rows, tok, tmp_path / "cache", max_input_length=128, max_target_length=128)
    assert {"input_ids", "labels", "expl_input_ids", "rationale_ids"} <= set(ds.column_names)
    for row, r in zip(ds, rows, strict=True):
        assert tok.decode(row["input_ids"], skip_special_tokens=True) == "predict: " + r.input
        assert tok.decode(row["expl_input_ids"], skip_special_tokens=True) == "explain: " + r.input
        assert tok.decode(row["labels"], skip_special_tokens=True) == r.label
        assert tok.decode(row["rationale_ids"], skip_special_tokens=True) == r.rationale
        for col in ("input_ids", "labels", "expl_input_ids", "rationale_ids"):
            assert row[col][-1] == tok.eos_token_id


def test_without_rationale_no_prefix_and_no_explain_columns(tok, tmp_path):
    rows = make_rows(3)
    ds = tokenize(rows, tok, tmp_path / "cache", with_rationale=False, max_input_length=128)
    assert "expl_input_ids" not in ds.column_names and "rationale_ids" not in ds.column_names
    for row, r in zip(ds, rows, strict=True):
        decoded = tok.decode(row["input_ids"], skip_special_tokens=True)
        assert decoded == r.input and "predict" not in decoded
        assert tok.decode(row["labels"], skip_special_tokens=True) == r.label


def test_truncation_to_max_lengths(tok, tmp_path):
    rows = make_rows(4)
    rows[0].label = " + ".join(str(k) for k in range(30))  # far longer than 8 tokens
    ds = tokenize(rows, tok, tmp_path / "cache", max_input_length=12, max_target_length=8)
    assert len(ds[0]["labels"]) == 8 and ds[0]["labels"][-1] == tok.eos_token_id
    for row in ds:
        assert len(row["labels"]) <= 8 and len(row["rationale_ids"]) <= 8
        assert len(row["input_ids"]) <= 12 and len(row["expl_input_ids"]) <= 12
    assert len(ds[1]["rationale_ids"]) == 8  # rationales are long: truncated too
    assert tok.decode(ds[0]["input_ids"], skip_special_tokens=True).startswith("predict:")
    assert tok.decode(ds[0]["expl_input_ids"], skip_special_tokens=True).startswith("explain:")
