"""Next-token sampling from logits: greedy, temperature, top-k, top-p.

All settings except greedy-or-not are traced values, so changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from small4_jax.decode.sampler import filtered_logits
from small4_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class _Filters(NamedTuple):
    """The settings `batch_sampling.filtered_logits` reads, one value per row."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array


def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, *, greedy: bool) -> jax.Array:
    """logits [B, V] -> token ids [B] int32: argmax, or a draw from the serving sampler's filtered distribution
    (`batch_sampling.filtered_logits`, one implementation of temperature / top-k / top-p for both paths)."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b = logits.shape[0]
    rows = _Filters(*(jnp.broadcast_to(jnp.asarray(v, d), (b,)) for v, d in (
        (temperature, jnp.float32), (top_k, jnp.int32), (top_p, jnp.float32), (0.0, jnp.float32))))
    return jax.random.categorical(key, filtered_logits(logits, rows), axis=-1).astype(jnp.int32)
