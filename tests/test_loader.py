"""mindmirror.data.loader: what keys the cache of tokenized tables."""

from __future__ import annotations

import inspect
import shutil
from dataclasses import fields, replace
from pathlib import Path

from mindmirror.config import DataConfig, TrainConfig
from mindmirror.data import loader
from mindmirror.data.registry import BUNDLED_DATA_DIR, DATASETS, LABEL_TYPES, MODEL_TYPES, build_task_rows
from mindmirror.data.tokenize import tokenize_rows
from mindmirror.model import load_tokenizer


def test_row_rules_are_part_of_the_cache_key(monkeypatch):
    """Tables built under other row rules are never reused."""
    cfg, tok = TrainConfig(), load_tokenizer("", "tiny", random_init=False)
    key = loader.build_key(cfg, tok)
    monkeypatch.setattr(loader, "ROW_RULES", loader.ROW_RULES + 1)
    assert loader.build_key(cfg, tok) != key


# ---------------------------------------------------------------------------------------------
# One list of the flags that shape the rows (issue 23): what the build is given is what keys the cache

# DataConfig's flags that shape neither the rows nor their tokens, and why.
UNMARKED = {"llm": "recorded only: the files decide", "prompt": "no effect",
            "cache_dir": "where the tables go, not what they hold", "preprocessing_num_workers": "how fast only"}


def other_value(name: str, value, tmp_path: Path):
    """A valid value of flag ``name`` other than ``value``."""
    if name == "data_dir":
        folder = tmp_path / "data"
        shutil.copytree(BUNDLED_DATA_DIR / DATASETS[TrainConfig().dataset].name,
                        folder / DATASETS[TrainConfig().dataset].name)
        return str(folder)
    choices = {"dataset": DATASETS, "model_type": MODEL_TYPES, "label_type": LABEL_TYPES}
    if name in choices:
        return next(c for c in choices[name] if c != value)
    if isinstance(value, bool):
        return not value
    return value + 1 if isinstance(value, int) else value / 2


def test_the_build_is_given_exactly_the_marked_flags():
    """build_task_rows takes the rows' flags, the seed and the tokenizer's EOS; tokenize_rows the tokens' flags."""
    rows = set(inspect.signature(build_task_rows).parameters)
    assert rows == set(loader.ROW_FLAGS) | {"seed", "eos_token"}
    assert set(loader.row_args(TrainConfig())) == rows - {"eos_token"}
    tokens = set(inspect.signature(tokenize_rows).parameters)
    assert set(loader.TOKEN_FLAGS) == {"max_input_length", "max_target_length"} <= tokens
    assert set(loader.token_args(TrainConfig())) == set(loader.TOKEN_FLAGS)
    data = {f.name for f in fields(DataConfig)}
    assert data - set(loader.ROW_FLAGS) - set(loader.TOKEN_FLAGS) == set(UNMARKED)


def test_every_flag_that_shapes_the_rows_keys_the_cache(tmp_path):
    """A flag given to the build but left out of the key would map stale tables with no error."""
    tok = load_tokenizer("", "tiny", random_init=False)
    base = TrainConfig()
    key = loader.build_key(base, tok)
    assert loader.build_key(TrainConfig(), tok) == key  # a key, not a draw
    for name in (*loader.ROW_FLAGS, *loader.TOKEN_FLAGS, "run"):
        changed = replace(base, **{name: other_value(name, getattr(base, name), tmp_path)})
        assert loader.build_key(changed, tok) != key, name
    for name in UNMARKED:
        value = getattr(base, name)
        changed = replace(base, **{name: "elsewhere" if isinstance(value, str) else other_value(name, value, tmp_path)})
        assert loader.build_key(changed, tok) == key, name
