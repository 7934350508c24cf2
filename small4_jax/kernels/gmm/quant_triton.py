"""Pallas kernels (Triton backend) for the grouped matmul with quantised weights: `gmm_quant_pallas` (weight-only:
tiles dequantised in registers) and `gmm_w8a8_pallas` (fp8 x fp8: activations quantised with static scales).

Same grid, metadata and masking as `pallas_triton.gmm_pallas` (work items of (segment, row tile), column tiles,
optional split K); the difference is the weight tile. The weights never exist in a float copy: each program loads
its tile of quantised values (fp8, int8, or int4 bytes), dequantises it in registers with its row of the scale grid
(`tile.astype(f32) * scale[group, tile_row // rows_per_scale, tile columns]`), casts to the activation dtype and
accumulates the dot in float32. Semantics: `reference.gmm_quant_reference` (dequantise, then `gmm_reference`).

Weights are the logical W [G, Kw, Nw] of `small4_jax.quant.formats` (values [G, Kw, Nw], or [G, Kw/2, Nw] packed int4, and
the scale grid expanded along columns, [G, Kb, Nw]). `transpose_rhs` computes lhs @ W[g]^T (the input gradient,
dy @ W^T, for QLoRA) reading the same bytes.

Tile rule: a tile spans weight rows [r0, r0 + R) with R = block_k (or block_n when transposed). R must lie inside
one scale row (R divides Kw / Kb when Kb > 1) and, for int4, inside one half of one group (R divides g/2), where the
bytes are contiguous and hold one nibble: the tile is `(byte >> 4)` or `(byte & 15)`, minus 8. `quant_tiling` shrinks
the tiling to meet this.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from small4_jax.kernels.gmm import pallas_triton
from small4_jax.kernels.gmm.reference import row_groups
from small4_jax.kernels.gmm.tiling import GmmTiling
from small4_jax.quant.formats import quantize_act

plgpu = pallas_triton.plgpu


def row_block(kw: int, kb: int, packed: bool) -> int | None:
    """The weight-row span a tile must divide (None: any): a scale row, and for int4 half a group."""
    spans = []
    if kb > 1 or packed:
        spans.append(kw // kb)
    if packed:
        spans.append(kw // kb // 2)
    return min(spans) if spans else None


def quant_tiling(tiling: GmmTiling, kw: int, kb: int, packed: bool, transpose_rhs: bool) -> GmmTiling:
    """`tiling` with its weight-row tile (block_k, or block_n when transposed) shrunk to divide `row_block`."""
    span = row_block(kw, kb, packed)
    if span is None:
        return tiling
    field = "block_n" if transpose_rhs else "block_k"
    r = getattr(tiling, field)
    while r > 1 and span % r:
        r //= 2
    if r < 16:
        raise ValueError(f"gmm_quant: weight rows come in spans of {span} (scale rows / int4 half groups); a tile "
                         "needs a power of two >= 16 dividing it")
    return dataclasses.replace(tiling, **{field: r})


def _dequant_tile(values_ref, scale_ref, layer, g, r0, rows: int, col0, cols: int, row_mask, col_mask, *,
                  transposed: bool, rows_per_scale: int, group: int | None, dtype):
    """The float tile of W[layer, g] at rows [r0, r0+rows), columns [col0, col0+cols); [cols, rows] when
    `transposed`."""
    if group is None:
        vrow = r0
    else:  # int4: the half-group's bytes are contiguous; choose the nibble
        # arithmetic, not jnp.where (see pallas_triton: jax 0.10.2's Triton lowering and literal operands)
        gi = r0 // group
        off = r0 - gi * group  # not `%`: jnp.remainder's lowering meets the same literal-as-i1 problem
        upper = (off >= group // 2).astype(jnp.int32)
        vrow = gi * (group // 2) + off - upper * (group // 2)
    mask = row_mask[:, None] & col_mask[None, :]
    fill = 0.0 if jnp.issubdtype(values_ref.dtype, jnp.floating) else 0  # Triton casts no int literal to fp8
    q = plgpu.load(values_ref.at[layer, g, pl.ds(vrow, rows), pl.ds(col0, cols)], mask=mask, other=fill)
    if group is None:
        w = q.astype(jnp.float32)
    else:
        q = q.astype(jnp.int32)
        w = (((q >> (4 * upper)) & 15) - 8).astype(jnp.float32)
    s = plgpu.load(scale_ref.at[layer, g, r0 // rows_per_scale, pl.ds(col0, cols)], mask=col_mask, other=0)
    w = (w * s.astype(jnp.float32)[None, :]).astype(dtype)  # bf16 (int4) or float32 scales, widened exactly
    return w.T if transposed else w


def _quant_tile(weight_refs, layer, g, k0, k_mask, col0, col_mask, *, bk: int, bn: int, transpose_rhs: bool,
                rows_per_scale: int, group: int | None, dtype):
    """`pallas_triton._gmm_program`'s weight tile for quantised W: dequantised in registers, [bk, bn]."""
    values_ref, scale_ref = weight_refs
    tile = functools.partial(_dequant_tile, values_ref, scale_ref, layer, g, rows_per_scale=rows_per_scale, group=group,
                             dtype=dtype)
    if transpose_rhs:  # W[g] rows are the output columns, its columns the contraction: b = W tile^T
        b = tile(col0, bn, k0, bk, col_mask, k_mask, transposed=True)
    else:
        b = tile(k0, bk, col0, bn, k_mask, col_mask, transposed=False)
    return b, (((1,), (0,)), ((), ()))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"))
