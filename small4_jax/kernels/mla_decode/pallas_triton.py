"""Ragged paged MLA attention as a Pallas kernel (Triton backend): split-KV over page ranges, then a combine step.

Work items (FlashMLA's scheme, computed on device from the rows' lengths, no host synchronisation): row b holds
K_b = max_t seq_index[b, t] + 1 keys; the keys of every row are cut into spans of S tokens (a multiple of the page
size), and each span is one work item (row, first key, end key). S is the smallest multiple of the page size that is
at least `min_split` and keeps the number of spans within the static `num_work` (= B + `kv_splits`), so a batch with
one 256K row and 63 short rows spends ~kv_splits programs on the long row and one on each short row: the work and
the reads of a row follow its own length, and the partial results held are [num_work, M, R] whatever the lengths.

grid (work item, query block): the program loads the queries of its row (a block of `block_m` of the T x nh
flattened query rows, q_lat and q_pe) and walks the pages of its span one page at a time: page id from the page
table, the page's latent and RoPE-key rows, fp32 scores times the per-query scale, the causal limit of each query
(key index <= seq_index), online softmax, and a value product against the same latent rows. It writes its partial
output (normalised) and log-sum-exp; `combine` merges the spans of each row (a log-sum-exp weighted sum).

Shapes the kernel takes as they are: kv_lora_rank, qk_rope_head_dim and page_size powers of two (Triton blocks), the
flattened query rows are padded to block_m. On GPUs Triton's dot needs page_size, block_m and R >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # deprecated in jax 0.11 and slated for removal: keep the package importable without it
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

_WHOLE = pl.BlockSpec()


def available() -> bool:
    return plgpu is not None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(q_lat_shape, q_pe_shape, page_size: int) -> tuple[bool, str]:
    """Whether the kernel takes these shapes; (False, why) otherwise."""
    r, dr = q_lat_shape[-1], q_pe_shape[-1]
    if plgpu is None:
        return False, f"jax {jax.__version__} has no Pallas Triton backend"
    for name, v in (("kv_lora_rank", r), ("qk_rope_head_dim", dr), ("page_size", page_size)):
        if not _pow2(v):
            return False, f"{name} {v} is not a power of two"
    return True, ""


def work_items(seq_index, page_size: int, num_work: int, min_split: int):
    """(row, start, end) int32 [num_work] each: spans of keys [start, end) of row `row`; unused items have
    start == end == 0 and row == B (dropped by the combine)."""
    b = seq_index.shape[0]
    n_keys = jnp.max(seq_index, axis=1).astype(jnp.int32) + 1  # [B]
    extra = max(num_work - b, 1)
    total = jnp.sum(n_keys)
    span = jnp.maximum(min_split, (total + extra - 1) // extra)
    span = (span + page_size - 1) // page_size * page_size  # spans start on page boundaries
    count = (n_keys + span - 1) // span  # >= 1 per row
    ends = jnp.cumsum(count)
    w = jnp.arange(num_work, dtype=jnp.int32)
    row = jnp.searchsorted(ends, w, side="right").astype(jnp.int32)  # B for unused items
    used = row < b
    safe = jnp.minimum(row, b - 1)
    start = (w - (ends[safe] - count[safe])) * span
    end = jnp.minimum(start + span, n_keys[safe])
    zero = jnp.zeros_like(start)
    return row, jnp.where(used, start, zero), jnp.where(used, end, zero)


def _dot(a, b, dims, upcast: bool):
    """a . b with fp32 accumulation. upcast (interpret mode): in fp32, which gives the same products for bf16 inputs
    (exact in fp32) where XLA:CPU has no bf16 x bf16 -> f32 dot."""
    if upcast:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None  # fp32: IEEE products, not TF32
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _kernel(layer_ref, row_ref, start_ref, end_ref, table_ref, q_ref, qpe_ref, limit_ref, scale_ref, pages_ref,
            o_ref, lse_ref, *, page: int, r: int, dr: int, bm: int, num_rows: int, upcast: bool):
    w, mb = pl.program_id(0), pl.program_id(1)
    row = jnp.minimum(row_ref[w], num_rows - 1)
    start, end = start_ref[w], end_ref[w]
    layer = layer_ref[0]
    rows = pl.ds(mb * bm, bm)
    q = plgpu.load(q_ref.at[row, rows, :])  # [bm, R]
    qpe = plgpu.load(qpe_ref.at[row, rows, :])  # [bm, r]
    limit = plgpu.load(limit_ref.at[row, rows])  # [bm] int32
    scale = plgpu.load(scale_ref.at[row, rows])  # [bm] fp32
    nt = (((1,), (1,)), ((), ()))

    def body(p, carry):
        m, l, acc = carry
        page_id = table_ref[row, p]
        latent = plgpu.load(pages_ref.at[layer, page_id, :, pl.ds(0, r)]).astype(q.dtype)  # [page, R]
        rope = plgpu.load(pages_ref.at[layer, page_id, :, pl.ds(r, dr)]).astype(q.dtype)  # [page, r]
        s = _dot(q, latent, nt, upcast) + _dot(qpe, rope, nt, upcast)
        s = s * scale[:, None]
        key = p * page + jnp.arange(page, dtype=jnp.int32)
        ok = (key[None, :] <= limit[:, None]) & (key[None, :] < end)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a query with no visible key in this span so far
        alpha = jnp.exp(m - m_safe)
        prob = jnp.exp(s - m_safe[:, None])
        l = l * alpha + jnp.sum(prob, axis=1)
        acc = acc * alpha[:, None] + _dot(prob.astype(q.dtype), latent, (((1,), (0,)), ((), ())), upcast)
        return m_new, l, acc

    first, last = start // page, (end + page - 1) // page
    init = (jnp.full((bm,), -jnp.inf, jnp.float32), jnp.zeros((bm,), jnp.float32),
            jnp.zeros((bm, r), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first, last, body, init)
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    plgpu.store(o_ref.at[w, rows, :], acc / l_safe[:, None])
    plgpu.store(lse_ref.at[w, rows], jnp.where(has, m + jnp.log(l_safe), -jnp.inf))


def combine(o, lse, row, num_rows: int, return_lse: bool = False):
    """Merge the spans: o [N, M, R], lse [N, M] of work items on rows `row` [N] -> [num_rows, M, R] fp32 (with
    return_lse, and the rows' log-sum-exps [num_rows, M]; a row with no visible key: 0 and -inf)."""
    m = jax.ops.segment_max(lse, row, num_segments=num_rows + 1)  # row == num_rows: unused items
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    weight = jnp.exp(lse - m[row])
    weight = jnp.where(jnp.isfinite(lse), weight, 0.0)
    num = jax.ops.segment_sum(weight[..., None] * o, row, num_segments=num_rows + 1)
    den = jax.ops.segment_sum(weight, row, num_segments=num_rows + 1)[:num_rows]
    has = den > 0
    den = jnp.where(has, den, 1.0)
    out = num[:num_rows] / den[:, :, None]
    if return_lse:
        return out, jnp.where(has, m[:num_rows] + jnp.log(den), -jnp.inf)
    return out


@functools.partial(jax.jit, static_argnames=("kv_splits", "min_split", "block_m", "num_warps", "num_stages",
                                             "interpret", "return_lse"))
def mla_pallas(q_lat, q_pe, pages, layer, page_table, seq_index, scale, *, kv_splits: int = 64,
               min_split: int = 256, block_m: int = 32, num_warps: int = 4, num_stages: int = 2,
               interpret: bool = False, return_lse: bool = False):
    """The attended latent [B, T, nh, R] (fp32) of `reference.mla_reference`, as split-KV work items + combine.

    kv_splits: work items beyond one per row (0: one item per row, the whole prefix; for prefill chunks, whose
    query blocks already fill the GPU). min_split: fewest keys per span. return_lse: also the log-sum-exp
    [B, T, nh] (a query with no visible key, seq_index -1: output 0, lse -inf; a context shard's partial).
    """
    if plgpu is None:
        raise NotImplementedError(f"jax {jax.__version__} has no Pallas Triton backend")
    b, t, nh, r = q_lat.shape
    dr = q_pe.shape[-1]
    page = pages.shape[2]
    m = t * nh
    bm = min(block_m, max(16, 1 << (m - 1).bit_length()))
    mp = -(-m // bm) * bm
    pad = ((0, 0), (0, mp - m), (0, 0))
    q = jnp.pad(q_lat.reshape(b, m, r), pad)
    qpe = jnp.pad(q_pe.reshape(b, m, dr).astype(q_lat.dtype), pad)
    limit = jnp.pad(jnp.repeat(seq_index.astype(jnp.int32), nh, axis=1), ((0, 0), (0, mp - m)))
    scale = jnp.pad(jnp.repeat(scale.astype(jnp.float32), nh, axis=1), ((0, 0), (0, mp - m)))
    num_work = b + kv_splits if kv_splits > 0 else b
    if kv_splits > 0:
        row, start, end = work_items(seq_index, page, num_work, min_split)
    else:  # one item per row: its whole prefix
        row = jnp.arange(b, dtype=jnp.int32)
        start = jnp.zeros((b,), jnp.int32)
        end = jnp.max(seq_index, axis=1).astype(jnp.int32) + 1
    kernel = functools.partial(_kernel, page=page, r=r, dr=dr, bm=bm, num_rows=b, upcast=interpret)
    o, lse = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((num_work, mp, r), jnp.float32),
                   jax.ShapeDtypeStruct((num_work, mp), jnp.float32)),
        grid=(num_work, mp // bm),
        in_specs=[_WHOLE] * 10,
        out_specs=(_WHOLE, _WHOLE),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="small4_mla",
    )(jnp.asarray(layer, jnp.int32).reshape(1), row, start, end, page_table.astype(jnp.int32), q, qpe, limit, scale,
      pages)
    if kv_splits > 0:
        out, lse = combine(o, lse, row, b, return_lse=True)
    else:
        out = o
    out = out[:, :m].reshape(b, t, nh, r)
    return (out, lse[:, :m].reshape(b, t, nh)) if return_lse else out
