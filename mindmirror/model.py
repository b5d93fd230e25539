"""Load or build the T5 student and its tokenizer.

``--from_pretrained`` takes a Hub id or a local folder (loaded with transformers), or a size name
(``tiny``, ``t5-v1_1-small`` ... ``t5-v1_1-xxl``) whose exact architecture ships with mindmirror.
Size names, and Hub ids of the t5-v1_1 family with ``--random_init``, build a randomly initialised
model sized to the tokenizer, so no download is needed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"
SIZES = ("tiny", "t5-v1_1-small", "t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl")
IGNORE = -100  # a label position that is padding, not a target (the ignore index of torch's and transformers' losses)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to do instead."""


def size_name(name: str) -> str | None:
    """The shipped size a model name refers to (``google/t5-v1_1-base`` -> ``t5-v1_1-base``), if any."""
    leaf = name.rstrip("/").split("/")[-1]
    return leaf if leaf in SIZES else None


def builds_from_config(name: str, random_init: bool) -> bool:
    """True when the model is built from a shipped config rather than loaded with weights."""
    return name in SIZES or (random_init and size_name(name) is not None and not Path(name).is_dir())


def model_config(size: str, vocab_size: int):
    """The shipped T5 config of ``size``, its vocabulary sized to the tokenizer (a multiple of 128)."""
    from transformers import T5Config

    values = json.loads((MODEL_CONFIG_DIR / f"{size}.json").read_text())
    values["vocab_size"] = -(-vocab_size // 128) * 128  # round up: tensor-core-friendly embedding
    return T5Config(**values)


def untie_lm_head(model, partitioned: bool = False):
    """Give the model its own output projection, as t5-v1_1 has.

    transformers 5 always ties ``lm_head`` to the input embedding of a freshly built T5 (it unties
    only when a checkpoint holds both); t5-v1_1 keeps them separate and does not rescale the decoder
    output. The projection is initialised with std ``d_model ** -0.5`` (Mesh TensorFlow's choice),
    so initial logits are of order one. On a model ``partitioned`` by ``deepspeed.zero.Init`` (see
    :func:`load_model`) the new projection is partitioned too: rank 0 draws the whole tensor, every
    rank keeps its shard.
    """
    import torch

    std = model.config.d_model ** -0.5
    if partitioned:  # the model's parameters here are empty placeholders of their shards
        import deepspeed
        from transformers.integrations import deepspeed_config

        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
            head = torch.nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
        with torch.no_grad(), deepspeed.zero.GatheredParameters([head.weight], modifier_rank=0):
            if deepspeed.comm.get_rank() == 0:
                head.weight.normal_(0.0, std)
        model.lm_head = head
    else:
        weight = torch.empty_like(model.shared.weight).normal_(0.0, std)
        model.lm_head.weight = torch.nn.Parameter(weight)
    getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
    return model


@contextlib.contextmanager
def eval_mode(module):
    """``module`` in eval mode without gradients for the block, back in its earlier mode afterwards."""
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def pad(seqs: list[list[int]], value: int, multiple: int = 1):
    """Right-pad token id lists with ``value`` into one ``torch.long`` tensor, its width rounded up to
    ``multiple`` (the model's inputs with the pad token id, its labels with :data:`IGNORE`)."""
    import torch

    width = max(len(s) for s in seqs)
    width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# Download options transformers records in ``tokenizer_config.json`` from how the tokenizer was loaded (with
# HF_HUB_OFFLINE=1 it writes "local_files_only": true): facts about one machine, not about the tokenizer.
_LOAD_TIME_KEYS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "revision", "subfolder",
                   "_commit_hash")


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """``tokenizer.save_pretrained(folder)`` without the options of how it was loaded, so that what is
    saved is the same on every machine (an offline cluster, a laptop)."""
    tokenizer.save_pretrained(str(folder))
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if any(key in config for key in _LOAD_TIME_KEYS):
            for key in _LOAD_TIME_KEYS:
                config.pop(key, None)
            path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(name: str, from_pretrained: str, random_init: bool):
    """The tokenizer: ``name`` if given, else the bundled one for built models, else the model's own."""
    from transformers import AutoTokenizer

    if not name:
        name = str(BUNDLED_TOKENIZER) if builds_from_config(from_pretrained, random_init) else from_pretrained
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer {name!r} (no network, or not found): {e}\nPass "
                             "--tokenizer FOLDER, or train from scratch with --random_init, which uses the bundled "
                             "tokenizer.") from e


def load_model(from_pretrained: str, tokenizer, random_init: bool = False, init_from: str = "",
               vocab_size: int = 0, speedups: bool = True, partitioned: bool = False):
    """The student model: built from a shipped config, or loaded from ``init_from`` / the Hub / a folder.

    ``vocab_size`` (built models only) sets the embedding rows; 0 sizes them to the tokenizer.
    ``speedups`` swaps in the fused GELU and norm, the fast CPU dropout and attention (same functions, less time).
    ``partitioned`` builds a model from a shipped config under ``deepspeed.zero.Init`` where a ZeRO-3
    config is registered (Accelerate registers it under ZeRO-3): every rank allocates only its shard,
    and the T5 initialisation runs on each module's gathered parameters, the same distribution as a
    whole build but another random stream. Loaded weights are partitioned by transformers itself."""
    def faster(model):
        from mindmirror.speedups import fast_attention, fast_dropout, fused_gelu, fused_rms_norm

        return fast_attention(fast_dropout(fused_gelu(fused_rms_norm(model)))) if speedups else model

    import torch
    from transformers import T5ForConditionalGeneration

    source = init_from or from_pretrained
    if not init_from and builds_from_config(from_pretrained, random_init):
        if vocab_size and vocab_size < len(tokenizer):
            raise ModelLoadError(f"--vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        config = model_config(size_name(from_pretrained), vocab_size or len(tokenizer))
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.decoder_start_token_id = tokenizer.pad_token_id
        build = T5ForConditionalGeneration._from_config if partitioned else T5ForConditionalGeneration
        return faster(untie_lm_head(build(config), partitioned))
    try:
        # fp32 master weights whatever the checkpoint holds: transformers would keep a bf16 export (a DeepSpeed bf16
        # run's) in bf16, and AdamW on bf16 weights without an fp32 copy loses small updates.
        model = T5ForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    except OSError as e:
        hint = (f" To train this architecture from scratch, add --random_init (sizes: {', '.join(SIZES)})."
                if size_name(source) else "")
        raise ModelLoadError(f"could not load model weights from {source!r} (no network, or not found): "
                             f"{e}.{hint}") from e
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ModelLoadError(f"the tokenizer has {len(tokenizer)} tokens but {source} embeds only "
                             f"{model.get_input_embeddings().num_embeddings}: use the model's own tokenizer")
    return faster(model)
