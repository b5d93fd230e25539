"""Model factory: exact t5-v1_1 architectures without downloads, the bundled tokenizer, clear errors."""

import json

import pytest
import torch

from mindmirror.cli import train_main
from mindmirror.model import BUNDLED_TOKENIZER, ModelLoadError, load_model, load_tokenizer, save_tokenizer

# Parameter counts of the published google/t5-v1_1 checkpoints (vocabulary 32128, untied lm_head).
PUBLISHED = {"t5-v1_1-small": 76_961_152, "t5-v1_1-base": 247_577_856, "t5-v1_1-large": 783_150_080}


class _Vocab:
    """Stands in for a tokenizer where only the vocabulary size matters."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_random_init_builds_the_published_architecture(size):
    with torch.device("meta"):
        model = load_model(f"google/{size}", _Vocab(32100), random_init=True)
    assert model.config.vocab_size == 32128
    assert model.lm_head.weight is not model.shared.weight
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[size]


def test_tiny_uses_the_bundled_tokenizer_and_sizes_its_vocabulary():
    tok = load_tokenizer("", "tiny", random_init=False)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    model = load_model("tiny", tok)
    assert model.config.vocab_size % 128 == 0 and model.config.vocab_size >= len(tok)
    assert model.config.decoder_start_token_id == 0
    assert str(BUNDLED_TOKENIZER).endswith("assets/tokenizer")


def test_unreachable_weights_say_how_to_use_random_init(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as where the Hub is unreachable, without waiting on timeouts
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="--random_init"):
        load_model("google/t5-v1_1-base", _Vocab(100))
    assert train_main(["--from_pretrained", "google/t5-v1_1-base", "--report_to", "none"]) == 2
    assert "--random_init" in capsys.readouterr().err


def test_a_saved_tokenizer_does_not_record_how_it_was_loaded(tmp_path):
    """Loaded offline (as HF_HUB_OFFLINE=1 does), the tokenizer an export saves is still the shipped one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)
    save_tokenizer(tokenizer, tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved
    assert saved == json.loads((BUNDLED_TOKENIZER / "tokenizer_config.json").read_text())
