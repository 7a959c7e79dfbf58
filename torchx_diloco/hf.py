"""Hugging Face causal LMs built from a config (no download): ``--model torchx_diloco.hf:causal_lm``.

Needs the ``hf`` extra (``pip install 'torchx-diloco[hf]'``). The weights are initialised here, from the
config; ``--model-args`` overrides the config's fields, e.g. ``'{"arch": "gpt2", "n_layer": 4}'``. The arguments
and their defaults: ``python -m pydoc torchx_diloco.hf.causal_lm`` (and docs/training-options.md).
"""

from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn

# tiny defaults over byte tokens (vocab 256), small enough for a laptop CPU
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llama": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    },
    "gpt2": {
        "vocab_size": 256,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 2,
        "n_positions": 1024,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}


def causal_lm(arch: str = "llama", **config_overrides: Any) -> nn.Module:
    """A freshly initialised ``AutoModelForCausalLM`` of model type ``arch``, built from its config.

    From the trainer: ``--model torchx_diloco.hf:causal_lm --model-args '{"arch": "gpt2", "n_layer": 4}'`` (the
    JSON object is this function's keyword arguments).

    Args:
        arch: a transformers model type: ``llama`` (the default) and ``gpt2`` start from the tiny defaults below;
            any other type transformers knows (``mistral``, ``qwen2``, ...) from its own config's defaults, which
            are full-size and have a vocabulary of its own tokenizer: give its size fields and ``vocab_size``
        config_overrides: fields of that config (``transformers.AutoConfig.for_model(arch)``), over the
            defaults; a name that is not a field is refused (transformers would keep it and change nothing)

    The defaults (byte tokens, small enough for a laptop CPU; gpt2's bos/eos are token 0 so that they fall
    inside the vocabulary):

    - llama: vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=2, max_position_embeddings=1024
    - gpt2: vocab_size=256, n_embd=64, n_layer=2, n_head=2, n_positions=1024, bos_token_id=0, eos_token_id=0

    The vocabulary must cover the data's tokens (256 for text; for shards, ``vocab_size`` of their meta.json)
    and the context (``max_position_embeddings``, ``n_positions``) ``--seq-len``: the trainer checks both
    before it trains, each in one line naming the field to raise.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(f"{e}: install the hf extra: pip install 'torchx-diloco[hf]'") from e
    settings = {**DEFAULTS.get(arch, {}), **config_overrides}
    config = AutoConfig.for_model(arch, **settings)  # ValueError naming the known types if arch is not one
    blank = AutoConfig.for_model(arch)
    unknown = sorted(k for k in config_overrides if not hasattr(blank, k))
    if unknown:  # transformers keeps unknown keys silently: a typo would change nothing
        raise ValueError(f"{', '.join(unknown)} is not a field of {type(config).__name__}")
    return AutoModelForCausalLM.from_config(config)
