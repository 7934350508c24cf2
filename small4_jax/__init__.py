"""small4-jax: serve and fine-tune Mistral Small 4 in JAX / Flax NNX.

Public API:
    from_pretrained(path, dtype="bfloat16", mesh=None) -> Small4ForCausalLM   # HF or Mistral-native directory
    model(input_ids)                                  -> logits [B, T, vocab]
    Small4Config, load_config(path), init_model(config, seed=0), load_tokenizer(path)

The names are imported on first use (PEP 562), so `import small4_jax.errors` (which every command-line tool does
before parsing its arguments) does not import JAX: `--help` answers at once.
"""

from small4_jax.console import quiet_cuda_plugin
from small4_jax.errors import CheckpointError, ConfigError, InputError, Small4Error, TokenizerError

quiet_cuda_plugin()  # before anything imports jax: no CUDA-plugin noise on machines without a GPU

_LAZY = {
    "from_pretrained": "small4_jax.ckpt.load",
    "Small4Config": "small4_jax.config",
    "load_config": "small4_jax.config",
    "KVCache": "small4_jax.nn.model",
    "Small4ForCausalLM": "small4_jax.nn.model",
    "init_model": "small4_jax.nn.model",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'small4_jax' has no attribute {name!r}")


def load_tokenizer(path):
    """A tokenizer from a `.model` (sentencepiece), a `tekken.json`, or a checkpoint directory holding one."""
    from small4_jax.inputs.tokenizer import load_tokenizer as _load

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
