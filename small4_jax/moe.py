"""Routing and the routed-expert dispatch of the Mistral Small 4 MoE layer, as plain functions.

`route` turns router logits into top-k expert ids and weights (fp32: softmax over all experts, group-limited top-k,
renormalise, scale). `routed_experts` is the one dispatch function every MoE layer calls: it sorts the token-expert
pairs by expert, runs a grouped matmul over the sorted rows (gate+up, SwiGLU, down), unsorts with a gather and applies
the router weights. The grouped matmul is chosen by `impl`; "ragged_dot" (`jax.lax.ragged_dot`) is the pure-JAX path
and "dense" evaluates every expert on every token (a reference for tests). A Pallas kernel goes behind the same
function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("ragged_dot", "dense")


class ExpertLoRA(NamedTuple):
    """Per-expert low-rank adapters: W_e + scale * A_e @ B_e for gate_up and for down."""

    gate_up_a: jax.Array  # [E, H, r]
    gate_up_b: jax.Array  # [E, r, 2F]
    down_a: jax.Array  # [E, F, r]
    down_b: jax.Array  # [E, r, H]
    scale: float


def resolve_impl(impl: str) -> str:
    """The grouped-matmul implementation to use for `impl` ("auto" -> the fastest correct one here)."""
    if impl == "auto":
        return "ragged_dot"
    if impl not in IMPLS:
        raise ValueError(f"unknown moe impl {impl!r}; expected 'auto' or one of {IMPLS}")
    return impl


def route(
    logits: jax.Array,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] -> (expert ids [N, k] int32, weights [N, k] float32).

    Softmax over all experts comes first. With n_group > 1 each group is scored by the sum of its two largest
    probabilities (as transformers), only the best `topk_group` groups stay eligible, and the top-k experts are taken
    among them. Weights are the unmasked probabilities of the picks, renormalised when `norm_topk_prob`.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    n, e = probs.shape
    choice = probs
    if n_group > 1:
        grouped = probs.reshape(n, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, keep = jax.lax.top_k(group_scores, topk_group)  # [N, topk_group]
        group_mask = jnp.zeros((n, n_group), jnp.bool_).at[jnp.arange(n)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), probs, 0.0)
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * routed_scaling_factor


def routed_experts(
    x: jax.Array,
    expert_ids: jax.Array,
    expert_weights: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    impl: str = "auto",
    lora: ExpertLoRA | None = None,
) -> jax.Array:
    """Mixture of routed SwiGLU experts.

    x [N, H]; expert_ids, expert_weights [N, k]; gate_up [E, H, 2F] (gate columns first, then up); down [E, F, H].
    Returns sum_k w_k * down_e(act(x gate_e) * (x up_e)) as [N, H] in x.dtype. With `lora`, each expert's weights
    are W_e + scale * A_e B_e, computed as extra grouped matmuls over the same sorted rows (never merged).
    """
    impl = resolve_impl(impl)
    if impl == "dense":
        return _dense_experts(x, expert_ids, expert_weights, gate_up, down, act, lora)
    n, k = expert_ids.shape
    num_experts = gate_up.shape[0]
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # sorted row r holds pair order[r]
    rows = x[order // k]  # [N*k, H], grouped by expert
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    def gmm(lhs, rhs):
        return jax.lax.ragged_dot(lhs, rhs.astype(x.dtype), group_sizes)

    h = gmm(rows, gate_up)
    if lora is not None:
        h = h + lora.scale * gmm(gmm(rows, lora.gate_up_a), lora.gate_up_b)
    f = h.shape[-1] // 2
    a = act(h[:, :f]) * h[:, f:]
    y = gmm(a, down)  # [N*k, H]
    if lora is not None:
        y = y + lora.scale * gmm(gmm(a, lora.down_a), lora.down_b)
    inverse = jnp.argsort(order)  # a gather, not a scatter: its transpose is a gather too
    y = y[inverse].reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), expert_weights.astype(jnp.float32)).astype(x.dtype)


def _dense_experts(x, expert_ids, expert_weights, gate_up, down, act, lora=None):
    """Every expert on every token, combined by one-hot routing weights: O(E) work, for reference."""
    num_experts = gate_up.shape[0]
    if lora is not None:  # merged weights: fine for a reference
        gate_up = gate_up + lora.scale * jnp.einsum("ehr,erf->ehf", lora.gate_up_a, lora.gate_up_b)
        down = down + lora.scale * jnp.einsum("efr,erh->efh", lora.down_a, lora.down_b)
    combine = jnp.einsum(
        "nke,nk->ne", jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), expert_weights.astype(jnp.float32)
    )
    h = jnp.einsum("nh,ehf->enf", x, gate_up.astype(x.dtype))
    f = h.shape[-1] // 2
    a = act(h[..., :f]) * h[..., f:]
    y = jnp.einsum("enf,efh->enh", a, down.astype(x.dtype))
    return jnp.einsum("enh,ne->nh", y.astype(jnp.float32), combine).astype(x.dtype)