def gmm_quant_pallas(lhs, values, scale, group_sizes, group_offset, layer=None, *, tiling: GmmTiling,
                     transpose_rhs: bool, out_dtype, interpret: bool):
    """lhs [M, K] @ W[g] (or W[g]^T) per row group for quantised W (module docstring) -> [M, N].

    values [G, Kw(/2), Nw] (fp8 / int8 / uint8 int4), scale [G, Kb, Nw] float32 or bfloat16 (columns expanded);
    with `layer` (int32 scalar) both are stacks [L, G, ...] read at that layer in place."""
    if layer is None:
        values, scale, layer = values[None], scale[None], 0  # a stack of one layer (bitcasts)
    packed = jnp.dtype(values.dtype) == jnp.uint8
    kw = values.shape[2] * (2 if packed else 1)
    nw = values.shape[3]
    kb = scale.shape[2]
    t = quant_tiling(tiling, kw, kb, packed, transpose_rhs)
    load = functools.partial(_quant_tile, bk=t.block_k, bn=t.block_n, transpose_rhs=transpose_rhs,
                             rows_per_scale=kw // kb, group=(kw // kb) if packed else None, dtype=lhs.dtype)
    return pallas_triton.gmm_call(load, lhs, (values, scale), group_sizes, group_offset, layer,
                                  num_groups=values.shape[1],
                                  n=kw if transpose_rhs else nw, tiling=t, out_dtype=out_dtype, interpret=interpret,
                                  name="small4_gmm_quant")


# ----------------------------------------------------------------------------------------------------------------------
# W8A8: fp8 activations x fp8 weights.
def _fp8_tile(weight_refs, layer, g, k0, k_mask, col0, col_mask, *, bk: int, bn: int):
    """The weight tile as stored (fp8, [bk, bn]): no dequantisation, the scales come after the K loop."""
    values_ref = weight_refs[0]
    b = plgpu.load(values_ref.at[layer, g, pl.ds(k0, bk), pl.ds(col0, bn)], mask=k_mask[:, None] & col_mask[None, :],
                   other=0.0)  # a float literal: Triton casts no int literal to fp8
    return b, (((1,), (0,)), ((), ()))


def _w8a8_epilogue(acc, weight_refs, layer, g, col0, col_mask, *, bn: int, num_groups: int):
    """acc * s_x[g] * s_w[g, columns]: the fp8 x fp8 products back to real units, once per output tile."""
    _, scale_ref, act_ref = weight_refs
    s_w = plgpu.load(scale_ref.at[layer, g, pl.ds(col0, bn)], mask=col_mask, other=0.0)  # scale_ref [L, G, N]
    return acc * (s_w.astype(jnp.float32) * act_ref[layer * num_groups + g])[None, :]


def quantize_rows(lhs, act_scale, group_sizes, group_offset, layer=None):
    """lhs [M, K] in e4m3, each row with its group's static scale (`quant.quantize_act`; rows outside the window
    with the first group's: the kernel never reads them). act_scale [G] or a stack [L, G] read at `layer`."""
    if layer is not None:
        act_scale = jax.lax.dynamic_index_in_dim(act_scale, layer, 0, keepdims=False)
    local = jnp.maximum(row_groups(group_sizes, group_offset, act_scale.shape[0], lhs.shape[0]), 0)
    return quantize_act(lhs, act_scale.astype(jnp.float32)[local][:, None])


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def gmm_w8a8_pallas(lhs, values, scale, act_scale, group_sizes, group_offset, layer=None, *, tiling: GmmTiling,
                    out_dtype, interpret: bool):
    """lhs [M, K] @ W[g] per row group with W8A8 (module docstring) -> [M, N].

    values [G, K, N] fp8, scale [G, 1, N] float32 (one row: per expert or per column, columns expanded), act_scale
    [G] float32 (the experts' static activation scales); with `layer` (int32 scalar) all three are stacks [L, G, ...]
    read at that layer in place. lhs is quantised here, row by row with its expert's scale (one fused XLA pass over
    [M, K]: each row once, not once per column tile), and enters the kernel as fp8."""
    if layer is None:
        values, scale, act_scale, layer = values[None], scale[None], act_scale[None], 0
    num_layers, num_groups, k, n = values.shape
    if scale.shape[2] != 1:
        raise ValueError(f"gmm W8A8: the weight scale grid has {scale.shape[2]} row blocks; the fp8 x fp8 product "
                         "scales after the K loop, so it needs one scale per expert or per column")
    q = quantize_rows(lhs, act_scale, group_sizes, group_offset, layer).astype(values.dtype)
    load = functools.partial(_fp8_tile, bk=tiling.block_k, bn=tiling.block_n)
    epilogue = functools.partial(_w8a8_epilogue, bn=tiling.block_n, num_groups=num_groups)
    act = jnp.reshape(act_scale.astype(jnp.float32), (num_layers * num_groups,))
    scale = jnp.reshape(scale, (num_layers, num_groups, n))  # the one scale row (a bitcast)
    return pallas_triton.gmm_call(load, q, (values, scale, act), group_sizes, group_offset, layer,
                                  num_groups=num_groups, n=n, tiling=tiling, out_dtype=out_dtype,
                                  interpret=interpret, name="small4_gmm_w8a8", epilogue=epilogue)
