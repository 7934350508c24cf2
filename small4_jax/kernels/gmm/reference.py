"""The grouped matmul in plain jax.numpy: the definition that every backend of `gmm` / `tgmm` is tested against.

Rows of `lhs` are sorted by group: group g owns rows [offsets[g], offsets[g+1]) with offsets = [0, cumsum(sizes)].
A call sees a window of `num_groups` consecutive groups starting at `group_offset` (the experts held by one device
under expert parallelism); `rhs` holds exactly those groups.

    gmm:   out[r]  = lhs[r] @ rhs[g(r) - group_offset]   for rows of groups in the window, 0 for every other row
    tgmm:  out[j]  = lhs[rows of group group_offset + j]^T @ rhs[same rows]   (0 for an empty group)

Rows outside the window include the rows past sum(group_sizes): they are defined (zero), never garbage.
This evaluates every local group on every row and masks (O(G) work): fine for tests, never for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from small4_jax.quant.formats import column_scale, dequantize, quantize_act


def row_groups(group_sizes: jax.Array, group_offset, num_groups: int, num_rows: int) -> jax.Array:
    """Local group of every row [num_rows] int32: g - group_offset for rows of window groups, -1 for all others."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    global_group = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)  # = G for rows past the sum
    local = global_group - jnp.asarray(group_offset, jnp.int32)
    return jnp.where((local >= 0) & (local < num_groups), local, -1)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset=0,
    *,
    layer=None,
    transpose_rhs: bool = False,
    preferred_element_type=None,
) -> jax.Array:
    """lhs [M, K] @ rhs [G_local, K, N] (or [G_local, N, K] with transpose_rhs) per row group -> [M, N].

    With `layer`, rhs is a stack [L, G_local, ...] and rhs[layer] is used (the kernels read it in place)."""
    if layer is not None:
        rhs = rhs[layer]
    out_dtype = preferred_element_type or lhs.dtype
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    local = row_groups(group_sizes, group_offset, w.shape[0], lhs.shape[0])
    onehot = (local[:, None] == jnp.arange(w.shape[0])[None, :]).astype(jnp.float32)  # [M, G]
    y = jnp.einsum("mk,gkn->gmn", lhs, w.astype(lhs.dtype), preferred_element_type=jnp.float32,
                   precision=_precision(lhs.dtype))
    return jnp.einsum("gmn,mg->mn", y, onehot, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def tgmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset=0,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
) -> jax.Array:
    """Per-group lhs[rows]^T @ rhs[rows]: lhs [M, K], rhs [M, N] -> [num_groups, K, N] (default: all groups)."""
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    out_dtype = preferred_element_type or lhs.dtype
    local = row_groups(group_sizes, group_offset, num_groups, lhs.shape[0])
    onehot = (local[:, None] == jnp.arange(num_groups)[None, :]).astype(lhs.dtype)  # [M, G]; exact in any dtype
    masked = jnp.einsum("mk,mg->gmk", lhs, onehot)
    out = jnp.einsum("gmk,mn->gkn", masked, rhs.astype(lhs.dtype), preferred_element_type=jnp.float32,
                     precision=_precision(lhs.dtype))
    return out.astype(out_dtype)


def gmm_quant_reference(lhs: jax.Array, rhs, group_sizes: jax.Array, group_offset=0, *, layer=None,
                        transpose_rhs: bool = False, preferred_element_type=None) -> jax.Array:
    """`gmm_reference` on quantised weights (`small4_jax.quant.formats.QArray` [G, K, N]): dequantise in float32, then the
    weights are cast to lhs.dtype exactly as the kernel casts each dequantised tile. With `layer`, values and scales
    are stacks [L, G, ...] and their slices at `layer` are used."""
    if layer is not None:
        rhs = jax.tree.map(lambda a: a[layer], rhs)

    return gmm_reference(lhs, dequantize(rhs, jnp.float32).astype(lhs.dtype), group_sizes, group_offset,
                         transpose_rhs=transpose_rhs, preferred_element_type=preferred_element_type)


def gmm_w8a8_reference(lhs: jax.Array, rhs, group_sizes: jax.Array, group_offset=0, *, layer=None,
                       preferred_element_type=None) -> jax.Array:
    """The W8A8 grouped matmul (`quant_triton.gmm_w8a8_pallas`) in plain jax.numpy: rhs a `quant.QArray` [G, K, N]
    of fp8 values, one weight-scale row per expert [G, 1, N'] and the static activation scales `act_scale`
    [G, 1, 1]. Row r of group g: q = clamp(lhs[r] / s_x[g], +-448) in e4m3; out[r] = (q @ values[g]) * s_x[g] *
    s_w[g, column], the products and sums in float32 at full precision. Zero outside the window."""
    if layer is not None:
        rhs = jax.tree.map(lambda a: a[layer], rhs)
    out_dtype = preferred_element_type or lhs.dtype
    num_groups = rhs.values.shape[0]
    s_x = rhs.act_scale.reshape(num_groups).astype(jnp.float32)
    s_w = column_scale(rhs)[:, 0, :].astype(jnp.float32)  # [G, N]
    q = jax.vmap(lambda s: quantize_act(lhs, s).astype(jnp.float32))(s_x)  # [G, M, K]: each group's quantisation
    y = jnp.einsum("gmk,gkn->gmn", q, rhs.values.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    y = y * (s_x[:, None, None] * s_w[:, None, :])
    local = row_groups(group_sizes, group_offset, num_groups, lhs.shape[0])
    onehot = (local[:, None] == jnp.arange(num_groups)[None, :]).astype(jnp.float32)  # [M, G]
    return jnp.einsum("gmn,mg->mn", y, onehot, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)
