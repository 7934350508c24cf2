"""The attention op in plain jax.numpy: the definition every backend is tested against.

    out[b, t, h] = sum_s softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h]      over the keys s that t may see

q [B, T, H, K] arrives already scaled (the softmax scale times the Llama-4 per-position factor is folded into q by
the caller), so there is no scale argument. Key s is visible to query t when

    k_positions[b, s] <= q_positions[b, t]  and  k_segments[b, s] == q_segments[b, t]

Key padding is expressed by the caller (`api.normalise_masks`) as an unreachable key position. A query that sees no
key at all (a padding query) gets zeros, not NaN, in every backend.

Scores, softmax and the log-sum-exp are float32 whatever the input dtype; probabilities are cast to v's dtype before
the value matmul (what the model did before this op existed). Memory is O(B H T S): this is the spec, not a path for
long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_positions, k_positions, q_segments, k_segments) -> jax.Array:
    """[B, T, S] bool: may query t see key s."""
    causal = k_positions[:, None, :] <= q_positions[:, :, None]
    return causal & (k_segments[:, None, :] == q_segments[:, :, None])


def attention_reference(q, k, v, q_positions, k_positions, q_segments, k_segments, *, return_lse: bool = False):
    """q [B, T, H, K], k [B, S, H, K], v [B, S, H, U], int32 positions/segments [B, T] / [B, S] -> [B, T, H, U].

    With return_lse, also the float32 log-sum-exp of each query's visible scores [B, H, T] (-inf for a query that
    sees nothing), the residual the blockwise and Pallas backwards use.
    """
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    mask = visible(q_positions, k_positions, q_segments, k_segments)[:, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    e = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))  # 0 at every hidden key
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(total > 0, total, 1.0)  # a query that sees nothing: all zeros (and zero gradients)
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)[..., 0]
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
