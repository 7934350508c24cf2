"""small4-jax: serve and fine-tune Mistral Small 4 in JAX / Flax NNX.

Public API:
    from_pretrained(path, dtype="bfloat16", mesh=None) -> Small4ForCausalLM   # HF or Mistral-native directory
    model(input_ids)                                  -> logits [B, T, vocab]
    Small4Config, load_config(path), init_model(config, seed=0), load_tokenizer(path)
"""

from small4_jax.checkpoint import from_pretrained
from small4_jax.config import Small4Config, load_config
from small4_jax.errors import CheckpointError, ConfigError, InputError, Small4Error, TokenizerError
from small4_jax.model import KVCache, Small4ForCausalLM, init_model


def load_tokenizer(path):
    """A tokenizer from a `.model` (sentencepiece), a `tekken.json`, or a checkpoint directory holding one."""
    from small4_jax.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "KVCache",
    "Small4Config",
    "Small4Error",
    "Small4ForCausalLM",
    "TokenizerError",
    "from_pretrained",
    "init_model",
    "load_config",
    "load_tokenizer",
]
