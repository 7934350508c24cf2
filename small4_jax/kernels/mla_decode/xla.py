"""Blockwise absorbed MLA attention over the paged cache in plain XLA: an online softmax over blocks of pages.

The loop runs over key blocks of `block_pages` pages with a trip count read from the data (the longest row's
visible keys), so the work of a step follows the keys actually held, not the page-table width, and the page-table
width is no longer a compiled shape that matters for memory: the temporaries are the running max / sum / output
([B, T, nh] and [B, T, nh, R], fp32) plus one block's scores [B, T, nh, block_pages * page]. Used for chunked prefill
(a chunk of T tokens costs T x prefix in latent form, with no re-expansion of the prefix through kv_b_proj) and on
platforms without the Pallas kernel. Semantics: `reference.mla_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mla_blockwise(q_lat, q_pe, pages, layer, page_table, seq_index, scale, *, block_pages: int = 16,
                  return_lse: bool = False):
    """q_lat [B, T, nh, R], q_pe [B, T, nh, r] over pages[layer] via page_table [B, W]; keys 0..seq_index[b, t]
    visible; scale [B, T]. Returns the attended latent [B, T, nh, R] in float32; with return_lse also its
    log-sum-exp [B, T, nh] (a query with no visible key, seq_index -1: output 0, lse -inf), the partial result a
    shard of a context-parallel cache returns (`combine_partials`)."""
    b, t, nh, r = q_lat.shape
    page = pages.shape[2]
    w = page_table.shape[1]
    block_pages = max(1, min(block_pages, w))
    n_blocks_max = -(-w // block_pages)
    table = jnp.pad(page_table, ((0, 0), (0, n_blocks_max * block_pages - w)))  # padding: the null page, masked
    block = block_pages * page
    n_keys = jnp.max(seq_index) + 1
    n_blocks = jnp.minimum((n_keys + block - 1) // block, n_blocks_max)
    dtype = q_lat.dtype
    scale = scale[:, :, None, None]  # [B, T, 1, 1]
    limit = seq_index[:, :, None, None]

    def body(j, carry):
        m, l, acc = carry
        pt = jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages, axis=1)  # [B, bp]
        keys = pages[layer, pt].reshape(b, block, pages.shape[3]).astype(dtype)
        latent, rope_key = keys[..., :r], keys[..., r:]
        s = jnp.einsum("bthr,bkr->bthk", q_lat, latent, preferred_element_type=jnp.float32)
        s += jnp.einsum("bthd,bkd->bthk", q_pe, rope_key, preferred_element_type=jnp.float32)
        s = s * scale
        key_index = j * block + jnp.arange(block, dtype=jnp.int32)
        s = jnp.where(key_index <= limit, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a query with no visible key so far (seq_index -1)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("bthk,bkr->bthr", p.astype(dtype), latent,
                                                  preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((b, t, nh), -jnp.inf, jnp.float32), jnp.zeros((b, t, nh), jnp.float32),
            jnp.zeros((b, t, nh, r), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    out = acc / l_safe[..., None]
    if return_lse:
        return out, jnp.where(has, m + jnp.log(l_safe), -jnp.inf)
    return out
