"""Pallas kernels (Triton backend) for the grouped matmul: `gmm_pallas` (forward and input gradient) and `tgmm_pallas`
(weight gradient). Semantics are those of `reference.py`; the custom VJP lives in `api.py`.

gmm: grid (work item, column tile[, K split]). Work item w is one (segment, row tile) pair from `metadata.py`; the
program loads the metadata scalars, loops over K in block_k steps accumulating lhs_tile @ rhs[group] tile in float32,
and stores only the rows of its segment. Zero segments (rows outside the window) run no K steps and store zeros, so
every output row is defined. With split_k > 1 (decode tiling) each program covers one K slice and writes a float32
partial [split_k, M, N], summed by XLA afterwards.

tgmm: grid (local group, K tile, N tile). Each program loops over its group's rows in block_m chunks accumulating
lhs_chunk^T @ rhs_chunk; an empty group runs no steps and writes zeros.

Loads are masked (rows outside the segment, K and N edges) with zero fill, so M, K and N need not be multiples of
the tiles. Every array is passed whole (no BlockSpec blocking): tiles are addressed with dynamic `pl.ds` slices.

On a CPU the same kernels run under Pallas interpret mode (`interpret=True`), which is how the test suite checks them.
The Triton backend is deprecated in jax 0.11 in favour of Mosaic GPU; it is used here because it has an interpret
mode (Mosaic GPU kernels cannot run on a CPU). The API used (`pl.pallas_call`, `pl.ds`, `plgpu.load/store`,
`plgpu.CompilerParams`) is the same in jax 0.10 and 0.11.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # deprecated in jax 0.11 and slated for removal: keep the package importable without it
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without the Triton backend
    plgpu = None

from small4_jax.kernels.gmm.metadata import local_offsets, make_group_metadata, num_work_items
from small4_jax.kernels.gmm.tiling import GmmTiling

_WHOLE = pl.BlockSpec()  # the whole array, unblocked


def available() -> bool:
    """Whether this jax has the Pallas Triton backend."""
    return plgpu is not None


def _require_triton():
    if plgpu is None:
        raise NotImplementedError(f"jax {jax.__version__} has no Pallas Triton backend: use moe_impl='ragged_dot'")


def _dot_precision(dtype):
    # float32 in, float32 out: IEEE products (Triton would default to TF32).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _gmm_program(seg_start_ref, seg_end_ref, seg_group_ref, work_seg_ref, work_tile_ref, num_work_ref, layer_ref,
                 lhs_ref, *weight_and_out_refs, load_weight_tile, k: int, n: int, t: GmmTiling, k_per_split: int,
                 epilogue=None):
    """The program of every gmm kernel (float weights here, quantised ones in `quant_triton.py`): one work item's
    row tile x one column tile [x one K slice], accumulated in float32 over K steps.

    `load_weight_tile(weight_refs, layer, g, k0, k_mask, col0, col_mask) -> (tile, dot dimension numbers)` is the
    main difference between the kernels: it returns group g's weight tile of layer `layer` (the weights are stacks
    with a leading layer axis, read in place) for K rows [k0, k0 + block_k) and columns [col0, col0 + block_n) in
    the activation dtype, masked with zeros. W8A8 (`quant_triton.gmm_w8a8_pallas`: lhs and weights both fp8) also
    passes `epilogue(acc, weight_refs, layer, g, col0, col_mask) -> acc` (the scales, applied once after K)."""
    *weight_refs, out_ref = weight_and_out_refs
    bm, bk, bn = t.block_m, t.block_k, t.block_n
    w, j = pl.program_id(0), pl.program_id(1)
    split = pl.program_id(2) if t.split_k > 1 else 0

    @pl.when(w < num_work_ref[0])
    def _():
        seg = work_seg_ref[w]
        row0 = work_tile_ref[w] * bm
        lo = jnp.maximum(seg_start_ref[seg], row0)
        hi = jnp.minimum(seg_end_ref[seg], row0 + bm)
        group = seg_group_ref[seg]
        rows = row0 + jnp.arange(bm, dtype=jnp.int32)
        row_mask = (rows >= lo) & (rows < hi)
        cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
        col_mask = cols < n
        k_begin = split * k_per_split
        steps = jnp.minimum((k - k_begin + bk - 1) // bk, k_per_split // bk)
        # Zero segments: no K steps, zeros stored. Not `jnp.where(group >= 0, steps, 0)`: jax 0.10.2's Triton
        # lowering passes the literal 0 into the nested `_where` jit as an i1, and the module fails to verify
        # ("'arith.select' op failed to verify that all of {true_value, false_value, result} have same type").
        steps = steps * (group >= 0).astype(jnp.int32)
        g = jnp.maximum(group, 0)
        layer = layer_ref[0]
        rows_slice, cols_slice = pl.ds(row0, bm), pl.ds(j * bn, bn)

        def step(i, acc):
            k0 = k_begin + i * bk
            k_mask = (k0 + jnp.arange(bk, dtype=jnp.int32)) < k
            # a float literal: Triton casts no int literal to fp8 (W8A8's lhs)
            a = plgpu.load(lhs_ref.at[rows_slice, pl.ds(k0, bk)], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b, dims = load_weight_tile(weight_refs, layer, g, k0, k_mask, j * bn, col_mask)
            return acc + jax.lax.dot_general(a, b.astype(a.dtype), dims, precision=_dot_precision(a.dtype),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        if epilogue is not None:
            acc = epilogue(acc, weight_refs, layer, g, j * bn, col_mask)
        mask = row_mask[:, None] & col_mask[None, :]
        if t.split_k > 1:
            plgpu.store(out_ref.at[split, rows_slice, cols_slice], acc, mask=mask)
        else:
            plgpu.store(out_ref.at[rows_slice, cols_slice], acc.astype(out_ref.dtype), mask=mask)


def gmm_call(load_weight_tile, lhs, weights: tuple, group_sizes, group_offset, layer, *, num_groups: int, n: int,
             tiling: GmmTiling, out_dtype, interpret: bool, name: str, epilogue=None):
    """Launch `_gmm_program` over lhs [M, K] and the weight stacks `weights` (leading layer axis, read by
    `load_weight_tile` at `layer`, an int32 scalar) -> [M, N]: the group metadata, the grid (work items x column
    tiles [x K splits]) and the split-K sum (`epilogue`: see `_gmm_program`).

    The stacks are passed whole: inside a scan over layers the custom call reads the loop-invariant stack at the
    scan index, so no layer's weights are sliced into a temporary copy before the kernel (one weight read a step)."""
    _require_triton()
    m, k = lhs.shape
    t = tiling
    meta = make_group_metadata(group_sizes, group_offset, num_groups, m, t.block_m)
    k_per_split = -(-(-(-k // t.split_k)) // t.block_k) * t.block_k  # ceil(K / split_k), rounded up to block_k
    grid = (num_work_items(m, num_groups, t.block_m), -(-n // t.block_n))
    if t.split_k > 1:
        grid += (t.split_k,)
        out_shape = jax.ShapeDtypeStruct((t.split_k, m, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    kernel = functools.partial(_gmm_program, load_weight_tile=load_weight_tile, k=k, n=n, t=t,
                               k_per_split=k_per_split, epilogue=epilogue)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[_WHOLE] * (len(meta) + 2 + len(weights)),
        out_specs=_WHOLE,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        name=name,
    )(*meta, jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), lhs, *weights)
    if t.split_k > 1:
        out = out.sum(0).astype(out_dtype)
    return out


def _float_tile(weight_refs, layer, g, k0, k_mask, col0, col_mask, *, bk: int, bn: int, transpose_rhs: bool):
    (rhs_ref,) = weight_refs
    if transpose_rhs:  # rhs [L, G, N, K]
        b = plgpu.load(rhs_ref.at[layer, g, pl.ds(col0, bn), pl.ds(k0, bk)],
                       mask=col_mask[:, None] & k_mask[None, :], other=0)
        return b, (((1,), (1,)), ((), ()))
    b = plgpu.load(rhs_ref.at[layer, g, pl.ds(k0, bk), pl.ds(col0, bn)], mask=k_mask[:, None] & col_mask[None, :],
                   other=0)
    return b, (((1,), (0,)), ((), ()))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"))
def gmm_pallas(lhs, rhs, group_sizes, group_offset, layer=None, *, tiling: GmmTiling, transpose_rhs: bool,
               out_dtype, interpret: bool):
    """lhs [M, K] @ rhs[g] per row group, for the window of G groups from group_offset -> [M, N].

    rhs [G, K, N], or with `layer` (int32 scalar) a stack [L, G, K, N] read at that layer in place."""
    if layer is None:
        rhs, layer = rhs[None], 0  # a stack of one layer (a bitcast)
    n = rhs.shape[2] if transpose_rhs else rhs.shape[3]
    load = functools.partial(_float_tile, bk=tiling.block_k, bn=tiling.block_n, transpose_rhs=transpose_rhs)
    return gmm_call(load, lhs, (rhs,), group_sizes, group_offset, layer, num_groups=rhs.shape[1], n=n, tiling=tiling,
                    out_dtype=out_dtype, interpret=interpret, name="small4_gmm")


def _tgmm_kernel(offsets_ref, lhs_ref, rhs_ref, out_ref, *, k: int, n: int, t: GmmTiling):
    bm, bk, bn = t.block_m, t.block_k, t.block_n
    g, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[g], offsets_ref[g + 1]
    k_mask = (kt * bk + jnp.arange(bk, dtype=jnp.int32)) < k
    n_mask = (nt * bn + jnp.arange(bn, dtype=jnp.int32)) < n
    k_slice, n_slice = pl.ds(kt * bk, bk), pl.ds(nt * bn, bn)

    def step(i, acc):
        r0 = start + i * bm
        row_mask = (r0 + jnp.arange(bm, dtype=jnp.int32)) < end
        a = plgpu.load(lhs_ref.at[pl.ds(r0, bm), k_slice], mask=row_mask[:, None] & k_mask[None, :], other=0)
        b = plgpu.load(rhs_ref.at[pl.ds(r0, bm), n_slice], mask=row_mask[:, None] & n_mask[None, :], other=0)
        return acc + jax.lax.dot_general(a, b.astype(a.dtype), (((0,), (0,)), ((), ())),
                                         precision=_dot_precision(a.dtype), preferred_element_type=jnp.float32)

    steps = jnp.maximum(end - start + bm - 1, 0) // bm
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bk, bn), jnp.float32))
    plgpu.store(out_ref.at[g, k_slice, n_slice], acc.astype(out_ref.dtype), mask=k_mask[:, None] & n_mask[None, :])


@functools.partial(jax.jit, static_argnames=("num_groups", "tiling", "out_dtype", "interpret"))
def tgmm_pallas(lhs, rhs, group_sizes, group_offset, *, num_groups: int, tiling: GmmTiling, out_dtype,
                interpret: bool):
    """Per local group lhs[rows]^T @ rhs[rows]: lhs [M, K], rhs [M, N] -> [num_groups, K, N]."""
    _require_triton()
    m, k = lhs.shape
    n = rhs.shape[1]
    t = tiling
    offsets = local_offsets(group_sizes, group_offset, num_groups, m)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, k=k, n=n, t=t),
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(num_groups, -(-k // t.block_k), -(-n // t.block_n)),
        in_specs=[_WHOLE] * 3,
        out_specs=_WHOLE,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        name="small4_tgmm",
    )(offsets, lhs, rhs)
