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


def latent_attention(q_lat, q_pe, keys, valid, scale) -> jax.Array:
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
    probs = f32(jax.nn.softmax(scores, axis=-1).astype(keys.dtype))
    return jnp.einsum("bhtk,bkr->bthr", probs, latent, precision=hi)


def gather_keys(pages, layer, page_table) -> jax.Array:
    """Rows of `page_table` [B, W] from pages [L, P, page, R + r] at `layer`: [B, W * page, R + r]."""
    b, w = page_table.shape
    return pages[layer, page_table].reshape(b, w * pages.shape[2], pages.shape[3])


def mla_reference(q_lat, q_pe, pages, layer, page_table, seq_index, scale) -> jax.Array:
    """Absorbed attention over the paged cache (see the module docstring): the attended latent [B, T, nh, R], fp32."""
    keys = gather_keys(pages, layer, page_table).astype(q_lat.dtype)
    key_index = jnp.arange(keys.shape[1], dtype=jnp.int32)
    valid = key_index[None, None, :] <= seq_index[:, :, None]
    return latent_attention(q_lat, q_pe, keys, valid, scale)
