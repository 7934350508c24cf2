"""Paged latent cache and absorbed-MLA attention: the serving engine's forward pass over `Small4ForCausalLM`.

What is cached (ARCHITECTURE.md §2): per token and layer, the normalised latent c~ (kv_lora_rank values) and the
RoPE'd shared key r (qk_rope_head_dim values), side by side in one row of kv_lora_rank + qk_rope_head_dim values
(320 for Small 4). Rows live in fixed-size pages, `PagedCache.pages` [L, num_pages, page_size, R + r]; a sequence
owns a list of pages (its page table), so memory follows the tokens held. Page 0 is the null page: it is never
handed to a sequence, padded page-table entries point to it and padded tokens write into it.

Attention over the cache, chosen statically by `absorbed`:
- absorbed (the engine's path, prefill chunks and decode alike): W_UK is folded into the query,
  q~_h = W_UK[h]^T q_nope_h, so the scores are an MQA with one 320-wide key per token, [q~_h ; q_pe_h] . [c~_t ; r_t];
  the values are the first R columns of the same rows, and W_UV is applied to the attended latent afterwards. The
  softmax scale stays 1/sqrt(qk_head_dim) times the Llama-4 factor of the query position (never 1/sqrt(320)). It
  runs over the pages in place (`small4_jax.kernels.mla_decode`, backend `impl`): the ragged split-KV Pallas kernel
  on GPUs, a blockwise online-softmax loop elsewhere, "reference" (every score materialised) for tests. A prefill
  chunk of T tokens over a prefix of K tokens costs T x K in latent form with temporaries of one key block, never
  the prefix re-expanded through kv_b_proj, and a step's work follows the keys held, not the page-table width.
- expanded (the reference): the gathered latents go through kv_b_proj into per-head k_nope / v, as `model.MLA`
  does, materialising every score over the page-table width.

The pass reuses the model's own submodules and parameters (norms, MLA linears, MoE / MLP, lm_head); nothing is
copied. `forward` takes explicit token positions (RoPE and the Llama-4 scale) separately from each token's index in
its sequence (cache slot and causal mask), so a test can place a sequence at any position up to 262,144 without
filling the cache below it. T is any number of tokens per row (1 for decode, a chunk for prefill, k + 1 for a
speculative verify step): token t of row b sees the keys 0 .. seq_index[b, t] of its row.

A sharded cache (`cache_axes`, data-parallel attention): the pages axis is split over mesh axes (`cache_spec`), the
batch rows with it in order, and each layer's cache write and attention run in a shard_map in which a shard sees
only its own pages (page ids are the shard's own, each shard has its own null page 0) and its own rows; everything
else (projections, the expert-parallel MoE) stays as XLA and the MoE place it.

This module knows nothing about requests, scheduling or tokenizers (that is `infer/engine/engine.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from small4_jax.decode.sampler import RowSampling, TokenHistory, sample_rows
from small4_jax.config import Small4Config
from small4_jax.kernels.mla_decode import combine_partials, gather_keys, mla_attention
from small4_jax.nn.model import (Small4ForCausalLM, layer_groups, llama4_query_scale, record_ids, rope_cos_sin,
                                 routing_buffers, run_layers, tokens_first)
from small4_jax.nn.moe import AtLayer
from small4_jax.parallel.sharding import RULES, batch_axes, mesh_of

NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedCache:
    """`pages` [L, num_pages, page_size, kv_lora_rank + qk_rope_head_dim]: latent then RoPE'd key in each row."""

    pages: jax.Array

    @classmethod
    def create(cls, config: Small4Config, num_pages: int, page_size: int, dtype="float32", sharding=None):
        shape = (config.num_hidden_layers, num_pages, page_size, cache_width(config))
        if sharding is not None:
            pages = jax.jit(lambda: jnp.zeros(shape, jnp.dtype(dtype)), out_shardings=sharding)()
        else:
            pages = jnp.zeros(shape, jnp.dtype(dtype))
        return cls(pages=pages)

    @property
    def num_pages(self) -> int:
        return self.pages.shape[1]

    @property
    def page_size(self) -> int:
        return self.pages.shape[2]


def cache_width(config: Small4Config) -> int:
    """Values cached per token per layer: kv_lora_rank + qk_rope_head_dim (320 for Small 4)."""
    return config.kv_lora_rank + config.qk_rope_head_dim


def cache_bytes_per_token_per_layer(config: Small4Config, dtype) -> int:
    """Bytes of cache per token per layer: cache_width x dtype bytes (640 for Small 4 in bf16)."""
    return cache_width(config) * jnp.dtype(dtype).itemsize


