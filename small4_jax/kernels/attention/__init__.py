"""Softmax attention for training and prefill (and the model's latent-cache step): `api.py` for the function and its
backends, `reference.py` for the definition, `blockwise.py` (XLA) and `pallas_triton.py` (GPU) for the O(T) paths."""

from small4_jax.kernels.attention.api import BACKENDS, attention, normalise_masks, resolve_impl
from small4_jax.kernels.attention.blockwise import blockwise_attention, blockwise_attention_lse
from small4_jax.kernels.attention.reference import attention_reference, visible

__all__ = [
    "BACKENDS",
    "attention",
    "attention_reference",
    "blockwise_attention",
    "blockwise_attention_lse",
    "normalise_masks",
    "resolve_impl",
    "visible",
]
