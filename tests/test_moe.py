"""The routed-expert dispatch: sort-based grouped matmul == every-expert dense reference, with and without LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from small4_jax.moe import ExpertLoRA, route, routed_experts


def _inputs(seed, n=37, h=16, f=8, e=6, k=2, r=3):
    ks = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(ks[0], (n, h))
    ids, w = route(jax.random.normal(ks[1], (n, e)) * 2, top_k=k)
    gate_up = jax.random.normal(ks[2], (e, h, 2 * f)) * 0.3
    down = jax.random.normal(ks[3], (e, f, h)) * 0.3
    lora = ExpertLoRA(jax.random.normal(ks[4], (e, h, r)) * 0.3, jax.random.normal(ks[5], (e, r, 2 * f)) * 0.3,
                      jax.random.normal(ks[6], (e, f, r)) * 0.3, jax.random.normal(ks[7], (e, r, h)) * 0.3, 0.5)
    return x, ids, w, gate_up, down, lora


@pytest.mark.parametrize("with_lora", [False, True])
def test_sorted_dispatch_equals_dense(with_lora):
    x, ids, w, gate_up, down, lora = _inputs(np.random.randint(1 << 30))
    lora = lora if with_lora else None
    ours = routed_experts(x, ids, w, gate_up, down, impl="ragged_dot", lora=lora)
    ref = routed_experts(x, ids, w, gate_up, down, impl="dense", lora=lora)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    def loss(impl):
        return lambda x, gu, d: jnp.sum(routed_experts(x, ids, w, gu, d, impl=impl, lora=lora) ** 2)

    g_ours = jax.grad(loss("ragged_dot"), argnums=(0, 1, 2))(x, gate_up, down)
    g_ref = jax.grad(loss("dense"), argnums=(0, 1, 2))(x, gate_up, down)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_group_limited_routing_only_picks_kept_groups():
    logits = jax.random.normal(jax.random.key(0), (64, 16)) * 3
    ids, w = route(logits, top_k=3, n_group=4, topk_group=2)
    probs = jax.nn.softmax(logits, -1).reshape(64, 4, 4)
    group_score = jnp.sort(probs, -1)[..., -2:].sum(-1)
    kept = jnp.argsort(-group_score, -1)[:, :2]
    assert bool(jnp.all(jnp.isin(ids // 4, kept) if False else jnp.any((ids // 4)[..., None] == kept[:, None], -1)))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 37])
def test_cpu_auto_paths_equal_the_sorted_dispatch(n):
    """`auto` on a CPU: the top-k gather (few pairs) and dense (many) give the grouped matmul's result and grads."""
    import small4_jax.moe as moe

    x, ids, w, gate_up, down, _ = _inputs(n, n=n, e=8)
    ref = routed_experts(x, ids, w, gate_up, down, impl="ragged_dot")
    np.testing.assert_allclose(routed_experts(x, ids, w, gate_up, down, impl="auto"), ref, rtol=1e-5, atol=1e-5)
    assert moe.cpu_impl(n * ids.shape[1], 8) == ("gather" if n == 1 else "dense")
    gathered = moe._gathered_experts(x, ids, w, gate_up, down, jax.nn.silu)
    np.testing.assert_allclose(gathered, ref, rtol=1e-5, atol=1e-5)

    def loss(impl):
        return lambda x, gu, d: jnp.sum(routed_experts(x, ids, w, gu, d, impl=impl) ** 2)

    for a, b in zip(jax.grad(loss("auto"), argnums=(0, 1, 2))(x, gate_up, down),
                    jax.grad(loss("ragged_dot"), argnums=(0, 1, 2))(x, gate_up, down)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
