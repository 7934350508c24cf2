"""The routed-expert dispatch: sort-based grouped matmul == every-expert dense reference, with and without LoRA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from small4_jax.nn.moe import ExpertLoRA, route, routed_experts


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


@pytest.mark.parametrize("n,e,k,tile", [(1, 8, 2, None), (37, 6, 3, None), (23, 5, 4, 3), (64, 4, 2, 128)])
def test_tiled_experts_equal_the_dense_reference(n, e, k, tile):
    """The CPU tiled loop (what `auto` runs on one CPU device) == the every-expert reference, values and grads, on
    fresh random inputs: one token, uneven groups, tiles of one row, tiles wider than any group."""
    import small4_jax.nn.moe as moe

    x, ids, w, gate_up, down, _ = _inputs(np.random.randint(1 << 30), n=n, e=e, k=k)
    ref = jax.jit(functools.partial(routed_experts, impl="dense"))(x, ids, w, gate_up, down)
    tiled = jax.jit(moe._tiled_experts, static_argnums=(5, 6))
    np.testing.assert_allclose(tiled(x, ids, w, gate_up, down, jax.nn.silu, tile), ref, rtol=1e-5, atol=1e-5)
    if tile is None:  # what `auto` runs here
        auto = jax.jit(functools.partial(routed_experts, impl="auto"))(x, ids, w, gate_up, down)
        np.testing.assert_allclose(auto, ref, rtol=1e-5, atol=1e-5)
    if tile == 128:
        return  # values only: the gradients below cover one tile per row, uneven groups and the default tile

    def loss(fn):
        return lambda x, gu, d: jnp.sum(fn(x, gu, d) ** 2)

    ours = jax.jit(jax.grad(loss(lambda x, gu, d: moe._tiled_experts(x, ids, w, gu, d, jax.nn.silu, tile)),
                            argnums=(0, 1, 2)))(x, gate_up, down)
    theirs = jax.jit(jax.grad(loss(lambda x, gu, d: routed_experts(x, ids, w, gu, d, impl="dense")),
                              argnums=(0, 1, 2)))(x, gate_up, down)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_tiled_experts_quantised_and_bf16():
    """Quantised experts through the tiled loop == the reference on the dequantised weights; bf16 within bf16."""
    import small4_jax.nn.moe as moe
    from small4_jax.quant import formats as quant

    x, ids, w, gate_up, down, _ = _inputs(np.random.randint(1 << 30), n=19, h=32, f=16, e=6, k=2)
    gu, dn = quant.quantize(gate_up, "int8"), quant.quantize(down, "int8")
    dense = jax.jit(functools.partial(routed_experts, impl="dense"))
    ref = dense(x, ids, w, quant.dequantize(gu), quant.dequantize(dn))
    got = jax.jit(functools.partial(routed_experts, impl="tiled"))(x, ids, w, gu, dn)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    xb, gb, db = (a.astype(jnp.bfloat16) for a in (x, gate_up, down))
    ref = dense(xb.astype(jnp.float32), ids, w, gb.astype(jnp.float32), db.astype(jnp.float32))
    got = jax.jit(moe._tiled_experts, static_argnums=(5,))(xb, ids, w, gb, db, jax.nn.silu)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ref, rtol=3e-2, atol=3e-2 * float(jnp.abs(ref).max()))


def test_tile_rows_follow_the_mean_group_size():
    from small4_jax.nn.moe import tile_rows

    assert [tile_rows(p, 16) for p in (4, 16, 17, 64, 65, 1024, 4096, 1 << 20)] == [1, 1, 2, 4, 8, 64, 128, 128]
    assert tile_rows(8, 4) == 2 and tile_rows(1, 128) == 1


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_tiled_experts_read_a_layer_stack_in_place(fmt):
    """Under a layer scan the CPU tiled loop takes the frozen stacks whole (`AtLayer`) and == the dense reference on
    each layer's slice; the compiled scan never holds one layer's experts as an array of their own (the copy that
    slicing the layer first made every step)."""
    from small4_jax.quant import formats as quant
    from small4_jax.nn.moe import AtLayer

    e, h, f, layers = 6, 16, 8, 3
    x, ids, w, gate_up, down, _ = _inputs(np.random.randint(1 << 30), n=9, h=h, f=f, e=e, k=2)
    gu = jnp.stack([gate_up * (1 + 0.5 * i) for i in range(layers)])
    dn = jnp.stack([down[:, :, ::-1] * (1 - 0.2 * i) for i in range(layers)])
    if fmt:
        gu, dn = quant.quantize(gu, fmt), quant.quantize(dn, fmt)

    def run(x, gu, dn):
        def body(y, i):
            y = routed_experts(y, ids, w, AtLayer(gu, i), AtLayer(dn, i), impl="auto")  # one CPU device: tiled
            return y, None

        return jax.lax.scan(body, x, jnp.arange(layers, dtype=jnp.int32))[0]

    float_gu, float_dn = (quant.dequantize(a) for a in (gu, dn)) if fmt else (gu, dn)
    ref = x
    for i in range(layers):
        ref = routed_experts(ref, ids, w, float_gu[i], float_dn[i], impl="dense")
    got = jax.jit(run)(x, gu, dn)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    text = jax.jit(run).lower(x, gu, dn).compile().as_text()
    dtype = "s8" if fmt else "f32"
    for shape in ((e, h, 2 * f), (e, f, h), (1, e, h, 2 * f), (1, e, f, h)):
        assert f"{dtype}[{','.join(map(str, shape))}]" not in text, shape
