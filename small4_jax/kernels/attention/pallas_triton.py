"""Flash attention as Pallas kernels (Triton backend): forward, dK/dV and dQ, inside a `jax.custom_vjp`.

Same algorithm and mask as `blockwise.py` (online softmax in float32, lse residual, FlashAttention-2 backward,
exact per-block skipping of fully hidden block pairs), one fused kernel per pass instead of XLA loops:

    forward  grid (B, H, T/block_q): a query block stays in registers; loop over key blocks -> out, lse
    dK, dV   grid (B, H, S/block_k): a key block stays; loop over query blocks (recomputing p from lse)
    dQ       grid (B, H, T/block_q): a query block stays; loop over key blocks

Operands are head-major [B, H, T, D] in HBM; the last dims are padded to powers of two (Triton tiles), the sequence
to whole blocks (padding keys get an unreachable position). delta = rowsum(dO * O) is one XLA reduction.

Why this kernel and not the alternatives (jax 0.10.2 + CUDA plugin on a CPU host, sm_90a deviceless compile; jax 0.11's
public `dot_product_attention` has the same mask arguments, not tried here):
- cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) takes index-causal, seq-length
  padding and sliding-window masks; packed documents need segment offsets that only jax's private
  `jax._src.cudnn.fused_attention_stablehlo` accepts (THD layout, a static maximum number of segments per row),
  a general mask goes in as a dense [B, 1, T, S] bias (O(T^2) again), and a prefix cache (queries at positions
  past the first key) is not expressible. It also checks the *local* cuDNN and GPU at trace time: lowering it for
  an H100 mesh from our CPU hosts fails with "RuntimeError: cuDNN not found." (jax 0.10.2 with the CUDA plugin,
  causal and causal + seq lengths alike), so no deviceless compile test could gate it.
- `jax.experimental.pallas.ops.gpu.attention` (Triton) has segment ids but index-causal masking only (no prefix
  cache: queries and keys are assumed to start at the same index) and sits in a deprecated module (STYLE.md, anti-pattern 15).
Ours masks by positions and segments (training rows, packed rows, padded rows and a prefix cache alike), compiles
for sm_90a from a CPU host, and runs in Pallas interpret mode on a CPU, where the tests compare it with the reference.
The Triton backend is deprecated in jax 0.11 in favour of Mosaic GPU; it is used because it has an interpret mode
(as `kernels/gmm` does), and the calls used exist in jax 0.10 and 0.11.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # deprecated in jax 0.11 and slated for removal: keep the package importable without it
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without the Triton backend
    plgpu = None

from small4_jax.kernels.attention.blockwise import HIDDEN, pad_to
from small4_jax.platform import on_gpu


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes (powers of two, >= 16) and Triton launch parameters of the three kernels."""

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _fit(block: int, n: int) -> int:
    """A power-of-two block no larger than needed for n (>= 16, Triton's smallest dot tile)."""
    return min(block, _pow2(n))


def _visible(qp, qs, kp, ks):
    return (kp[None, :] <= qp[:, None]) & (ks[None, :] == qs[:, None])


def _any(mask) -> jax.Array:
    return jnp.max(mask.astype(jnp.int32)) > 0


