"""`gmm` and `tgmm`: the grouped matmul of the routed experts and its weight gradient, over several backends.

    gmm(lhs [M, K], rhs [G_local, K, N], group_sizes [G], group_offset=0)  -> [M, N]
    gmm(lhs [M, K], rhs [L, G_local, K, N], group_sizes [G], group_offset=0, layer=i)  -> [M, N], with rhs[i]
    tgmm(lhs [M, K], rhs [M, N], group_sizes [G], group_offset=0, num_groups=G_local) -> [G_local, K, N]

Semantics (window, zero rows) are defined in `reference.py`. Backends:

    "pallas"      the Pallas kernels of `pallas_triton.py` inside a `jax.custom_vjp` (Pallas has no reverse-mode
                  autodiff): dlhs = gmm(dy, rhs^T) with the transposed rhs read in place, drhs = tgmm(lhs, dy).
                  The weight gradient is only computed when the weights are being differentiated (a frozen base
                  under LoRA costs no tgmm), and likewise the input gradient. Runs in interpret mode on a CPU.
    "ragged_dot"  `jax.lax.ragged_dot` (XLA's own lowering; native autodiff). A window is expressed by a leading
                  zero group, which copies rhs: fine on a CPU, where this is the default.
    "reference"   `reference.py`: every local group on every row, masked (O(G) work).

Tiling: `tiling=None` picks decode or prefill block sizes from the static shapes (`tiling.py`); an explicit
`GmmTiling` is used by all three kernels of the VJP (tests use this to cover both tilings on tiny shapes).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from small4_jax.kernels.gmm import pallas_triton, quant_triton
from small4_jax.kernels.gmm.reference import (gmm_quant_reference, gmm_reference, gmm_w8a8_reference, row_groups,
                                              tgmm_reference)
from small4_jax.kernels.gmm.tiling import GmmTiling, gmm_tiling, tgmm_tiling
from small4_jax.platform import on_gpu
from small4_jax.quant.formats import QArray, check_w8a8, column_scale, dequantize

BACKENDS = ("pallas", "ragged_dot", "reference")


def default_interpret(*placed) -> bool:
    """Pallas interpret mode unless the program runs on GPUs (the Triton kernels only compile for GPUs).

    The platform is that of `placed` (the operands, a mesh; `small4_jax.platform.platform_of`), not the default
    backend: a CPU host lowering for compile-only GPU devices gets the compiled kernel, as a GPU would.
    """
    return not on_gpu(*placed)


def _check(lhs, rhs, group_sizes, transpose_rhs):
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"gmm expects lhs [M, K], rhs [G, K, N], group_sizes [G]; got {lhs.shape}, {rhs.shape}, "
                         f"{group_sizes.shape}")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if k != lhs.shape[1]:
        raise ValueError(f"gmm: contracting dims differ: lhs {lhs.shape}, rhs {rhs.shape}, {transpose_rhs=}")
    if rhs.shape[0] > group_sizes.shape[0]:
        raise ValueError(f"gmm: rhs holds {rhs.shape[0]} groups but group_sizes has only {group_sizes.shape[0]}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"gmm: group_sizes must be integers, got {group_sizes.dtype}")


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset=None,
    *,
    layer=None,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    backend: str = "pallas",
    tiling: GmmTiling | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul over rows sorted by group; rows outside the window [group_offset, + rhs.shape[0]) are zero.

    lhs [M, K]; rhs [G_local, K, N] ([G_local, N, K] with transpose_rhs) holding groups group_offset...;
    group_sizes [G] int (G >= G_local, a traced array: no host sync). Output [M, N] in preferred_element_type
    (default lhs.dtype), accumulated in float32. rhs is cast to lhs.dtype.

    rhs may be a `small4_jax.quant.formats.QArray` (fp8 / int8 / int4 values + scale grid): the "pallas" backend then
    dequantises tiles in the kernel (`quant_triton.py`, differentiable in lhs only: the base of QLoRA is frozen);
    "ragged_dot" dequantises the window's weights in lhs.dtype first (XLA; a float copy of the layer's experts) and
    "reference" is `gmm_quant_reference`. A QArray with `act_scale` (fp8 weights and the experts' static activation
    scales) is W8A8: "pallas" runs the fp8 x fp8 kernel (`quant_triton.gmm_w8a8_pallas`), "reference" is
    `gmm_w8a8_reference` and "ragged_dot" computes the same numbers with XLA (rows quantised with their expert's
    scale, fp8 values widened exactly); forward only: its gradient is refused.

    `layer` (an int32 scalar, e.g. the index of a scan over layers): rhs is a stack with a leading layer axis
    ([L, G_local, K, N]; a QArray's values and scales likewise) and the product uses rhs[layer]. The "pallas" backend
    passes the whole stack to the kernel, which reads its tiles at that layer: inside the scan the loop-invariant
    stack is read in place instead of being sliced into a per-layer copy. The other backends slice it first.
    """
    if layer is not None and backend != "pallas":
        rhs = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), rhs)
        layer = None
    if isinstance(rhs, QArray):
        return _gmm_quant(lhs, rhs, group_sizes, group_offset, layer, transpose_rhs, preferred_element_type, backend,
                          tiling, interpret)
    _check(lhs, jax.ShapeDtypeStruct(rhs.shape[layer is not None:], rhs.dtype), group_sizes, transpose_rhs)
    group_sizes = group_sizes.astype(jnp.int32)
    window = group_offset is not None or rhs.shape[0] != group_sizes.shape[0]
    group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    rhs = rhs.astype(lhs.dtype)
    if backend == "reference":
        return gmm_reference(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs,
                             preferred_element_type=out_dtype)
    if backend == "ragged_dot":
        return _ragged_dot_gmm(lhs, rhs, group_sizes, group_offset, window, transpose_rhs, out_dtype)
    if backend != "pallas":
        raise ValueError(f"unknown gmm backend {backend!r}; expected one of {BACKENDS}")
    interpret = default_interpret(lhs, rhs) if interpret is None else bool(interpret)
    if layer is None:
        return _gmm_vjp(_Config(tiling, interpret, transpose_rhs, out_dtype, rhs.shape[0], jnp.dtype(lhs.dtype)), lhs,
                        rhs[None], group_sizes, group_offset, jnp.int32(0))  # a stack of one (a bitcast)
    cfg = _Config(tiling, interpret, transpose_rhs, out_dtype, rhs.shape[1], jnp.dtype(lhs.dtype))
    return _gmm_vjp(cfg, lhs, rhs, group_sizes, group_offset, jnp.asarray(layer, jnp.int32))