def _kernel(linear, din: int, dtype) -> jax.Array:
    """The [in, out] matrix of a bias-free linear module.

    A plain `nnx.Linear` gives its kernel; a module with `effective_kernel()` (a LoRA-wrapped linear) gives that;
    any other linear-like module is evaluated on the identity, which yields its effective matrix.
    """
    if type(linear) is nnx.Linear and linear.bias is None:
        kernel = linear.kernel[...]
        return (kernel.get() if isinstance(kernel, AtLayer) else kernel).astype(dtype)  # a stack: slice the layer
    if hasattr(linear, "row_lora"):  # per-row adapters (multi_lora.py): the base here, each row's adapter in low rank
        return linear.base_kernel(dtype)
    if hasattr(linear, "effective_kernel") and getattr(linear, "bias", None) is None:
        return linear.effective_kernel().astype(dtype)
    return linear(jnp.eye(din, dtype=dtype))


def _absorbed_weights(attn, config: Small4Config, dtype) -> tuple[jax.Array, jax.Array]:
    """W_UK [R, nh, dn] and W_UV [R, nh, dv]: the key and value halves of kv_b_proj's (effective) kernel."""
    r, nh, dn = config.kv_lora_rank, config.num_attention_heads, config.qk_nope_head_dim
    w_kvb = _kernel(attn.kv_b_proj, r, dtype).reshape(r, nh, dn + config.v_head_dim)
    return w_kvb[..., :dn], w_kvb[..., dn:]


