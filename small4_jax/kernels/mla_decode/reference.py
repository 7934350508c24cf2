"""The definition: absorbed (latent-space) MLA attention over a paged latent cache, materialising every score.

Per query token (row b, token t, head h) with its visible keys k = 0 .. seq_index[b, t] of row b:

    s_k   = scale[b, t] * (q_lat[b, t, h] . latent_k + q_pe[b, t, h] . rope_k)        (fp32)
    o     = sum_k softmax(s)_k latent_k                                               (latent space, R values)

where key k of row b is row `k % page` of page `page_table[b, k // page]` of `pages[layer]`, each row holding
[latent (R) ; rope key (r)]. The caller folds W_UK into q_lat beforehand and applies W_UV to o afterwards.

This is the reference every backend (the blockwise XLA loop, the Pallas kernel) is tested against; it gathers the
whole page-table width ([B, W * page, R + r]) and builds fp32 scores [B, nh, T, W * page], so it is for tests and
short contexts only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def latent_attention(q_lat, q_pe, keys, valid, scale, return_lse: bool = False):
    """q_lat [B, T, nh, R], q_pe [B, T, nh, r] over keys [B, K, R + r]; valid [B, T, K]; scale [B, T].

    Returns the attended latent [B, T, nh, R] in float32. Probabilities are rounded to the keys' dtype before the
    value product (as the expanded path rounds them to the model dtype). Products are taken in fp32 at full
    precision after that rounding: what a bf16 x bf16 -> fp32 dot computes, on any backend.
    """
    r = q_lat.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    hi = jax.lax.Precision.HIGHEST
    latent, rope_key = f32(keys[..., :r]), f32(keys[..., r:])
    scores = jnp.einsum("bthr,bkr->bhtk", f32(q_lat), latent, precision=hi)
    scores += jnp.einsum("bthd,bkd->bhtk", f32(q_pe), rope_key, precision=hi)
    scores = scores * scale[:, None, :, None]
    scores = jnp.where(valid[:, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, nh, T]; -inf where no key is visible
    has = jnp.isfinite(lse)[..., None]  # a query with no visible key (a context shard's): output 0
    probs = jnp.where(has, jax.nn.softmax(jnp.where(has, scores, 0.0), axis=-1), 0.0)
    probs = f32(probs.astype(keys.dtype))
    out = jnp.einsum("bhtk,bkr->bthr", probs, latent, precision=hi)
    return (out, lse.transpose(0, 2, 1)) if return_lse else out


def combine_partials(o, lse):
    """Merge attention over disjoint key sets: o [S, ..., R] (each normalised over its keys, fp32) and lse [S, ...]
    (their log-sum-exps; -inf for an empty set) -> (o [..., R], lse [...]), the attention over the union. A
    context-parallel cache's shards each return one partial (`mla_attention(return_lse=True)`)."""
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m_safe), 0.0)  # [S, ...]
    den = jnp.sum(w, axis=0)
    num = jnp.sum(w[..., None] * o, axis=0)
    has = den > 0
    out = num / jnp.where(has, den, 1.0)[..., None]
    return out, jnp.where(has, m_safe + jnp.log(jnp.where(has, den, 1.0)), -jnp.inf)


def gather_keys(pages, layer, page_table) -> jax.Array:
    """Rows of `page_table` [B, W] from pages [L, P, page, R + r] at `layer`: [B, W * page, R + r]."""
    b, w = page_table.shape
    return pages[layer, page_table].reshape(b, w * pages.shape[2], pages.shape[3])


def mla_reference(q_lat, q_pe, pages, layer, page_table, seq_index, scale, return_lse: bool = False):
    """Absorbed attention over the paged cache (see the module docstring): the attended latent [B, T, nh, R], fp32
    (with return_lse, and its log-sum-exp [B, T, nh])."""
    keys = gather_keys(pages, layer, page_table).astype(q_lat.dtype)
    key_index = jnp.arange(keys.shape[1], dtype=jnp.int32)
    valid = key_index[None, None, :] <= seq_index[:, :, None]
    return latent_attention(q_lat, q_pe, keys, valid, scale, return_lse)