def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset=None,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    backend: str = "pallas",
    tiling: GmmTiling | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-group lhs[rows]^T @ rhs[rows] for the window's groups: lhs [M, K], rhs [M, N] -> [num_groups, K, N].

    num_groups defaults to len(group_sizes); empty groups give zeros. Not differentiable (it is itself a gradient).
    """
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"tgmm expects lhs [M, K] and rhs [M, N]; got {lhs.shape}, {rhs.shape}")
    group_sizes = group_sizes.astype(jnp.int32)
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    rhs = rhs.astype(lhs.dtype)
    if backend == "reference":
        return tgmm_reference(lhs, rhs, group_sizes, group_offset, num_groups=num_groups,
                              preferred_element_type=out_dtype)
    if backend == "ragged_dot":
        k = lhs.shape[1]
        window = num_groups != group_sizes.shape[0]
        zeros = jnp.zeros((num_groups, k, rhs.shape[1]), lhs.dtype)
        _, pullback = jax.vjp(
            lambda w: _ragged_dot_gmm(lhs, w, group_sizes, group_offset, window, False, jnp.dtype(jnp.float32)),
            zeros)
        return pullback(rhs.astype(jnp.float32))[0].astype(out_dtype)
    if backend != "pallas":
        raise ValueError(f"unknown tgmm backend {backend!r}; expected one of {BACKENDS}")
    return _tgmm_pallas(lhs, rhs, group_sizes, group_offset, num_groups, tiling,
                        default_interpret(lhs, rhs) if interpret is None else interpret, out_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Quantised weights.
def _gmm_quant(lhs, rhs, group_sizes, group_offset, layer, transpose_rhs, preferred_element_type, backend, tiling,
               interpret):
    _check(lhs, jax.ShapeDtypeStruct(rhs.shape[layer is not None:], jnp.float32), group_sizes, transpose_rhs)
    group_sizes = group_sizes.astype(jnp.int32)
    window = group_offset is not None or rhs.shape[0] != group_sizes.shape[0]
    group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if rhs.act_scale is not None:
        return _gmm_w8a8(lhs, rhs, group_sizes, group_offset, window, layer, transpose_rhs, out_dtype, backend, tiling,
                         interpret)
    if backend == "reference":
        return gmm_quant_reference(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs,
                                   preferred_element_type=out_dtype)
    if backend == "ragged_dot":
        w = dequantize(rhs, jnp.float32).astype(lhs.dtype)
        return _ragged_dot_gmm(lhs, w, group_sizes, group_offset, window, transpose_rhs, out_dtype)
    if backend != "pallas":
        raise ValueError(f"unknown gmm backend {backend!r}; expected one of {BACKENDS}")
    interpret = default_interpret(lhs, rhs.values) if interpret is None else bool(interpret)
    values, scale = rhs.values, column_scale(rhs)
    if layer is None:  # a stack of one (bitcasts)
        values, scale, layer = values[None], scale[None], 0
    cfg = _Config(tiling, interpret, transpose_rhs, out_dtype, values.shape[1], jnp.dtype(lhs.dtype))
    return _gmm_quant_vjp(cfg, lhs, values, scale, group_sizes, group_offset, jnp.asarray(layer, jnp.int32))


def _gmm_quant_pallas(cfg: _Config, lhs, values, scale, group_sizes, group_offset, layer):
    """values [L, G, Kw(/2), Nw] and the column-expanded scale [L, G, Kb, Nw] read at `layer`."""
    m, k = lhs.shape
    packed = jnp.dtype(values.dtype) == jnp.uint8
    kw, nw = values.shape[2] * (2 if packed else 1), values.shape[3]
    n = kw if cfg.transpose_rhs else nw
    tiling = cfg.tiling or gmm_tiling(m, k, n, values.shape[1], lhs.dtype)
    try:
        quant_triton.quant_tiling(tiling, kw, scale.shape[2], packed, cfg.transpose_rhs)
    except ValueError:  # scale rows / int4 half-groups narrower than any tile (tiny models): dequantise, then gmm
        at = functools.partial(jax.lax.dynamic_index_in_dim, index=layer, axis=0, keepdims=True)
        w = dequantize(QArray(at(values), at(scale)), jnp.float32).astype(lhs.dtype)  # scale: column-expanded grid
        return _gmm_pallas(cfg, lhs, w, group_sizes, group_offset, jnp.int32(0))
    return quant_triton.gmm_quant_pallas(lhs, values, scale, group_sizes, group_offset, layer, tiling=tiling,
                                         transpose_rhs=cfg.transpose_rhs, out_dtype=cfg.out_dtype,
                                         interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_quant_vjp(cfg, lhs, values, scale, group_sizes, group_offset, layer):
    return _gmm_quant_pallas(cfg, lhs, values, scale, group_sizes, group_offset, layer)


def _gmm_quant_fwd(cfg, lhs, values, scale, group_sizes, group_offset, layer):
    return _gmm_quant_pallas(cfg, lhs, values, scale, group_sizes, group_offset, layer), (values, scale, group_sizes,
                                                                                           group_offset, layer)


def _gmm_quant_bwd(cfg, residuals, dy):
    """dlhs = dy @ W^T from the same quantised bytes; no gradient for the frozen quantised weights or scales."""
    values, scale, group_sizes, group_offset, layer = residuals
    dcfg = cfg._replace(transpose_rhs=not cfg.transpose_rhs, out_dtype=cfg.dtype)
    dlhs = _gmm_quant_pallas(dcfg, dy.astype(cfg.dtype), values, scale, group_sizes, group_offset, layer)
    zero = jax.tree.map(lambda v: jnp.zeros(v.shape, jax.dtypes.float0) if not jnp.issubdtype(v.dtype, jnp.floating)
                        else jnp.zeros_like(v), (values, scale, group_sizes, group_offset, layer))
    return (dlhs, *zero)


_gmm_quant_vjp.defvjp(_gmm_quant_fwd, _gmm_quant_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# W8A8: fp8 activations (static per-expert scales) x fp8 weights.
W8A8_NO_GRAD = ("gmm W8A8 (fp8 activations) is inference only: it has no gradient. Load the model without "
                "activations='fp8' (weight-only fp8, whose input gradient QLoRA uses) to train through it")


def _gmm_w8a8(lhs, rhs, group_sizes, group_offset, window, layer, transpose_rhs, out_dtype, backend, tiling,
              interpret):
    check_w8a8(rhs, "gmm")
    if transpose_rhs:
        raise ValueError("gmm W8A8 computes lhs @ W only (no transposed product: it has no backward)")
    if backend == "reference":
        return gmm_w8a8_reference(lhs, rhs, group_sizes, group_offset, preferred_element_type=out_dtype)
    num_groups = rhs.values.shape[-3]
    if backend == "ragged_dot":  # rows quantised with their expert's scale; fp8 values are exact in bf16 / f32
        act = rhs.act_scale.reshape(num_groups).astype(jnp.float32)
        q = quant_triton.quantize_rows(lhs, act, group_sizes, group_offset).astype(lhs.dtype)
        y = _ragged_dot_gmm(q, rhs.values.astype(lhs.dtype), group_sizes, group_offset, window, False,
                            jnp.dtype(jnp.float32))
        local = jnp.maximum(row_groups(group_sizes, group_offset, num_groups, lhs.shape[0]), 0)
        s_w = column_scale(rhs)[:, 0, :].astype(jnp.float32)[local]  # [M, N]
        return (y * act[local][:, None] * s_w).astype(out_dtype)
    if backend != "pallas":
        raise ValueError(f"unknown gmm backend {backend!r}; expected one of {BACKENDS}")
    interpret = default_interpret(lhs, rhs.values) if interpret is None else bool(interpret)
    values, scale = rhs.values, column_scale(rhs)
    act = rhs.act_scale.reshape(values.shape[:-2]).astype(jnp.float32)  # [(L,) G]
    if layer is None:  # a stack of one (bitcasts)
        values, scale, act, layer = values[None], scale[None], act[None], 0
    cfg = _Config(tiling, interpret, False, out_dtype, values.shape[1], jnp.dtype(lhs.dtype))
    return _gmm_w8a8_vjp(cfg, lhs, values, scale, act, group_sizes, group_offset, jnp.asarray(layer, jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_w8a8_vjp(cfg, lhs, values, scale, act, group_sizes, group_offset, layer):
    m, k = lhs.shape
    tiling = cfg.tiling or gmm_tiling(m, k, values.shape[3], values.shape[1], lhs.dtype)
    return quant_triton.gmm_w8a8_pallas(lhs, values, scale, act, group_sizes, group_offset, layer, tiling=tiling,
                                        out_dtype=cfg.out_dtype, interpret=cfg.interpret)


def _gmm_w8a8_fwd(cfg, *args):
    return _gmm_w8a8_vjp(cfg, *args), None


def _gmm_w8a8_bwd(cfg, residuals, dy):
    raise NotImplementedError(W8A8_NO_GRAD)


_gmm_w8a8_vjp.defvjp(_gmm_w8a8_fwd, _gmm_w8a8_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# ragged_dot backend.
def _ragged_dot_gmm(lhs, rhs, group_sizes, group_offset, window, transpose_rhs, out_dtype):
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    if window:
        # Rows before the window form a leading group with zero weights; rows after it are past the sum: zeros.
        num_groups = rhs.shape[0]
        local = jax.lax.dynamic_slice(group_sizes, (group_offset,), (num_groups,))
        before = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < group_offset, group_sizes, 0))
        group_sizes = jnp.concatenate([before[None], local]).astype(jnp.int32)
        rhs = jnp.concatenate([jnp.zeros_like(rhs[:1]), rhs])
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Pallas backend with its custom VJP.
class _Config(NamedTuple):
    """Static (hashable) arguments of the Pallas gmm."""

    tiling: GmmTiling | None
    interpret: bool
    transpose_rhs: bool
    out_dtype: jnp.dtype
    num_groups: int  # groups of rhs (its axis after the layer axis)
    dtype: jnp.dtype  # of lhs and rhs


def _gmm_pallas(cfg: _Config, lhs, rhs, group_sizes, group_offset, layer):
    """rhs a stack [L, G, K, N] ([L, G, N, K] transposed) read at `layer`."""
    m, k = lhs.shape
    n = rhs.shape[2] if cfg.transpose_rhs else rhs.shape[3]
    tiling = cfg.tiling or gmm_tiling(m, k, n, rhs.shape[1], lhs.dtype)
    return pallas_triton.gmm_pallas(lhs, rhs, group_sizes, group_offset, layer, tiling=tiling,
                                    transpose_rhs=cfg.transpose_rhs, out_dtype=cfg.out_dtype,
                                    interpret=cfg.interpret)


def _tgmm_pallas(lhs, rhs, group_sizes, group_offset, num_groups, tiling, interpret, out_dtype):
    m, k = lhs.shape
    tiling = tiling or tgmm_tiling(m, k, rhs.shape[1], num_groups, lhs.dtype)
    return pallas_triton.tgmm_pallas(lhs, rhs, group_sizes, group_offset, num_groups=num_groups, tiling=tiling,
                                     out_dtype=jnp.dtype(out_dtype), interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_vjp(cfg, lhs, rhs, group_sizes, group_offset, layer):
    return _gmm_pallas(cfg, lhs, rhs, group_sizes, group_offset, layer)


def _gmm_vjp_fwd(cfg, lhs, rhs, group_sizes, group_offset, layer):
    # symbolic_zeros=True: each argument arrives as CustomVJPPrimal(value, perturbed). Keep only the residuals the
    # backward pass needs: no lhs when the weights are frozen (so no tgmm), no rhs when lhs is not differentiated.
    out = _gmm_pallas(cfg, lhs.value, rhs.value, group_sizes.value, group_offset.value, layer.value)
    residuals = (lhs.value if rhs.perturbed else None, rhs.value if lhs.perturbed else None, group_sizes.value,
                 group_offset.value, layer.value, rhs.value.shape[0])
    return out, residuals


def _gmm_vjp_bwd(cfg, residuals, dy):
    lhs, rhs, group_sizes, group_offset, layer, num_layers = residuals
    if isinstance(dy, SymbolicZero):
        return None, None, None, None, None
    dy = dy.astype(cfg.dtype)
    dlhs = drhs = None
    if rhs is not None:  # dlhs = dy @ rhs[g]^T: the same kernel reading rhs transposed in place
        dcfg = cfg._replace(transpose_rhs=not cfg.transpose_rhs, out_dtype=cfg.dtype)
        dlhs = _gmm_pallas(dcfg, dy, rhs, group_sizes, group_offset, layer)
    if lhs is not None:  # drhs[g] = lhs[rows]^T @ dy[rows]  ([G, N, K] = dy^T @ lhs for a transposed rhs)
        a, b = (dy, lhs) if cfg.transpose_rhs else (lhs, dy)
        drhs = _tgmm_pallas(a, b, group_sizes, group_offset, cfg.num_groups, cfg.tiling, cfg.interpret, cfg.dtype)
        # the stack's gradient: this layer's slice (a stack of one: a bitcast)
        drhs = drhs[None] if num_layers == 1 else jnp.zeros((num_layers, *drhs.shape), drhs.dtype).at[layer].set(drhs)
    return dlhs, drhs, None, None, None


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------------------------------
# First-use self-check (moe.kernel_self_check calls it before `moe_impl: auto` picks the kernel on a GPU).
def self_check(device=None, *, interpret: bool | None = None) -> None:
    """Run the Pallas gmm and tgmm once on a small problem on `device` and compare them with the reference.

    Raises whatever compiling or running raises, or AssertionError naming the largest difference. Runs eagerly even
    when called while a program is being traced: in its own thread, whose trace state is fresh (jax's trace context
    is per thread; `ensure_compile_time_eval` would also evaluate the kernel body). interpret=None: compiled on GPUs,
    interpreted elsewhere (how the CPU tests exercise it).
    """
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(_self_check, device or jax.devices()[0], interpret).result()


def _self_check(device, interpret):
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = np.array([12, 0, 30, 6], np.int32)  # an empty group, uneven sizes; 48 rows
    m, k, n = int(sizes.sum()), 64, 32
    with jax.default_device(device):
        lhs, dy = (jax.device_put(rng.standard_normal(s, np.float32), device) for s in ((m, k), (m, n)))
        rhs = jax.device_put(rng.standard_normal((len(sizes), k, n), np.float32), device)
        gs = jax.device_put(sizes, device)
        checks = {
            "gmm": (gmm(lhs, rhs, gs, interpret=interpret), gmm_reference(lhs, rhs, gs, jnp.int32(0))),
            "tgmm": (tgmm(lhs, dy, gs, interpret=interpret),
                     tgmm_reference(lhs, dy, gs, jnp.int32(0), num_groups=len(sizes))),
        }
        for name, (got, want) in checks.items():
            got, want = np.asarray(got), np.asarray(want)
            err = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
            if not err <= 1e-3 * (1.0 + float(np.max(np.abs(want)))):
                raise AssertionError(f"{name} differs from its reference by {err:.3g} on {device.device_kind}")