def context_limit(seq_index, page_size: int, shards: int, shard):
    """The last visible key of each query among the keys one shard of a context-parallel cache holds (-1: none).

    Pages are dealt to the shards by position: page j of a sequence (keys j * page_size ...) lives on shard
    j % shards, at column j // shards of that shard's page table. A query sees keys 0 .. seq_index of its sequence,
    which on shard s are the first `context_limit + 1` keys of its own table (their positions grow with the column)."""
    n = seq_index + 1
    full, rem = n // page_size, n % page_size
    pages = jnp.maximum(0, (full - shard + shards - 1) // shards)
    return pages * page_size + jnp.where(full % shards == shard, rem, 0) - 1


def _write_and_attend(pages, rows, slots, q_lat, q_pe, page_table, seq_index, scale, layer, *, impl: str,
                      context_axes: tuple[str, ...] = ()):
    """Write the new tokens' rows [B, T, R + r] at slots [B, T, 2] of `layer` (an int, or a traced int32 under
    the layer scan), then attend over the pages: the
    attended latent [B, T, nh, R] (fp32) and the pages. Page ids are those of the `pages` given (a shard's own,
    inside the sharded cache's shard_map).

    context_axes (inside the shard_map): the cache's pages are split by position over these axes
    (`context_limit`): a token's row is written on the shard owning its position only (elsewhere into the null
    page), each shard attends over its own keys, and the partial results (output and log-sum-exp) are all-gathered
    over the axes and merged (`combine_partials`)."""
    b, t = seq_index.shape
    page_ids = slots[..., 0]
    limit = seq_index
    if context_axes:
        shards = math.prod(jax.lax.axis_size(a) for a in context_axes)
        me = jax.lax.axis_index(context_axes)
        size = pages.shape[2]
        page_ids = jnp.where((seq_index // size) % shards == me, page_ids, NULL_PAGE)
        limit = context_limit(seq_index, size, shards, me)
    pages = pages.at[layer, page_ids.reshape(-1), slots[..., 1].reshape(-1)].set(
        rows.reshape(b * t, -1).astype(pages.dtype))
    if not context_axes:
        return mla_attention(q_lat, q_pe, pages, layer, page_table, seq_index, scale, impl=impl), pages
    out, lse = mla_attention(q_lat, q_pe, pages, layer, page_table, limit, scale, impl=impl, return_lse=True)
    both = jax.lax.all_gather(jnp.concatenate([out, lse[..., None]], axis=-1), context_axes)  # one collective
    out, _ = combine_partials(both[..., :-1], both[..., -1])
    return out, pages


def cache_spec(cache_axes: tuple[str, ...], context_axes: tuple[str, ...] = ()) -> PartitionSpec:
    """The PartitionSpec of a cache sharded over `cache_axes` (rows' pages, data-parallel attention) and then
    `context_axes` (one sequence's pages by position): its page axis, [L, P, page, R + r]."""
    return PartitionSpec(None, tuple(cache_axes) + tuple(context_axes) or None)


def default_cache_axes(mesh, max_batch: int | None, context_axes: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The axes the engine shards the cache's pages (and its rows) over when not told (`Engine(cache_axes=None)`):
    none when one sequence's pages are split by position (`context_axes`), else the batch axes of `sharding.RULES`
    the mesh has with more than one device, as far as their sizes divide `max_batch` (`sharding.batch_axes`). The
    planner sizes its cache with the same axes."""
    if mesh is None or context_axes:
        return ()
    return batch_axes(mesh, max_batch)


def head_axis(mesh, num_heads: int, taken: tuple[str, ...] = ()) -> str | None:
    """The mesh axis the attention heads are sharded over (`RULES["heads"]` where it is in `mesh` with more than one
    shard, divides the heads and is not one of `taken`), else None."""
    axis = RULES["heads"]
    if mesh is None or axis in taken or mesh.shape.get(axis, 1) == 1 or num_heads % mesh.shape[axis]:
        return None
    return axis


def absorbed_attention(attn, config: Small4Config, q_nope, q_pe, rows, pages, layer, slots, page_table, seq_index,
                       scale, *, impl: str = "auto", cache_axes: tuple[str, ...] = (),
                       context_axes: tuple[str, ...] = ()):
    """Write `rows` into the cache, then attention of q_nope / q_pe [B, T, nh, *] over the cached rows of `layer`
    with W_UK folded into the query and W_UV applied to the attended latent; returns ([B, T, nh * dv], pages).

    cache_axes: mesh axes the cache's pages (and the batch rows) are sharded over; each shard writes and reads only
    its own pages for its own rows (data-parallel attention) inside a shard_map over the context mesh.
    context_axes: mesh axes one sequence's pages are split over by position (`_write_and_attend`); page_table
    [B, shards * W'] then holds each shard's W' columns in turn. On a mesh whose `tensor` axis shards the heads
    (and is not a context axis) each shard attends for its own heads, in the same shard_map.
    """
    b, t, nh, _ = q_nope.shape
    dtype = q_nope.dtype
    w_uk, w_uv = _absorbed_weights(attn, config, dtype)
    row_lora = getattr(attn.kv_b_proj, "row_lora", None)  # multi-LoRA serving: each row's kv_b_proj adapter
    q_lat = jnp.einsum("bthd,rhd->bthr", q_nope, w_uk, preferred_element_type=jnp.float32)
    if row_lora is not None:
        q_lat = q_lat + row_lora.absorb_query(q_nope)
    q_lat = q_lat.astype(dtype)
    attend = functools.partial(_write_and_attend, impl=impl, context_axes=tuple(context_axes))
    mesh = mesh_of(q_lat)
    heads = head_axis(mesh, nh, tuple(cache_axes) + tuple(context_axes))
    if cache_axes or context_axes or heads:
        rows_spec = PartitionSpec(tuple(cache_axes) or None)
        q_spec = PartitionSpec(tuple(cache_axes) or None, None, heads)
        table_spec = PartitionSpec(tuple(cache_axes) or None, tuple(context_axes) or None)
        # every mesh axis manual: the attention of a shard's rows (heads) is replicated over the other axes
        attend = jax.shard_map(attend, in_specs=(cache_spec(cache_axes, context_axes), rows_spec, rows_spec, q_spec,
                                                 q_spec, table_spec, rows_spec, rows_spec, PartitionSpec()),
                               out_specs=(q_spec, cache_spec(cache_axes, context_axes)), check_vma=False)
    o_lat, pages = attend(pages, rows, slots, q_lat, q_pe, page_table, seq_index, scale,
                          jnp.asarray(layer, jnp.int32))
    o_lat = o_lat.astype(dtype)
    out = jnp.einsum("bthr,rhd->bthd", o_lat, w_uv, preferred_element_type=jnp.float32)
    if row_lora is not None:
        out = out + row_lora.absorb_output(o_lat, config.qk_nope_head_dim)
    return out.astype(dtype).reshape(b, t, nh * config.v_head_dim), pages


def embed(model: Small4ForCausalLM, ids: jax.Array, batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """The embeddings of ids [B, T]. With the table's vocab sharded over a mesh axis (the tensor-parallel layout),
    each shard looks up the ids in its rows and a psum over the axis combines them (one [B, T, H] all-reduce, where
    XLA would all-gather the whole table); `batch_axes`: the axes the rows are split over (data-parallel)."""
    table = model.embed_tokens.embedding[...]
    mesh = mesh_of(table)
    axis = RULES["vocab"]
    if mesh is None or mesh.shape.get(axis, 1) == 1 or table.shape[0] % mesh.shape[axis] or axis in batch_axes:
        return model.embed_tokens(ids)

    def local(tab, ids):
        n = tab.shape[0]
        i = ids - jax.lax.axis_index(axis) * n
        ok = (i >= 0) & (i < n)
        rows = jnp.where(ok[..., None], jnp.take(tab, jnp.clip(i, 0, n - 1), axis=0), 0)
        return jax.lax.psum(rows, axis)

    spec = PartitionSpec(tuple(batch_axes) or None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axis, None), spec), out_specs=spec,
                        check_vma=False)(table, ids)
    return out.astype(model.embed_tokens.dtype or out.dtype)


def expanded_attention(attn, config: Small4Config, q_nope, q_pe, pages, layer, page_table, seq_index,
                       scale) -> jax.Array:
    """The reference: the rows of `layer` gathered over the page-table width and expanded by kv_b_proj into
    per-head keys and values, every score materialised; returns [B, T, nh * dv]."""
    b, t, nh, dn = q_nope.shape
    r, dv = config.kv_lora_rank, config.v_head_dim
    keys = gather_keys(pages, layer, page_table).astype(q_nope.dtype)  # [B, W * page, R + r]
    valid = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, None, :] <= seq_index[:, :, None]  # [B, T, K]
    kv = attn.kv_b_proj(keys[..., :r]).reshape(b, keys.shape[1], nh, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    scores = jnp.einsum("bthd,bkhd->bhtk", q_nope, k_nope, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bthd,bkd->bhtk", q_pe, keys[..., r:], preferred_element_type=jnp.float32)
    scores = jnp.where(valid[:, None], scores * scale[:, None, :, None], -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_nope.dtype)
    return jnp.einsum("bhtk,bkhd->bthd", probs, v).reshape(b, t, nh * dv)


def forward(
    model: Small4ForCausalLM,
    pages: jax.Array,
    ids: jax.Array,
    positions: jax.Array,
    seq_index: jax.Array,
    slots: jax.Array,
    page_table: jax.Array,
    logit_index: jax.Array,
    *,
    absorbed: bool = True,
    impl: str = "auto",
    cache_axes: tuple[str, ...] = (),
    with_hidden: bool = False,
    input_embeds: jax.Array | None = None,
    context_axes: tuple[str, ...] = (),
    record_routing: bool = False,
):
    """Run new tokens through the model over the paged cache; returns (logits [B, V] at `logit_index`, pages).

    ids, positions [B, T]: the new tokens and their RoPE positions. seq_index [B, T]: each token's index in its
    sequence (keys 0..seq_index are visible to it). slots [B, T, 2]: (page, offset) each token's row is written to
    (padding: the null page). page_table [B, W]: the pages of each sequence, in order (padding: the null page).
    logit_index [B]: which of the T tokens to produce logits for; [B, T'] gives logits [B, T', V] (speculative
    verification scores every draft position). `with_hidden` also returns the final-normed hidden states of all T
    tokens (what an EAGLE draft head reads): (logits, pages, hidden [B, T, H]). input_embeds [B, T, H], if given,
    replaces the embedding lookup (an EAGLE draft's fused input; image features in the [IMG] rows of a prompt chunk,
    small4_jax.nn.vision). absorbed / impl: the attention (module docstring; impl is the `kernels.mla_decode` backend
    of the absorbed path). cache_axes: the mesh axes the pages are sharded over (`cache_spec`; run under
    `jax.set_mesh`): then the batch rows are split over them in order (row block s on shard s) and slots /
    page_table hold each shard's own page ids. context_axes: the mesh axes one sequence's pages are split over by
    position (decode context parallelism, `absorbed_attention`): page_table holds each context shard's own page ids,
    shard after shard, and slots the owner's. record_routing (rollout routing replay: train/grpo.py) appends the
    expert ids every MoE layer routed each of the T tokens to, [B, T, L, k] int16 (-1 in dense layers), to what is
    returned; off, the program is the one without it.
    """
    if (cache_axes or context_axes) and not absorbed:
        raise ValueError("the expanded reference attention does not take a sharded cache (cache_axes, context_axes)")
    config = model.config
    b, t = ids.shape
    cos, sin = rope_cos_sin(config, positions)
    scale = config.attn_softmax_scale * llama4_query_scale(config, positions)  # [B, T]
    write_page, write_offset = slots[..., 0].reshape(-1), slots[..., 1].reshape(-1)
    slots = jnp.asarray(slots, jnp.int32)

    h = embed(model, jnp.asarray(ids, jnp.int32), tuple(cache_axes)) if input_embeds is None else input_embeds

    def layer_fn(layer, i, h, carry):
        """One layer over the stacked pages [L, ...] (the scan's carry: written in place at layer i; with
        record_routing, the expert ids recorded so far beside them)."""
        pages, rec = carry if record_routing else (carry, None)

        def attend(attn, a):
            rows = jnp.concatenate(attn.latent(a, cos, sin), axis=-1)  # [B, T, R + r]
            q_nope, q_pe = attn.query(a, cos, sin)
            if absorbed:
                out, new_pages = absorbed_attention(attn, config, q_nope, q_pe, rows, pages, i, slots, page_table,
                                                    seq_index, scale, impl=impl, cache_axes=cache_axes,
                                                    context_axes=context_axes)
            else:
                new_pages = pages.at[i, write_page, write_offset].set(rows.reshape(b * t, -1).astype(pages.dtype))
                out = expanded_attention(attn, config, q_nope, q_pe, new_pages, i, page_table, seq_index, scale)
            return attn.o_proj(out), new_pages

        if not record_routing:
            return layer.residual(h, attend)
        h, pages, ids = layer.residual(h, attend, return_ids=True)
        return h, (pages, record_ids(rec, i, ids))

    carry = (pages, routing_buffers(config, b * t)) if record_routing else pages
    h, carry = run_layers(model.layer_stacks, layer_groups(config), h, carry, layer_fn,
                          scan=getattr(model, "scan_layers", True), dense=config.dense_impl)
    pages, rec = carry if record_routing else (carry, None)
    # the expert ids each token was routed to, [B, T, L, k] (int16: ids < 32768; -1 in dense layers)
    routed = (tokens_first(rec[0], b, t).astype(jnp.int16),) if record_routing else ()
    index = logit_index if logit_index.ndim == 2 else logit_index[:, None]
    normed = model.norm(h) if with_hidden else None
    last = jnp.take_along_axis(normed, index[:, :, None], axis=1) if with_hidden \
        else model.norm(jnp.take_along_axis(h, index[:, :, None], axis=1))  # [B, T', H]
    last = last if logit_index.ndim == 2 else last[:, 0]
    logits = model.embed_tokens.attend(last) if model.lm_head is None else model.lm_head(last)
    return (logits, pages, normed, *routed) if with_hidden else (logits, pages, *routed)


@functools.partial(jax.jit, static_argnames=("graphdef", "absorbed", "impl", "cache_axes", "num_top", "context_axes"),
                   donate_argnames=("pages", "history"))
def step(
    graphdef,
    state,
    pages: jax.Array,
    history: TokenHistory,
    ids: jax.Array,
    positions: jax.Array,
    seq_index: jax.Array,
    slots: jax.Array,
    page_table: jax.Array,
    logit_index: jax.Array,
    sampling: RowSampling,
    *,
    absorbed: bool = True,
    impl: str = "auto",
    cache_axes: tuple[str, ...] = (),
    num_top: int,
    context_axes: tuple[str, ...] = (),
):
    """`forward` then per-row sampling (`batch_sampling.sample_rows`), jitted with the cache and the token history
    donated.

    Returns (tokens [B], their logprobs [B], top ids [B, num_top], top logprobs [B, num_top], history, pages).
    """
    model = nnx.merge(graphdef, state)
    logits, pages = forward(model, pages, ids, positions, seq_index, slots, page_table, logit_index,
                            absorbed=absorbed, impl=impl, cache_axes=cache_axes, context_axes=context_axes)
    return (*sample_rows(logits, sampling, history, num_top), pages)


@functools.partial(jax.jit, static_argnames=("graphdef", "absorbed", "impl", "cache_axes", "context_axes",
                                             "record_routing"), donate_argnames=("pages",))
def logits_step(graphdef, state, pages, ids, positions, seq_index, slots, page_table, logit_index, *,
                absorbed=True, impl="auto", input_embeds=None, cache_axes=(), context_axes=(), record_routing=False):
    """`forward` jitted, returning (logits [B, V], pages): the engine's model step (input_embeds, cache_axes,
    record_routing (then also the routed expert ids [B, T, L, k]): see `forward`)."""
    model = nnx.merge(graphdef, state)
    return forward(model, pages, ids, positions, seq_index, slots, page_table, logit_index, absorbed=absorbed,
                   impl=impl, input_embeds=input_embeds, cache_axes=cache_axes, context_axes=context_axes,
                   record_routing=record_routing)
