"""Per-row next-token sampling for a batch of independent requests: greedy, temperature, top-k, top-p, min-p, seed.

Every setting is a traced array with one value per row, so requests with different settings share one compiled
step and changing them never recompiles. A row's random key is `fold_in(key(seed), counter)` where the counter is
the number of tokens the request has generated: a seeded request draws the same tokens whatever else is in the
batch. Temperature 0 is greedy (argmax of the raw logits). Logprobs are those of the model's distribution (raw
logits, before temperature and filtering), as OpenAI-compatible servers report them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Sampling settings of each row, arrays [B]: temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
    min_p (0 = off), seed and counter (int32)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    counter: jax.Array

    @classmethod
    def from_lists(cls, temperature, top_k, top_p, min_p, seed, counter) -> RowSampling:
        f32, i32 = np.float32, np.int32
        return cls(
            temperature=np.asarray(temperature, f32), top_k=np.asarray(top_k, i32), top_p=np.asarray(top_p, f32),
            min_p=np.asarray(min_p, f32), seed=np.asarray(seed, np.uint32).view(i32), counter=np.asarray(counter, i32),
        )

    @classmethod
    def greedy(cls, batch: int) -> RowSampling:
        zeros = [0] * batch
        return cls.from_lists(zeros, zeros, [1.0] * batch, zeros, zeros, zeros)


def filtered_logits(logits: jax.Array, p: RowSampling) -> jax.Array:
    """logits [B, V] / temperature with everything outside top-k, top-p and min-p set to -inf."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    # top-k: keep logits >= the k-th largest (k = 0 keeps everything)
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    keep = scaled >= kth
    # top-p: the smallest prefix of the (top-k) sorted distribution whose mass reaches top_p
    sorted_probs = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    cutoff = jnp.min(jnp.where(mass_before < p.top_p[:, None], sorted_desc, jnp.inf), axis=-1, keepdims=True)
    keep &= scaled >= cutoff
    # min-p: keep tokens whose probability is at least min_p times the largest one
    keep &= scaled >= sorted_desc[:, :1] + jnp.log(p.min_p)[:, None]
    return jnp.where(keep, scaled, -jnp.inf)


def sample_rows(logits: jax.Array, p: RowSampling, num_top: int):
    """logits [B, V] -> (tokens [B] int32, their logprobs [B], top ids [B, num_top], top logprobs [B, num_top])."""
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s.astype(jnp.uint32)), c))(p.seed, p.counter)
        sampled = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits, p)).astype(jnp.int32)
        return jnp.where(p.temperature > 0, sampled, greedy)

    tokens = jax.lax.cond(jnp.any(p.temperature > 0), draw, lambda _: greedy, None)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    return tokens, chosen, top_ids.astype(jnp.int32), top_logprobs
