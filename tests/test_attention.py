"""The O(T) attention backends equal the reference (`kernels/attention/reference.py`), forward and gradients, in
float32 on fresh random inputs: causal rows, packed rows (segments, restarting positions), padded rows (right and
left padding: a query that sees nothing gives zeros), a prefix cache (queries at absolute positions over slots), and
at model level a long sequence past original_max_position_embeddings, where the Llama-4 query scale folded into q is
non-trivial. Lengths are deliberately not multiples of the blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from small4_jax.config import Small4Config
from small4_jax.kernels.attention import attention, attention_reference, blockwise_attention_lse, normalise_masks
from small4_jax.nn.model import MLA, llama4_query_scale, rope_cos_sin

B, H, K, U = 2, 3, 24, 16
BLOCK = 8


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _case(name: str, seed: int):
    """(q, k, v, mask kwargs) for one masking case."""
    rng = np.random.default_rng(seed)
    t = s = 37
    kw = {}
    if name == "causal":
        pos = np.broadcast_to(np.arange(t), (B, t))
        kw = dict(q_positions=pos, k_positions=pos)
    elif name == "packed":  # three documents of 15, 13 and 9 tokens in each row, positions restart per document
        pos = np.concatenate([np.arange(15), np.arange(13), np.arange(9)])[None].repeat(B, 0)
        seg = np.array([1] * 15 + [2] * 13 + [3] * 9)[None].repeat(B, 0)
        kw = dict(q_positions=pos, k_positions=pos, q_segments=seg, k_segments=seg)
    elif name == "padded":  # row 0 right-padded (last 9 keys), row 1 left-padded (first 6 keys: those queries see none)
        pos = np.broadcast_to(np.arange(t), (B, t))
        mask = np.ones((B, t), bool)
        mask[0, -9:] = False
        mask[1, :6] = False
        kw = dict(q_positions=pos, k_positions=pos, key_mask=mask)
    elif name == "cache":  # 5 new tokens at positions 30..34 per row over 41 slots (slots past them unwritten)
        t, s = 5, 41
        qpos = np.array([30, 20])[:, None] + np.arange(t)
        kw = dict(q_positions=qpos, k_positions=np.broadcast_to(np.arange(s), (B, s)))
    q = jnp.asarray(rng.normal(size=(B, t, H, K)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, s, H, K)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, s, H, U)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(B, t, H, U)), jnp.float32)  # output cotangent
    return q, k, v, ct, {n: jnp.asarray(x) for n, x in kw.items()}


def _value_and_grads(impl, q, k, v, ct, kw):
    def f(q, k, v):
        out = attention(q, k, v, impl=impl, block_q=BLOCK, block_k=BLOCK, **kw)
        return jnp.sum(out * ct), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


CASES = ("causal", "packed", "padded", "cache")
IMPLS = ("blockwise", "pallas")  # pallas: interpret mode on a CPU


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_backend_equals_reference_forward_and_gradients(impl, case):
    q, k, v, ct, kw = _case(case, seed=CASES.index(case))
    ref_out, ref_grads = _value_and_grads("reference", q, k, v, ct, kw)
    out, grads = _value_and_grads(impl, q, k, v, ct, kw)
    assert np.isfinite(np.asarray(ref_out)).all()
    assert _rel(out, ref_out) < 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert _rel(g, r) < 1e-5, (name, _rel(g, r))
    if case == "padded":  # the left-padded row's first queries see no key: zeros, with zero gradients
        np.testing.assert_array_equal(np.asarray(out)[1, :6], 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0])[1, :6], 0.0)


def test_pallas_on_a_mesh_runs_per_shard_and_equals_reference():
    """Under a mesh the kernel runs in a shard_map (rows over data, heads over tensor): same values and gradients."""
    q, k, v, ct, kw = _case("packed", seed=5)
    ref_out, ref_grads = _value_and_grads("reference", q, k, v, ct, kw)
    mesh = jax.make_mesh((2, 1, 3), ("data", "expert", "tensor"), devices=jax.devices()[:6],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        out, grads = jax.jit(lambda *a: _value_and_grads("pallas", *a, kw))(q, k, v, ct)
    assert _rel(out, ref_out) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-5


def test_blockwise_log_sum_exp_equals_reference():
    q, k, v, _, kw = _case("packed", seed=7)
    qp, kp, qs, ks = normalise_masks(**kw)
    _, lse = blockwise_attention_lse(q, k, v, qp, kp, qs, ks, BLOCK, BLOCK)
    _, ref = attention_reference(q, k, v, qp, kp, qs, ks, return_lse=True)
    assert _rel(lse, ref) < 1e-6


def test_bad_arguments_are_named():
    q, k, v, _, kw = _case("causal", seed=0)
    with pytest.raises(ValueError, match="impl must be one of auto, blockwise, pallas, reference, got 'flash'"):
        attention(q, k, v, impl="flash", **kw)
    with pytest.raises(ValueError, match="give both q_segments and k_segments"):
        attention(q, k, v, q_segments=kw["q_positions"], **kw)
    with pytest.raises(ValueError, match=r"attention expects q \[B, T, H, K\]"):
        attention(q, k[..., :-1], v, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Model level: MLA with the O(T) backend = MLA with the reference, on a long row (Llama-4 scale > 1).
CFG = Small4Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                   q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                   max_position_embeddings=1 << 16, original_max_position_embeddings=16, rope_factor=4.0,
                   llama_4_scaling_beta=0.3, initializer_range=0.3, first_k_dense_replace=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_mla_long_packed_row_equals_reference(impl):
    rng = np.random.default_rng(11)
    t = 45
    # two packed documents, the second starting deep into a long context (positions 3000+)
    positions = jnp.asarray(np.concatenate([np.arange(20), 3000 + np.arange(25)])[None].repeat(2, 0), jnp.int32)
    segments = jnp.asarray(np.array([0] * 20 + [1] * 25)[None].repeat(2, 0), jnp.int32)
    assert float(llama4_query_scale(CFG, positions).max()) > 1.5
    x = jnp.asarray(rng.normal(size=(2, t, CFG.hidden_size)), jnp.float32)
    cos, sin = rope_cos_sin(CFG, positions)
    results = []
    for which in ("reference", impl):
        mla = MLA(CFG.replace(attn_impl=which), dtype="float32", rngs=nnx.Rngs(5))
        graphdef, params = nnx.split(mla)

        def loss(p):
            out = nnx.merge(graphdef, p)(x, positions, cos, sin, None, None, segments)[0]
            return jnp.sum(jnp.sin(out)), out

        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))
    ((_, ref_out), ref_g), ((_, out), g) = results
    assert _rel(out, ref_out) < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        assert _rel(a, b) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# GPU: the Pallas kernels at Small 4's attention dims compile for sm_90a, with temporaries linear in T.
@pytest.mark.gpu_compile
def test_flash_attention_compiles_for_h100_at_real_dims_with_linear_memory():
    """32 heads, 128-d q/k/v, bf16, 4 packed rows of 8192 tokens per micro-batch, forward + backward, one H100."""
    from small4_jax.tools import aot

    mesh = aot.gpu_mesh("h100", {"data": 1}, topology="1x1x1")

    def compiled(t):
        x = aot.spec((4, t, 32, 128), jnp.bfloat16, mesh)
        ids = aot.spec((4, t), jnp.int32, mesh)

        def grads(q, k, v, pos, seg):
            def loss(q, k, v):
                o = attention(q, k, v, q_positions=pos, k_positions=pos, q_segments=seg, k_segments=seg)
                return jnp.sum(o.astype(jnp.float32))

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        return aot.compile_for(grads, x, x, x, ids, ids, mesh=mesh)

    half, full = compiled(4096), compiled(8192)
    assert full.triton_calls == 3  # "auto" on GPU devices: forward, dK/dV and dQ kernels
    print(f"\nflash attention fwd+bwd temporaries: T=4096 {aot.gib(half.memory.temp)}, T=8192 {aot.gib(full.memory.temp)}")
    assert full.memory.temp <= 2.05 * half.memory.temp  # O(T)
    scores = 4 * 32 * 8192 * 8192 * 4  # one float32 [B, H, T, T] score tensor: 32 GiB
    assert full.memory.temp < scores / 16
