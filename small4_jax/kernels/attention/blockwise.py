"""Flash attention in plain XLA: query blocks x key blocks with an online softmax, and a custom VJP that recomputes
the probabilities block by block, so forward and backward hold O(T) memory.

Forward: for each query block (`lax.map`) scan the key blocks carrying the running max m, the running sum l and the
unnormalised output acc (all float32): a block's scores are s = q k^T, masked; m' = max(m, max s);
acc' = acc e^(m-m') + e^(s-m') v; l' = l e^(m-m') + sum e^(s-m'). The output is acc / l and the residual saved for
the backward is lse = m + log l per query (float32), beside q, k, v and the output.

Backward (FlashAttention-2): delta = sum(dO * O) per query; scan the key blocks, and inside each the query blocks,
recomputing p = e^(s - lse): dV_j += p^T dO_i, dP = dO_i V_j^T, dS = p (dP - delta_i), dK_j += dS^T Q_i,
dQ_i += dS K_j. The largest temporary is one [B, H, block_q, block_k] score block.

A block pair in which no query sees any key (above the causal diagonal, or across two packed documents) is skipped
with `lax.cond` on an exact test of its mask, so causal work is about half of the square. The mask is the general
one of `reference.py` (key position <= query position, equal segments), so the same code serves training rows,
packed rows and a prefix cache (queries at absolute positions over cache slots).

Sequence lengths need not be multiples of the blocks: queries are padded (and sliced off), keys are padded with an
unreachable position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from small4_jax.kernels.attention.reference import visible

HIDDEN = jnp.iinfo(jnp.int32).max  # a key position no query reaches (padding keys)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Split `axis` into [n, block] and move n to the front: [n, ..., block, ...]."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_blocks` (axis counted without the leading block index)."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _prepare(q, k, v, qp, kp, qs, ks, block_q, block_k):
    """Head-major, padded and blocked operands: q [nq, B, H, bq, K], k [nk, B, H, bk, K], v [nk, B, H, bk, U],
    positions/segments [n, B, b]."""
    t, s = q.shape[1], k.shape[1]
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    q = _blocks(pad_to(jnp.swapaxes(q, 1, 2), 2, tp), 2, bq)
    k = _blocks(pad_to(jnp.swapaxes(k, 1, 2), 2, sp), 2, bk)
    v = _blocks(pad_to(jnp.swapaxes(v, 1, 2), 2, sp), 2, bk)
    qp, qs = _blocks(pad_to(qp, 1, tp), 1, bq), _blocks(pad_to(qs, 1, tp), 1, bq)
    kp, ks = _blocks(pad_to(kp, 1, sp, HIDDEN), 1, bk), _blocks(pad_to(ks, 1, sp), 1, bk)
    return q, k, v, qp, kp, qs, ks


def _forward(q, k, v, qp, kp, qs, ks, block_q, block_k):
    t = q.shape[1]
    b, h, u = q.shape[0], q.shape[2], v.shape[-1]
    qb, kb, vb, qpb, kpb, qsb, ksb = _prepare(q, k, v, qp, kp, qs, ks, block_q, block_k)
    bq = qb.shape[3]

    def q_block(args):
        qi, qpi, qsi = args

        def k_step(carry, kargs):
            kj, vj, kpj, ksj = kargs
            mask = visible(qpi, kpj, qsi, ksj)  # [B, bq, bk]

            def compute(carry):
                m, l, acc = carry
                s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32)
                s = jnp.where(mask[:, None], s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                alpha = jnp.exp(m - m_safe)  # 0 while nothing was seen (m = -inf)
                p = jnp.exp(s - m_safe[..., None])
                l = l * alpha + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bhqk,bhku->bhqu", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l, acc * alpha[..., None] + pv

            return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry), None

        init = (
            jnp.full((b, h, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, h, bq, u), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(k_step, init, (kb, vb, kpb, ksb))
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(q_block, (qb, qpb, qsb))  # [nq, B, H, bq, U], [nq, B, H, bq]
    out = jnp.swapaxes(_unblocks(out, 2)[:, :, :t], 1, 2)  # [B, T, H, U]
    lse = _unblocks(lse, 2)[:, :, :t]  # [B, H, T]
    return out, lse


def _backward(q, k, v, qp, kp, qs, ks, out, lse, dout, block_q, block_k):
    t, s = q.shape[1], k.shape[1]
    qb, kb, vb, qpb, kpb, qsb, ksb = _prepare(q, k, v, qp, kp, qs, ks, block_q, block_k)
    bq = qb.shape[3]
    tp = qb.shape[0] * bq
    delta = jnp.einsum("bthu,bthu->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    dob = _blocks(pad_to(jnp.swapaxes(dout, 1, 2), 2, tp), 2, bq)  # [nq, B, H, bq, U]
    lseb = _blocks(pad_to(lse, 2, tp, -jnp.inf), 2, bq)  # [nq, B, H, bq]
    deltab = _blocks(pad_to(delta, 2, tp), 2, bq)

    def k_step(dq, kargs):
        kj, vj, kpj, ksj = kargs

        def q_step(carry, qargs):
            qi, doi, lsei, deltai, qpi, qsi = qargs
            mask = visible(qpi, kpj, qsi, ksj)[:, None]  # [B, 1, bq, bk]

            def compute(carry):
                dk, dv = carry
                s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32)
                lse_safe = jnp.where(jnp.isfinite(lsei), lsei, 0.0)
                p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)
                dv = dv + jnp.einsum("bhqk,bhqu->bhku", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bhqu,bhku->bhqk", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - deltai[..., None])).astype(qi.dtype)
                dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
                dqi = jnp.einsum("bhqk,bhkd->bhqd", ds, kj, preferred_element_type=jnp.float32)
                return (dk, dv), dqi

            def skip(carry):
                return carry, jnp.zeros(qi.shape, jnp.float32)

            return jax.lax.cond(jnp.any(mask), compute, skip, carry)

        init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        (dk, dv), dq_part = jax.lax.scan(q_step, init, (qb, dob, lseb, deltab, qpb, qsb))
        return dq + dq_part, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_step, jnp.zeros(qb.shape, jnp.float32), (kb, vb, kpb, ksb))
    dq = jnp.swapaxes(_unblocks(dq, 2)[:, :, :t], 1, 2).astype(q.dtype)
    dk = jnp.swapaxes(_unblocks(dk, 2)[:, :, :s], 1, 2).astype(k.dtype)
    dv = jnp.swapaxes(_unblocks(dv, 2)[:, :, :s], 1, 2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def blockwise_attention(q, k, v, qp, kp, qs, ks, block_q: int = 512, block_k: int = 512):
    """Same contract as `reference.attention_reference` (q pre-scaled; int32 positions and segments)."""
    return _forward(q, k, v, qp, kp, qs, ks, block_q, block_k)[0]


def _vjp_fwd(q, k, v, qp, kp, qs, ks, block_q, block_k):
    out, lse = _forward(q, k, v, qp, kp, qs, ks, block_q, block_k)
    return out, (q, k, v, qp, kp, qs, ks, out, lse)


def _vjp_bwd(block_q, block_k, res, dout):
    q, k, v, qp, kp, qs, ks, out, lse = res
    dq, dk, dv = _backward(q, k, v, qp, kp, qs, ks, out, lse, dout, block_q, block_k)
    return dq, dk, dv, None, None, None, None


blockwise_attention.defvjp(_vjp_fwd, _vjp_bwd)


def blockwise_attention_lse(q, k, v, qp, kp, qs, ks, block_q: int = 512, block_k: int = 512):
    """(out, lse [B, H, T]): the forward and its log-sum-exp residual (tests compare it with the reference's)."""
    return _forward(q, k, v, qp, kp, qs, ks, block_q, block_k)
