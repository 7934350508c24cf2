"""Pallas kernel (Triton backend) for the grouped matmul with quantised weights: `gmm_quant_pallas`.

Same grid, metadata and masking as `pallas_triton.gmm_pallas` (work items of (segment, row tile), column tiles,
optional split K); the difference is the weight tile. The weights never exist in a float copy: each program loads
its tile of quantised values (fp8, int8, or int4 bytes), dequantises it in registers with its row of the scale grid
(`tile.astype(f32) * scale[group, tile_row // rows_per_scale, tile columns]`), casts to the activation dtype and
accumulates the dot in float32. Semantics: `reference.gmm_quant_reference` (dequantise, then `gmm_reference`).

Weights are the logical W [G, Kw, Nw] of `small4_jax.quant` (values [G, Kw, Nw], or [G, Kw/2, Nw] packed int4, and
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
from small4_jax.kernels.gmm.metadata import make_group_metadata, num_work_items
from small4_jax.kernels.gmm.tiling import GmmTiling

plgpu = pallas_triton.plgpu
_WHOLE = pl.BlockSpec()


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


def _dequant_tile(values_ref, scale_ref, g, r0, rows: int, col0, cols: int, row_mask, col_mask, *, transposed: bool,
                  rows_per_scale: int, group: int | None, dtype):
    """The float tile of W[g] at rows [r0, r0+rows), columns [col0, col0+cols); [cols, rows] when `transposed`."""
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
    q = plgpu.load(values_ref.at[g, pl.ds(vrow, rows), pl.ds(col0, cols)], mask=mask, other=fill)
    if group is None:
        w = q.astype(jnp.float32)
    else:
        q = q.astype(jnp.int32)
        w = (((q >> (4 * upper)) & 15) - 8).astype(jnp.float32)
    s = plgpu.load(scale_ref.at[g, r0 // rows_per_scale, pl.ds(col0, cols)], mask=col_mask, other=0)
    w = (w * s[None, :]).astype(dtype)
    return w.T if transposed else w


def _gmm_quant_kernel(seg_start_ref, seg_end_ref, seg_group_ref, work_seg_ref, work_tile_ref, num_work_ref, lhs_ref,
                      values_ref, scale_ref, out_ref, *, k: int, n: int, t: GmmTiling, k_per_split: int,
                      transpose_rhs: bool, rows_per_scale: int, group: int | None):
    bm, bk, bn = t.block_m, t.block_k, t.block_n
    w, j = pl.program_id(0), pl.program_id(1)
    split = pl.program_id(2) if t.split_k > 1 else 0

    @pl.when(w < num_work_ref[0])
    def _():
        seg = work_seg_ref[w]
        row0 = work_tile_ref[w] * bm
        lo = jnp.maximum(seg_start_ref[seg], row0)
        hi = jnp.minimum(seg_end_ref[seg], row0 + bm)
        grp = seg_group_ref[seg]
        rows = row0 + jnp.arange(bm, dtype=jnp.int32)
        row_mask = (rows >= lo) & (rows < hi)
        cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
        col_mask = cols < n
        k_begin = split * k_per_split
        steps = jnp.minimum((k - k_begin + bk - 1) // bk, k_per_split // bk)
        steps = steps * (grp >= 0).astype(jnp.int32)  # zero segments: no K steps (see pallas_triton on jnp.where)
        g = jnp.maximum(grp, 0)
        rows_slice, cols_slice = pl.ds(row0, bm), pl.ds(j * bn, bn)
        tile = functools.partial(_dequant_tile, values_ref, scale_ref, g, rows_per_scale=rows_per_scale,
                                 group=group, dtype=lhs_ref.dtype)

        def step(i, acc):
            k0 = k_begin + i * bk
            k_mask = (k0 + jnp.arange(bk, dtype=jnp.int32)) < k
            a = plgpu.load(lhs_ref.at[rows_slice, pl.ds(k0, bk)], mask=row_mask[:, None] & k_mask[None, :], other=0)
            if transpose_rhs:  # W[g] rows are the output columns, its columns the contraction: b = W tile^T
                b = tile(j * bn, bn, k0, bk, col_mask, k_mask, transposed=True)
            else:
                b = tile(k0, bk, j * bn, bn, k_mask, col_mask, transposed=False)
            return acc + jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                             precision=pallas_triton._dot_precision(a.dtype),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        mask = row_mask[:, None] & col_mask[None, :]
        if t.split_k > 1:
            plgpu.store(out_ref.at[split, rows_slice, cols_slice], acc, mask=mask)
        else:
            plgpu.store(out_ref.at[rows_slice, cols_slice], acc.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"))
def gmm_quant_pallas(lhs, values, scale, group_sizes, group_offset, *, tiling: GmmTiling, transpose_rhs: bool,
                     out_dtype, interpret: bool):
    """lhs [M, K] @ W[g] (or W[g]^T) per row group for quantised W (module docstring) -> [M, N].

    values [G, Kw(/2), Nw] (fp8 / int8 / uint8 int4), scale [G, Kb, Nw] float32 (columns expanded)."""
    pallas_triton._require_triton()
    m, k = lhs.shape
    num_groups = values.shape[0]
    packed = jnp.dtype(values.dtype) == jnp.uint8
    kw = values.shape[1] * (2 if packed else 1)
    nw = values.shape[2]
    kb = scale.shape[1]
    n = kw if transpose_rhs else nw
    t = quant_tiling(tiling, kw, kb, packed, transpose_rhs)
    meta = make_group_metadata(group_sizes, group_offset, num_groups, m, t.block_m)
    k_per_split = -(-(-(-k // t.split_k)) // t.block_k) * t.block_k
    grid = (num_work_items(m, num_groups, t.block_m), -(-n // t.block_n))
    if t.split_k > 1:
        grid += (t.split_k,)
        out_shape = jax.ShapeDtypeStruct((t.split_k, m, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    kernel = functools.partial(_gmm_quant_kernel, k=k, n=n, t=t, k_per_split=k_per_split, transpose_rhs=transpose_rhs,
                               rows_per_scale=kw // kb, group=(kw // kb) if packed else None)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[_WHOLE] * 9,
        out_specs=_WHOLE,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        name="small4_gmm_quant",
    )(*meta, lhs, values, scale)
    if t.split_k > 1:
        out = out.sum(0).astype(out_dtype)
    return out
