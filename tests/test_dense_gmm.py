"""`dense_impl: gmm`: the layers' dense projections (attention, shared expert, dense MLP, router) read their layer
stacks in place through the grouped-matmul kernel with one group (`moe.AtLayer.matmul`, closed over by
`model.run_layers`) instead of XLA slicing each layer's weights out of the stack. The serving step (paged, absorbed
MLA) with it equals the same step with XLA's products, for float and quantised weights (the quantised ones
dequantised in the kernel), with LoRA adapters on the attention projections and the router added as before. Pallas
interpret mode on a CPU: the math, not the GPU (tests/test_aot.py compiles it for H200)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from small4_jax.lora import adapters as lora
from small4_jax.nn import moe
from small4_jax.nn import paged
from small4_jax.config import Small4Config
from small4_jax.errors import ConfigError
from small4_jax.nn.model import init_model
from tests.test_paged import PAGE, TINY, _slots

CONFIG = Small4Config.from_yaml(TINY).replace(vision=None)  # 2 MoE layers: one stack
# in the scan body: q_a, q_b, kv_a, o_proj (absorbed MLA slices kv_b: it folds it into the query per head), the
# shared expert's gate, up, down (the dense layers' MLP is the same module) and the router
IN_PLACE_PRODUCTS = 8


def _pallas_calls(jaxpr) -> int:
    """pallas_call equations in a jaxpr and every jaxpr nested in its equations' parameters."""
    def nested(x):
        return hasattr(x, "eqns") or hasattr(getattr(x, "jaxpr", None), "eqns")

    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            n += 1
            continue
        for p in jax.tree.leaves(eqn.params, is_leaf=nested):
            if nested(p):
                n += _pallas_calls(p if hasattr(p, "eqns") else p.jaxpr)
    return n


def _step(graphdef, state):
    b, t = 2, 5
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CONFIG.vocab_size, (b, t)).astype(np.int32)
    pos = (600 + np.arange(t))[None].repeat(b, 0).astype(np.int32)
    table = np.array([[5, 2], [1, 7]], np.int32)
    idx = np.arange(t)
    slots = np.concatenate([_slots(table[r:r + 1], idx) for r in range(b)])
    pages = paged.PagedCache.create(CONFIG, num_pages=9, page_size=PAGE).pages
    args = (pages, ids, pos, idx[None].repeat(b, 0).astype(np.int32), slots, table, np.array([t - 1, 2], np.int32))

    def run(state, *args):
        return paged.logits_step(graphdef, state, *args, absorbed=True)

    return jax.jit(run)(state, *args), _pallas_calls(jax.make_jaxpr(run)(state, *args).jaxpr)


@pytest.mark.parametrize("fmt", [None, "int8", "int4-all", "fp8"])  # int8: the default int4 policy's dense linears
def test_the_serving_step_with_dense_gmm_equals_xla(fmt):
    out = {}
    for impl in ("xla", "gmm"):
        model = init_model(CONFIG.replace(dense_impl=impl), seed=3, quantize=fmt)
        lora.apply_lora(model, lora.LoRAConfig(targets=["attention", "router"], rank=4, alpha=8.0))
        for _, b in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            if b.shape[-2] == 4:  # lora_b [(L,) r, out]: zero at init; give the adapters an effect
                b.set_value(jax.random.normal(jax.random.key(b.shape[-1]), b.shape) * 0.05)
        out[impl] = _step(*nnx.split(model))
    (logits, pages), jaxpr = out["gmm"]
    (want_logits, want_pages), want_jaxpr = out["xla"]
    assert (jaxpr, want_jaxpr) == (IN_PLACE_PRODUCTS, 0)  # pallas_calls: one per dense product
    scale = float(jnp.max(jnp.abs(want_logits)))
    assert float(jnp.max(jnp.abs(logits - want_logits))) < 1e-5 * scale
    np.testing.assert_allclose(np.asarray(pages), np.asarray(want_pages), rtol=1e-5, atol=1e-5)


def test_dense_impl_auto_is_xla_off_gpus_and_a_bad_name_is_refused():
    assert moe.resolve_dense_impl("auto", jnp.zeros(2)) == "xla"  # a CPU array
    assert moe.resolve_dense_impl("gmm", jnp.zeros(2)) == "gmm"
    with pytest.raises(ConfigError, match="dense_impl"):
        CONFIG.replace(dense_impl="cublas")


def test_one_group_at_decode_is_one_row_tile_with_bounded_split_k_partials():
    """A dense projection (one group) of up to 64 rows streams its weight once: one row tile; its float32 split-K
    partials stay at most 256 rows; the tiling fits Hopper's limits (bf16 and float32, Small 4's dense shapes)."""
    from small4_jax.kernels.gmm import tiling as T

    for m in range(1, 65):
        for dtype in (jnp.bfloat16, jnp.float32):
            for k, n in ((4096, 1024), (1024, 4096), (4096, 320), (256, 6144), (4096, 4096), (4096, 2048),
                         (2048, 4096), (4096, 128)):
                t = T.gmm_tiling(m, k, n, 1, dtype)
                assert t.block_m >= m and t.block_m <= 64 and t.split_k * t.block_m <= 256, (m, k, n, t)
                assert not T.check_tiling(t, dtype, T.HOPPER, "gmm", m=m, n=n), (m, k, n, t)
    assert T.gmm_tiling(16, 4096, 4096, 1, jnp.bfloat16).split_k == 16  # 64 column tiles x 16 K slices
    assert T.gmm_tiling(65, 4096, 4096, 1, jnp.bfloat16).split_k == 1  # more rows: the prefill tiling
