"""Build the bundled assets: the synthetic SVAMP-style data and the T5 tokenizer trained on it.

Usage: ``mindmirror-build-assets [--out DIR] [--seed 0] [--n_train 6000] [--n_test 400]``
(or ``python -m mindmirror.data.build_assets``). Writes

* ``DIR/data/svamp_tree1/`` and ``DIR/data/svamp_tree2/`` (gzip-compressed ``*.json.gz``, see
  :mod:`mindmirror.data.synthetic`),
* ``DIR/tokenizer/``: ``spiece.model`` (SentencePiece) and the Hugging Face files
  ``tokenizer.json`` / ``tokenizer_config.json``; ``AutoTokenizer.from_pretrained(DIR/tokenizer)``
  gives a ``T5Tokenizer`` (transformers 5, tokenizers backend) with T5's layout: ``<pad>`` = 0,
  ``</s>`` = 1, ``<unk>`` = 2, no BOS, the SentencePiece pieces, then the 100 sentinels
  ``<extra_id_99>`` .. ``<extra_id_0>`` (so ``<extra_id_0>`` has the highest id).

Default ``--out`` is the package's own ``mindmirror/assets``. The output is a pure function of
the arguments: running the command twice gives byte-identical files (gzip without time stamp,
single-threaded SentencePiece with a fixed seed and no sampling or shuffling of sentences, and
transformers' saved files hold no paths or times). It takes ~20 s on one CPU core.

How the tokenizer is made. SentencePiece's own Unigram trainer stops at ~380 pieces on this
repetitive corpus (it then splits frequent words such as ``predict`` into 4 pieces), while its
BPE trainer learns whole words. The T5 tokenizer of transformers 5 however always runs a
Unigram model, and run on BPE merge scores it splits words oddly (``the`` -> ``t`` + ``he``).
So we train BPE (``split_digits=True``, whitespace and the normalisation rule ``nmt_nfkc`` as
T5), then turn its vocabulary into a Unigram model: every piece gets the score ``log p`` of its
frequency in the BPE segmentation of the corpus, pieces the segmentation never uses (intermediate
merges) are dropped, all single characters are kept, and a constant
``PIECE_PENALTY`` is subtracted from every score so that Viterbi prefers fewer pieces. ``spiece.model``
(Unigram) and the
Hugging Face tokenizer then segment identically (checked in the tests), mostly in whole words.
Every printable ASCII character is in the vocabulary, so no ASCII text maps to ``<unk>``.

Round trip (what ``tok.decode(tok(text).input_ids, skip_special_tokens=True)`` preserves): for
any text of printable ASCII characters and whitespace it returns ``" ".join(text.split())``:
the text with every run of whitespace, newlines included, made one space and leading/trailing
whitespace removed (T5's SentencePiece normalisation; the Hugging Face T5 tokenizer also splits
on whitespace). So the input ``Body + "\\n" + Question`` comes back as ``Body + " " +
Question``; labels such as ``( 84.0 / 2.0 )``, CoT rationales and verdicts come back unchanged;
an evaluation ``"Evaluation:\\n\\n..."`` comes back as ``"Evaluation: ..."``. Digits are always
single tokens (a number ``84`` is ``▁``, ``8``, ``4``).
"""

from __future__ import annotations

import argparse
import io
import math
import re
import shutil
import string
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from mindmirror.data import synthetic
from mindmirror.model import save_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_VOCAB_SIZE = 1000  # BPE size asked for; SentencePiece's own limit applies when lower
MODEL_MAX_LENGTH = 1024  # the paper's maximum input length
EXTRA_IDS = 100
# Subtracted from every piece's log-probability: Viterbi then prefers fewer, longer pieces (like
# the BPE segmentation it comes from) and frequency only decides between equally long splits.
PIECE_PENALTY = 10.0

# Printable ASCII (no whitespace), so that any ASCII text is covered by the vocabulary.
_ASCII_LINE = " ".join(ch for ch in string.printable if not ch.isspace())


def tokenizer_corpus(problems) -> list[str]:
    """The texts the tokenizer is trained on: :func:`synthetic.training_corpus` with whitespace
    normalised as T5 does, plus a few lines holding every printable ASCII character."""
    corpus = [" ".join(t.split()) for t in synthetic.training_corpus(problems)]
    return [t for t in corpus if t] + [_ASCII_LINE] * 4


