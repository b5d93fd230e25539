"""mindmirror.data.loader: what keys the cache of tokenized tables."""

from __future__ import annotations

from mindmirror.config import TrainConfig
from mindmirror.data import loader
from mindmirror.model import load_tokenizer


def test_row_rules_are_part_of_the_cache_key(monkeypatch):
    """Tables built under other row rules are never reused."""
    cfg, tok = TrainConfig(), load_tokenizer("", "tiny", random_init=False)
    key = loader.build_key(cfg, tok)
    monkeypatch.setattr(loader, "ROW_RULES", loader.ROW_RULES + 1)
    assert loader.build_key(cfg, tok) != key