# ----------------------------------------------------------------------------------------------------------------------
# Kernels. Refs are per (batch, head): q/do [T, K/U] blocks or whole, k/v [S, K/U], positions/segments [T] / [S].
def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_ref, lse_ref, *, block_k: int, num_k: int):
    q = q_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]
    bq, u = q.shape[0], v_ref.shape[-1]

    def body(j, carry):
        sl = pl.ds(j * block_k, block_k)
        mask = _visible(qp, qs, kp_ref[sl], ks_ref[sl])

        def compute(carry):
            m, l, acc = carry
            s = plgpu.dot(q, k_ref[sl, :], trans_b=True).astype(jnp.float32)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[:, None])
            v = v_ref[sl, :]
            acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
            return m_new, l * alpha + jnp.sum(p, axis=1), acc

        return jax.lax.cond(_any(mask), compute, lambda c: c, carry)

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, u), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_k, body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _probs(q, k, qp, qs, kp, ks, lse):
    """p = e^(q k^T - lse) on visible pairs, 0 elsewhere (and for queries that see nothing)."""
    mask = _visible(qp, qs, kp, ks)
    s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32)
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    return jnp.where(mask, jnp.exp(s - lse_safe[:, None]), 0.0)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, qs_ref, kp_ref, ks_ref, dk_ref, dv_ref, *,
                block_q: int, num_q: int):
    k, v = k_ref[...], v_ref[...]
    kp, ks = kp_ref[...], ks_ref[...]

    def body(i, carry):
        sl = pl.ds(i * block_q, block_q)
        qp, qs = qp_ref[sl], qs_ref[sl]

        def compute(carry):
            dk, dv = carry
            q, do = q_ref[sl, :], do_ref[sl, :]
            p = _probs(q, k, qp, qs, kp, ks, lse_ref[sl])
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
            dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
            ds = p * (dp - delta_ref[sl][:, None])
            dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
            return dk, dv

        return jax.lax.cond(_any(_visible(qp, qs, kp, ks)), compute, lambda c: c, carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, num_q, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, qs_ref, kp_ref, ks_ref, dq_ref, *,
               block_k: int, num_k: int):
    q, do = q_ref[...], do_ref[...]
    qp, qs, lse, delta = qp_ref[...], qs_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        sl = pl.ds(j * block_k, block_k)
        kp, ks = kp_ref[sl], ks_ref[sl]

        def compute(dq):
            k, v = k_ref[sl, :], v_ref[sl, :]
            p = _probs(q, k, qp, qs, kp, ks, lse)
            dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
            ds = p * (dp - delta[:, None])
            return dq + plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)

        return jax.lax.cond(_any(_visible(qp, qs, kp, ks)), compute, lambda d: d, dq)

    dq = jax.lax.fori_loop(0, num_k, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Calls. Arguments are already head-major and padded: q [B, H, Tp, Kp], k [B, H, Sp, Kp], v [B, H, Sp, Up].
def _per_head(shape):
    """BlockSpec: the whole [rows, dim] slab of one (batch, head)."""
    return pl.BlockSpec((None, None, *shape), lambda b, h, i: (b, h, 0, 0))


def _per_row(n):
    return pl.BlockSpec((None, n), lambda b, h, i: (b, 0))


def _params(blocks: AttentionBlocks):
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward_call(q, k, v, qp, qs, kp, ks, blocks: AttentionBlocks, interpret: bool):
    b, h, tp, kd = q.shape
    sp, ud = k.shape[2], v.shape[3]
    bq, bk = blocks.block_q, blocks.block_k
    kernel = functools.partial(_fwd_kernel, block_k=bk, num_k=sp // bk)
    return pl.pallas_call(
        kernel,
        grid=(b, h, tp // bq),
        in_specs=[
            pl.BlockSpec((None, None, bq, kd), lambda b, h, i: (b, h, i, 0)),
            _per_head((sp, kd)),
            _per_head((sp, ud)),
            pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            _per_row(sp),
            _per_row(sp),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, ud), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, ud), q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
        interpret=interpret,
        compiler_params=_params(blocks),
        name="small4_flash_fwd",
    )(q, k, v, qp, qs, kp, ks)


def _backward_call(q, k, v, qp, qs, kp, ks, out, lse, do, blocks: AttentionBlocks, interpret: bool):
    b, h, tp, kd = q.shape
    sp, ud = k.shape[2], v.shape[3]
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    delta = jnp.einsum("bhtu,bhtu->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    args = (q, k, v, do, lse, delta, qp, qs, kp, ks)
    whole_q = [_per_head((tp, kd)), _per_head((tp, ud)),
               pl.BlockSpec((None, None, tp), lambda b, h, i: (b, h, 0)),
               pl.BlockSpec((None, None, tp), lambda b, h, i: (b, h, 0)), _per_row(tp), _per_row(tp)]
    k_block = pl.BlockSpec((None, None, bk, kd), lambda b, h, i: (b, h, i, 0))
    v_block = pl.BlockSpec((None, None, bk, ud), lambda b, h, i: (b, h, i, 0))
    kv_row = pl.BlockSpec((None, bk), lambda b, h, i: (b, i))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, num_q=tp // bq),
        grid=(b, h, sp // bk),
        in_specs=[whole_q[0], k_block, v_block, *whole_q[1:], kv_row, kv_row],
        out_specs=[k_block, v_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
        compiler_params=_params(blocks),
        name="small4_flash_dkv",
    )(*args)
    q_block = pl.BlockSpec((None, None, bq, kd), lambda b, h, i: (b, h, i, 0))
    q_vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    q_row = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, num_k=sp // bk),
        grid=(b, h, tp // bq),
        in_specs=[q_block, _per_head((sp, kd)), _per_head((sp, ud)),
                  pl.BlockSpec((None, None, bq, ud), lambda b, h, i: (b, h, i, 0)), q_vec, q_vec, q_row, q_row,
                  _per_row(sp), _per_row(sp)],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=_params(blocks),
        name="small4_flash_dq",
    )(*args)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# The differentiable op: [B, T, H, D] in and out, padding and layout handled here.
def _layout(q, k, v, qp, kp, qs, ks, blocks: AttentionBlocks):
    t, s = q.shape[1], k.shape[1]
    lcm = max(blocks.block_q, blocks.block_q_bwd)
    lck = max(blocks.block_k, blocks.block_k_bwd)
    tp, sp = -(-t // lcm) * lcm, -(-s // lck) * lck
    kd, ud = _pow2(q.shape[3]), _pow2(v.shape[3])

    def heads(x, n, d):
        return pad_to(pad_to(jnp.swapaxes(x, 1, 2), 2, n), 3, d)

    return (heads(q, tp, kd), heads(k, sp, kd), heads(v, sp, ud), pad_to(qp, 1, tp), pad_to(qs, 1, tp),
            pad_to(kp, 1, sp, HIDDEN), pad_to(ks, 1, sp))


def _unlayout(x, n, d):
    return jnp.swapaxes(x[:, :, :n, :d], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, qp, kp, qs, ks, blocks: AttentionBlocks, interpret: bool):
    return _flash_fwd(q, k, v, qp, kp, qs, ks, blocks, interpret)[0]


def _flash_fwd(q, k, v, qp, kp, qs, ks, blocks, interpret):
    lq, lk, lv, lqp, lqs, lkp, lks = _layout(q, k, v, qp, kp, qs, ks, blocks)
    out, lse = _forward_call(lq, lk, lv, lqp, lqs, lkp, lks, blocks, interpret)
    return _unlayout(out, q.shape[1], v.shape[3]), (q, k, v, qp, kp, qs, ks, out, lse)


def _flash_bwd(blocks, interpret, res, dout):
    q, k, v, qp, kp, qs, ks, out, lse = res
    lq, lk, lv, lqp, lqs, lkp, lks = _layout(q, k, v, qp, kp, qs, ks, blocks)
    ldo = pad_to(pad_to(jnp.swapaxes(dout, 1, 2), 2, out.shape[2]), 3, out.shape[3])
    dq, dk, dv = _backward_call(lq, lk, lv, lqp, lqs, lkp, lks, out, lse, ldo, blocks, interpret)
    t, s = q.shape[1], k.shape[1]
    return (_unlayout(dq, t, q.shape[3]), _unlayout(dk, s, k.shape[3]), _unlayout(dv, s, v.shape[3]),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q, k, v, qp, kp, qs, ks, *, block_q: int | None = None, block_k: int | None = None,
                     interpret: bool | None = None, blocks: AttentionBlocks | None = None) -> jax.Array:
    """Same contract as `reference.attention_reference`. block_q/block_k override both passes' tiles (rounded to a
    power of two, >= 16); interpret defaults to True unless the arrays are placed on GPUs."""
    if plgpu is None:  # pragma: no cover
        raise NotImplementedError(f"jax {jax.__version__} has no Pallas Triton backend: use attn_impl='blockwise'")
    blocks = blocks or AttentionBlocks()
    if block_q:
        blocks = dataclasses.replace(blocks, block_q=_pow2(block_q), block_q_bwd=_pow2(block_q))
    if block_k:
        blocks = dataclasses.replace(blocks, block_k=_pow2(block_k), block_k_bwd=_pow2(block_k))
    t, s = q.shape[1], k.shape[1]
    blocks = dataclasses.replace(
        blocks, block_q=_fit(blocks.block_q, t), block_q_bwd=_fit(blocks.block_q_bwd, t),
        block_k=_fit(blocks.block_k, s), block_k_bwd=_fit(blocks.block_k_bwd, s),
    )
    if interpret is None:
        interpret = not on_gpu(q)
    return _flash(q, k, v, qp, kp, qs, ks, blocks, interpret)
