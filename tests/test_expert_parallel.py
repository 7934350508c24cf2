"""Expert parallelism on 8 simulated CPU devices: every mesh and strategy gives one device's MoE output, gradients and
model logits.

Meshes data x expert x tensor = 8x1x1, 4x2x1, 2x4x1, 1x8x1 and 2x2x2; strategies "replicated" (psum combine) and
"all_to_all" (the padded dense all-to-all that stands in for ragged_all_to_all on CPU). The reference is the
single-device every-expert dense path, independent of the sort and of the grouped matmul.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from small4_jax.nn import moe
from small4_jax.config import load_config
from small4_jax.nn.moe import ExpertLoRA, resolve_strategy, route, routed_experts
from small4_jax.parallel.sharding import make_mesh, mesh_of, moe_layout

N, H, F, E, K, R = 20, 16, 8, 8, 2, 3  # 20 tokens: not a multiple of 8 token shards (padding is exercised)
MESHES = {
    "8x1x1": {"data": 8, "expert": 1, "tensor": 1},
    "4x2x1": {"data": 4, "expert": 2, "tensor": 1},
    "2x4x1": {"data": 2, "expert": 4, "tensor": 1},
    "1x8x1": {"data": 1, "expert": 8, "tensor": 1},
    "2x2x2": {"data": 2, "expert": 2, "tensor": 2},
}


def _moe_inputs(seed):
    ks = jax.random.split(jax.random.key(seed), 9)
    x = jax.random.normal(ks[0], (N, H))
    ids, w = route(jax.random.normal(ks[1], (N, E)) * 2, top_k=K)
    gate_up = jax.random.normal(ks[2], (E, H, 2 * F)) * 0.3
    down = jax.random.normal(ks[3], (E, F, H)) * 0.3
    lora = ExpertLoRA(*(jax.random.normal(k, s) * 0.3 for k, s in zip(
        ks[4:8], [(E, H, R), (E, R, 2 * F), (E, F, R), (E, R, H)])), 0.5)
    return ids, (x, w, gate_up, down, lora)


def _loss(ids, mesh, strategy, impl):
    def loss(x, w, gate_up, down, lora):
        y = routed_experts(x, ids, w, gate_up, down, impl=impl, lora=lora, mesh=mesh, strategy=strategy)
        return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


@pytest.fixture(scope="module")
def moe_case():
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    ids, args = _moe_inputs(seed)
    (_, y), grads = _loss(ids, None, "none", "dense")(*args)
    return seed, ids, args, y, grads


CASES = [(m, s, "ragged_dot") for m in MESHES for s in ("replicated", "all_to_all")]
CASES += [("2x2x2", "replicated", "pallas"), ("1x8x1", "all_to_all", "pallas"), ("2x4x1", "all_to_all", "dense")]


@pytest.mark.parametrize("mesh_name,strategy,impl", CASES)
def test_moe_output_and_gradients_match_one_device(moe_case, mesh_name, strategy, impl, monkeypatch):
    seed, ids, args, y_ref, grads_ref = moe_case
    calls = []
    monkeypatch.setattr(moe, "_expert_parallel", lambda *a, **kw: calls.append(kw["all_to_all"]) or ep(*a, **kw))
    mesh = make_mesh(MESHES[mesh_name])
    (_, y), grads = _loss(ids, mesh, strategy, impl)(*args)
    assert calls == [strategy == "all_to_all"], "the expert-parallel path did not run"
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()), err_msg=f"seed={seed}")
    names = ["x", "weights", "gate_up", "down", "lora.gate_up_a", "lora.gate_up_b", "lora.down_a", "lora.down_b"]
    for name, g, g_ref in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(g_ref).max()),
                                   err_msg=f"d{name} seed={seed}")


ep = moe._expert_parallel


def test_strategy_choice_and_layout():
    assert resolve_strategy("auto", tokens_per_data_shard=8, ep=8, a2a_min_tokens=512) == "replicated"
    assert resolve_strategy("auto", tokens_per_data_shard=4096, ep=8, a2a_min_tokens=512) == "all_to_all"
    assert resolve_strategy("auto", tokens_per_data_shard=4096, ep=1, a2a_min_tokens=512) == "replicated"
    assert resolve_strategy("replicated", 4096, 8, 512) == "replicated"
    with pytest.raises(ValueError, match="strategy"):
        resolve_strategy("ring", 1, 1, 1)
    mesh = make_mesh(MESHES["2x2x2"])
    layout = moe_layout(mesh, num_experts=128, intermediate=2048)
    assert (layout.data, layout.ep, layout.tp) == (2, 2, 2)
    assert layout.token_spec(all_to_all=True) == jax.sharding.PartitionSpec(("data", "expert"))
    assert moe_layout(mesh, num_experts=7, intermediate=2048) is None  # experts must divide: no EP
    tp = moe_layout(make_mesh({"tensor": 8}), num_experts=128, intermediate=2048)  # the latency layout
    assert (tp.expert_axis, tp.ep, tp.tensor_axis, tp.tp) == (None, 1, "tensor", 8)
    assert moe_layout(make_mesh({"data": 2, "tensor": 4}), num_experts=8, intermediate=6) is None  # 4 must divide F
    assert moe_layout(make_mesh({"data": 8}), num_experts=8, intermediate=8) is None  # no expert axis
    assert mesh_of(jnp.ones(3)) is None
    placed = jax.device_put(jnp.ones((8, 4)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))
    assert dict(mesh_of(placed).shape) == dict(mesh.shape)


# ----------------------------------------------------------------------------------------------------------------------
# The whole model.
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_ep")
    save_hf(make_hf_model(tiny_hf_config(), seed=5), path)
    ids = np.random.RandomState(1).randint(0, 128, size=(2, 12)).astype(np.int32)
    single = np.asarray(small4_jax.from_pretrained(path, dtype="float32")(ids))
    return path, ids, single


@pytest.mark.parametrize("mesh_name,strategy,jit,impl", [("1x8x1", "all_to_all", False, "auto"),
                                                        ("2x2x2", "replicated", True, "auto"),
                                                        ("2x2x2", "all_to_all", True, "auto"),
                                                        ("2x4x1", "replicated", True, "pallas")])
def test_model_logits_match_one_device(checkpoint, mesh_name, strategy, jit, impl, monkeypatch):
    """With moe_impl "pallas" (interpret mode here) the layers' expert stacks enter the shard_map whole, with the
    scan's layer index (`moe.AtLayer`), and the kernel reads each shard's stack at that layer."""
    path, ids, single = checkpoint
    calls = []
    monkeypatch.setattr(moe, "_expert_parallel", lambda *a, **kw: calls.append(
        (kw["all_to_all"], isinstance(a[3], moe.AtLayer))) or ep(*a, **kw))
    config = load_config(path).replace(moe_strategy=strategy, moe_impl=impl)
    model = small4_jax.from_pretrained(path, dtype="float32", mesh=make_mesh(MESHES[mesh_name]), config=config)
    logits = nnx.jit(lambda m, i: m(i))(model, ids) if jit else model(ids)
    assert calls and all(a == (strategy == "all_to_all") for a, _ in calls), "the expert-parallel path did not run"
    assert all(whole == (impl == "pallas") for _, whole in calls), calls
    np.testing.assert_allclose(np.asarray(logits), single, rtol=1e-5, atol=1e-5 * np.abs(single).max())


@pytest.mark.parametrize("mesh_name,strategy", [("2x4x1", "all_to_all"), ("2x2x2", "replicated"),
                                                ("2x2x2", "all_to_all")])
def test_per_token_adapters_inside_the_expert_parallel_shard_map(mesh_name, strategy, monkeypatch):
    """Multi-LoRA serving's expert adapters (stacked slots, each row's own slot through a per-row scale mask) inside
    the expert-parallel shard_map, the masks sent along with the rows by the all-to-all: = one device's dense
    per-token reference."""
    from small4_jax.lora.multi import block_mask

    slots, rank, rows = 3, 2, 4  # 4 rows of 5 tokens, slots 0 (base), 1, 2
    ks = jax.random.split(jax.random.key(7), 9)
    x = jax.random.normal(ks[0], (N, H))
    ids, w = route(jax.random.normal(ks[1], (N, E)) * 2, top_k=K)
    gate_up = jax.random.normal(ks[2], (E, H, 2 * F)) * 0.3
    down = jax.random.normal(ks[3], (E, F, H)) * 0.3
    j = slots * rank
    arrays = [jax.random.normal(k, s) * 0.3 for k, s in zip(ks[4:8], [(E, H, j), (E, j, 2 * F), (E, F, j), (E, j, H)])]
    mask = block_mask(jnp.asarray([2, 0, 1, 2]), jnp.asarray([0.0, 0.5, 1.5]), rank)  # [rows, S*R]
    lora = ExpertLoRA(*arrays, mask)
    want = routed_experts(x, ids, w, gate_up, down, impl="dense", lora=lora, mesh=None, strategy="none")
    calls = []
    monkeypatch.setattr(moe, "_expert_parallel", lambda *a, **kw: calls.append(kw["all_to_all"]) or ep(*a, **kw))
    got = jax.jit(lambda *a: routed_experts(*a, impl="ragged_dot", lora=lora, mesh=make_mesh(MESHES[mesh_name]),
                                            strategy=strategy))(x, ids, w, gate_up, down)
    assert calls == [strategy == "all_to_all"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    base = routed_experts(x, ids, w, gate_up, down, impl="dense", mesh=None, strategy="none")
    assert float(jnp.abs(want - base)[5:10].max()) == 0.0 and float(jnp.abs(want - base)[:5].max()) > 1e-2


def test_w8a8_experts_match_one_device():
    """W8A8 experts (fp8 values, per-expert weight and activation scales) placed by the loader's rule
    (`sharding_for`: values, scales and activation scales over `expert`) give one device's output on 1x8x1 with the
    all-to-all dispatch: each shard quantises its rows with its own experts' activation scales. (Windows of groups
    and the Pallas kernel: test_quant's W8A8 kernel test; a 2x2x2 replicated case also passes, ~15 s more here.)"""
    mesh_name, strategy, impl = "1x8x1", "all_to_all", "ragged_dot"
    import ml_dtypes

    from small4_jax.quant import formats as quant
    from small4_jax.parallel.sharding import sharding_for

    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % (1 << 31)))
    ids, (x, w, *_) = _moe_inputs(int(rng.integers(1 << 30)))

    def w8a8(shape):
        v = np.clip(rng.normal(size=shape) / 0.01, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        return quant.QArray(jnp.asarray(v), jnp.asarray(rng.uniform(0.005, 0.02, (E, 1, 1)), jnp.float32),
                            jnp.asarray(rng.uniform(0.002, 0.01, (E, 1, 1)), jnp.float32))

    gate_up, down = w8a8((E, H, 2 * F)), w8a8((E, F, H))
    want = routed_experts(x, ids, w, gate_up, down, impl="dense", mesh=None, strategy="none")
    mesh = make_mesh(MESHES[mesh_name])

    def place(q, name):
        return quant.QArray(*(jax.device_put(a, sharding_for(("experts", name + suffix), a.shape, mesh))
                              for a, suffix in zip(q, ("", "_scale", "_act_scale"))))

    gu, dn = place(gate_up, "gate_up"), place(down, "down")
    assert gu.act_scale.sharding.spec[0] == "expert"
    got = routed_experts(x, ids, w, gu, dn, impl=impl, mesh=mesh, strategy=strategy)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
