"""`attention`: the model's one attention entry point (training, prefill, and the latent-cache `step`), over backends.

    attention(q [B, T, H, K], k [B, S, H, K], v [B, S, H, U], q_positions [B, T], k_positions [B, S],
              q_segments=None, k_segments=None, key_mask=None, impl="auto") -> [B, T, H, U]

q is already scaled (softmax scale x Llama-4 per-position factor, folded in by the caller). Key s is visible to
query t when k_positions[s] <= q_positions[t], key_mask[s] (if given) and k_segments[s] == q_segments[t] (if given).
A query that sees no key gets zeros. Semantics: `reference.py`.

Backends:
    "blockwise"  `blockwise.py`: flash attention in XLA (online softmax, custom VJP), O(T) memory forward and
                 backward. The default off GPUs; "auto" takes the reference instead when the queries and the keys
                 each fit in one block (then the blockwise path computes exactly that one block, and the plain
                 einsum compiles faster: short rows in tests, decoding over a short cache).
    "pallas"     `pallas_triton.py`: the same algorithm as fused Triton kernels (forward, dK/dV, dQ), the default on
                 NVIDIA GPUs; in Pallas interpret mode on a CPU (tests).
    "reference"  `reference.py`: every score materialised (O(T S) memory); the definition, for tests.
"auto" picks by the platform of the devices the program runs on (`small4_jax.platform`). On a mesh the Pallas kernels
run inside a `shard_map`: rows over the batch axis, heads over the heads axis (`sharding.RULES`).

Temporaries grow linearly with T for "pallas" and "blockwise", quadratically for "reference" (figures:
benchmarks/RESULTS.md, "Attention temporaries vs sequence length", `benchmarks/attention_memory.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from small4_jax.kernels.attention.blockwise import HIDDEN, blockwise_attention
from small4_jax.kernels.attention.pallas_triton import pallas_attention
from small4_jax.kernels.attention.reference import attention_reference
from small4_jax.parallel.sharding import mesh_axes, mesh_of
from small4_jax.platform import on_gpu

BACKENDS = ("auto", "blockwise", "pallas", "reference")


def resolve_impl(impl: str, *placed) -> str:
    """The backend for `impl`; "auto" follows the platform of `placed` (arrays, mesh; `small4_jax.platform`), so a
    CPU host compiling for GPU devices (`small4_jax.tools.aot`) gets the GPU kernel."""
    if impl not in BACKENDS:
        raise ValueError(f"attention impl must be one of {', '.join(BACKENDS)}, got {impl!r}")
    if impl == "auto":
        return "pallas" if on_gpu(*placed) else "blockwise"
    return impl


def normalise_masks(q_positions, k_positions, q_segments=None, k_segments=None, key_mask=None):
    """int32 (q_positions, k_positions, q_segments, k_segments): key padding becomes an unreachable key position,
    missing segments become one segment."""
    qp = jnp.asarray(q_positions, jnp.int32)
    kp = jnp.asarray(k_positions, jnp.int32)
    if key_mask is not None:
        kp = jnp.where(jnp.asarray(key_mask, bool), kp, HIDDEN)
    if (q_segments is None) != (k_segments is None):
        raise ValueError("attention: give both q_segments and k_segments, or neither")
    if q_segments is None:
        qs, ks = jnp.zeros(qp.shape, jnp.int32), jnp.zeros(kp.shape, jnp.int32)
    else:
        qs, ks = jnp.asarray(q_segments, jnp.int32), jnp.asarray(k_segments, jnp.int32)
    return qp, kp, qs, ks


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    impl: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    heads_axis: str = "heads",
) -> jax.Array:
    """Masked softmax attention (see the module docstring); block sizes and interpret mode default per backend.
    heads_axis: the logical axis (`sharding.RULES`) the heads are split over on a mesh ("vision_heads": the
    vision encoder's)."""
    b, t, h, d = q.shape
    if k.shape[:3] != (b, k.shape[1], h) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention expects q [B, T, H, K], k [B, S, H, K], v [B, S, H, U]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    qp, kp, qs, ks = normalise_masks(q_positions, k_positions, q_segments, k_segments, key_mask)
    auto = impl == "auto"
    impl = resolve_impl(impl, q)
    if auto and impl == "blockwise" and t <= (block_q or 512) and k.shape[1] <= (block_k or 512):
        impl = "reference"  # one block pair (module docstring)
    if impl == "reference":
        return attention_reference(q, k, v, qp, kp, qs, ks)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, qp, kp, qs, ks, block_q or 512, block_k or 512)
    if interpret is None:
        interpret = not on_gpu(q)
    kernel = functools.partial(pallas_attention, block_q=block_q, block_k=block_k, interpret=interpret)
    mesh = mesh_of(q)
    if mesh is None:
        return kernel(q, k, v, qp, kp, qs, ks)
    return _sharded(kernel, mesh, b, h, heads_axis)(q, k, v, qp, kp, qs, ks)


def _sharded(kernel, mesh, batch: int, heads: int, heads_axis: str = "heads"):
    """The kernel per shard: rows over the batch axis and heads over the heads axis of `sharding.RULES` where the
    mesh has them and they divide (a Pallas call is opaque to XLA's partitioner, which would otherwise gather every
    operand onto every device); other mesh axes see replicated attention, as XLA would compute it."""

    def axis(logical: str, size: int):
        names = mesh_axes(logical, mesh, size)
        return None if not names else names[0] if len(names) == 1 else names

    h_ax = axis(heads_axis, heads)
    taken = set() if h_ax is None else {h_ax} if isinstance(h_ax, str) else set(h_ax)
    b_ax = axis("batch", batch)
    if b_ax is not None and taken & ({b_ax} if isinstance(b_ax, str) else set(b_ax)):
        b_ax = None  # (the vision heads take every axis: its one packed row is whole on each)
    x, row = P(b_ax, None, h_ax, None), P(b_ax, None)
    # check_vma=False: a pallas_call inside shard_map does not type-check under varying-manual-axes checking
    return jax.shard_map(kernel, mesh=mesh, in_specs=(x, x, x, row, row, row, row), out_specs=x, check_vma=False)