def _train_spm(corpus: list[str], vocab_size: int, model_type: str, seed: int) -> bytes:
    import sentencepiece as spm

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=8192,
        minloglevel=2,
    )
    return model.getvalue()


def _train_bpe_sized(corpus: list[str], vocab_size: int, seed: int) -> bytes:
    """Train BPE at ``vocab_size`` or, when the corpus supports fewer pieces, at SentencePiece's limit."""
    try:
        return _train_spm(corpus, vocab_size, "bpe", seed)
    except RuntimeError as err:
        m = re.search(r"value <= (\d+)", str(err))
        if not m:
            raise
        return _train_spm(corpus, int(m.group(1)), "bpe", seed)


def bpe_to_unigram(bpe_model: bytes, corpus: list[str]) -> bytes:
    """Re-score a SentencePiece BPE model as a Unigram model (see the module docstring)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(bpe_model)
    sp = spm.SentencePieceProcessor(model_proto=bpe_model)
    sentences = Counter(corpus)
    texts = list(sentences)  # first-occurrence order: deterministic
    counts = Counter()
    for text, ids in zip(texts, sp.encode(texts), strict=True):
        weight = sentences[text]
        for i in ids:
            counts[i] += weight
    total = sum(counts.values())
    normal = pb.ModelProto.SentencePiece.NORMAL
    kept = []
    for i, piece in enumerate(proto.pieces):
        if piece.type != normal:
            kept.append((piece.piece, 0.0, piece.type))
        elif counts[i] > 0:
            kept.append((piece.piece, math.log(counts[i] / total) - PIECE_PENALTY, normal))
        elif len(piece.piece) == 1:  # a character: keep it so no text becomes <unk>
            kept.append((piece.piece, math.log(0.5 / total) - PIECE_PENALTY, normal))
    del proto.pieces[:]
    for text, score, kind in kept:
        new = proto.pieces.add()
        new.piece = text
        new.score = float(score)
        new.type = kind
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = len(kept)
    return proto.SerializeToString(deterministic=True)


def train_tokenizer(problems, out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> Path:
    """Train the SentencePiece model on ``problems`` and save a Hugging Face T5 tokenizer folder."""
    from transformers import T5Tokenizer

    out_dir = Path(out_dir)
    corpus = tokenizer_corpus(problems)
    spiece = bpe_to_unigram(_train_bpe_sized(corpus, vocab_size, seed), corpus)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(spiece)
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=EXTRA_IDS, model_max_length=MODEL_MAX_LENGTH)
        save_tokenizer(tok, out_dir)
    (out_dir / "spiece.model").write_bytes(spiece)
    return out_dir


def build(out: str | Path = DEFAULT_OUT, seed: int = 0, n_train: int = 6000, n_test: int = 400,
          vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[Path]:
    """Write ``out/data/svamp_tree{1,2}`` and ``out/tokenizer``; returns the written files."""
    out = Path(out)
    problems = synthetic.generate(seed=seed, n_train=n_train, n_test=n_test)
    data_dir = out / "data"
    for name in synthetic.DATASET_NAMES:
        if (data_dir / name).exists():
            shutil.rmtree(data_dir / name)
    synthetic.write_dataset(data_dir, problems)
    train_tokenizer(problems["train"], out / "tokenizer", vocab_size=vocab_size, seed=seed)
    roots = [data_dir / name for name in synthetic.DATASET_NAMES] + [out / "tokenizer"]
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mindmirror-build-assets",
        description="Generate the bundled synthetic SVAMP-style tree-of-thought data and train its T5 tokenizer.",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    parser.add_argument("--n_train", type=int, default=6000, help="training questions (default: %(default)s)")
    parser.add_argument("--n_test", type=int, default=400, help="test questions (default: %(default)s)")
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="BPE pieces asked for before pruning (default: %(default)s)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    files = build(out, seed=args.seed, n_train=args.n_train, n_test=args.n_test, vocab_size=args.vocab_size)
    total = 0
    for path in files:
        size = path.stat().st_size
        total += size
        print(f"{size:>10,d}  {path.relative_to(out)}")
    print(f"{total:>10,d}  total in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
