"""`gmm(..., layer=i)` on a stack of layers' expert weights [L, G, K, N]: the Pallas kernels (interpret mode) read the
stack in place at a traced layer index, as inside the scan over decoder layers, and equal the pure-JAX reference
beside them (which slices the layer) and an independent float64 numpy loop, for float and quantised weights, the
transposed read and the gradients (the stack's gradient is nonzero only at that layer). Fresh random inputs; the
seed is in the failure message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from small4_jax.quant import formats as quant
from small4_jax.kernels import GmmTiling, gmm
from small4_jax.kernels.gmm.reference import gmm_quant_reference, gmm_reference

L, M, K, N, G, LOCAL, OFFSET = 3, 45, 128, 48, 5, 3, 1  # a window of 3 local groups from group 1
TILING = GmmTiling(block_m=16, block_k=64, block_n=32, split_k=2)


def _case():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(M - 4, [0.3, 0.0, 0.3, 0.2, 0.2]).astype(np.int32)  # an empty group, rows past the sum
    return seed, rng, jnp.asarray(sizes)


def _np_gmm(lhs, w, sizes):
    """float64 per-group loop over the window's groups of one layer's weights w [LOCAL, K, N]."""
    lhs, w = np.asarray(lhs, np.float64), np.asarray(w, np.float64)
    out = np.zeros((lhs.shape[0], w.shape[2]))
    ends = np.cumsum(np.asarray(sizes))
    for j in range(w.shape[0]):
        lo, hi = ends[OFFSET + j] - sizes[OFFSET + j], ends[OFFSET + j]
        out[lo:hi] = lhs[lo:hi] @ w[j]
    return out


def _per_layer(fn):
    """fn(layer) for every layer, the layer a traced int32 of a scan (as in `model.run_layers`)."""
    return jax.jit(lambda: jax.lax.scan(lambda c, i: (c, fn(i)), 0, jnp.arange(L, dtype=jnp.int32))[1])()


def test_float_stack_read_at_a_traced_layer():
    seed, rng, gs = _case()
    stack = jnp.asarray(rng.normal(size=(L, LOCAL, K, N)), jnp.float32)
    lhs = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    out = _per_layer(lambda i: gmm(lhs, stack, gs, OFFSET, layer=i, backend="pallas", tiling=TILING))
    ref = _per_layer(lambda i: gmm_reference(lhs, stack, gs, OFFSET, layer=i))
    out_t = _per_layer(lambda i: gmm(dy, stack, gs, OFFSET, layer=i, transpose_rhs=True, backend="pallas",
                                     tiling=TILING))
    for layer in range(L):
        want = _np_gmm(lhs, stack[layer], gs)
        np.testing.assert_allclose(out[layer], want, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed} layer {layer}")
        np.testing.assert_allclose(ref[layer], want, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed} layer {layer}")
        want_t = _np_gmm(dy, np.swapaxes(np.asarray(stack[layer]), 1, 2), gs)
        np.testing.assert_allclose(out_t[layer], want_t, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed} layer {layer}")

    # gradients at layer 1 (traced): d lhs = dy @ W[1]^T, d stack = tgmm at layer 1 and zeros elsewhere
    def loss(backend, x, w, i):
        return jnp.vdot(gmm(x, w, gs, OFFSET, layer=i, backend=backend, tiling=TILING), dy)

    grads = jax.jit(jax.grad(lambda x, w, i: loss("pallas", x, w, i), argnums=(0, 1)))(lhs, stack, jnp.int32(1))
    want = jax.grad(lambda x, w: loss("reference", x, w, 1), argnums=(0, 1))(lhs, stack)
    for got, ref_g in zip(grads, want):
        np.testing.assert_allclose(got, ref_g, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    assert not np.any(np.asarray(grads[1])[[0, 2]]) and np.any(np.asarray(grads[1])[1])


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantised_stack_read_at_a_traced_layer(fmt):
    seed, rng, gs = _case()
    q = quant.quantize(jnp.asarray(rng.normal(size=(L, LOCAL, K, N)), jnp.float32), fmt)  # values and scales stacked
    lhs = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    out = _per_layer(lambda i: gmm(lhs, q, gs, OFFSET, layer=i, backend="pallas", tiling=TILING))
    ref = _per_layer(lambda i: gmm_quant_reference(lhs, q, gs, OFFSET, layer=i))
    out_t = _per_layer(lambda i: gmm(dy, q, gs, OFFSET, layer=i, transpose_rhs=True, backend="pallas", tiling=TILING))
    for layer in range(L):
        w = np.asarray(quant.dequantize(quant.QArray(q.values[layer], q.scale[layer]), jnp.float32))
        np.testing.assert_allclose(out[layer], _np_gmm(lhs, w, gs), rtol=1e-5, atol=1e-4,
                                   err_msg=f"seed {seed} layer {layer}")
        np.testing.assert_allclose(ref[layer], _np_gmm(lhs, w, gs), rtol=1e-5, atol=1e-4,
                                   err_msg=f"seed {seed} layer {layer}")
        np.testing.assert_allclose(out_t[layer], _np_gmm(dy, np.swapaxes(w, 1, 2), gs), rtol=1e-5, atol=1e-4,
                                   err_msg=f"seed {seed} layer {layer}")
    grad = jax.jit(jax.grad(lambda x, i: jnp.vdot(gmm(x, q, gs, OFFSET, layer=i, backend="pallas", tiling=TILING),
                                                  dy)))(lhs, jnp.int32(2))
    np.testing.assert_allclose(grad, out_t[2], rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
