"""Stacked layers under a scan (model.py): the scanned forward equals a per-layer loop, and checkpoints in per-layer
names (HF safetensors, the Orbax layout) load into the stacks and come back byte for byte."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from small4_jax.ckpt import sharded as sharded_ckpt
from small4_jax.ckpt.plan import checkpoint_plan, is_stacked, plan_names
from small4_jax.config import Small4Config
from small4_jax.nn.model import layer_groups, rope_cos_sin

IDS = (np.arange(2 * 12, dtype=np.int32).reshape(2, 12) * 11) % 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """5 layers: two dense, then three MoE (two stacks, each scanned over more than one layer)."""
    path = tmp_path_factory.mktemp("hf5")
    save_hf(make_hf_model(tiny_hf_config(num_hidden_layers=5, first_k_dense_replace=2), seed=3), path)
    return path, small4_jax.from_pretrained(path, dtype="float32")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_layer_groups_split_the_layers_by_kind():
    c = Small4Config.from_yaml("configs/tiny.yaml")
    assert layer_groups(c.replace(num_hidden_layers=36, first_k_dense_replace=0)) == [(0, 36)]
    assert layer_groups(c.replace(num_hidden_layers=5, first_k_dense_replace=2)) == [(0, 2), (2, 3)]
    assert layer_groups(c.replace(num_hidden_layers=3, first_k_dense_replace=3)) == [(0, 3)]
    assert layer_groups(c.replace(num_hidden_layers=1, first_k_dense_replace=0)) == [(0, 1)]


def test_scanned_forward_equals_a_per_layer_loop(checkpoint):
    _, model = checkpoint
    assert [s.self_attn.o_proj.kernel.shape[0] for s in model.layer_stacks] == [2, 3]
    # the reference: each layer sliced out of its stack and called in a Python loop, no run_layers
    positions = jnp.broadcast_to(jnp.arange(IDS.shape[1], dtype=jnp.int32), IDS.shape)
    cos, sin = rope_cos_sin(model.config, positions)
    h = model.embed_tokens(jnp.asarray(IDS))
    for layer in model.layers:
        h, _ = layer(h, positions, cos, sin)
    want = np.asarray(model.logits(model.norm(h)))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(IDS))(state).jaxpr
    # one top-level scan per stack, over its layers (whatever the layer body holds inside)
    assert [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"] == [2, 3]
    assert _rel(model(IDS), want) < 1e-6
    unrolled = nnx.clone(model)
    unrolled.scan_layers = False  # the same parameters in a Python loop over their slices
    assert _rel(unrolled(IDS), want) < 1e-6
    cache = model.init_cache(2, 16)  # the stacked latent cache, carried through the scans
    first, cache = model.step(IDS[:, :7], cache)
    rest, cache = model.step(IDS[:, 7:], cache)
    assert _rel(jnp.concatenate([first, rest], axis=1), want) < 1e-5


def test_hf_names_load_into_the_stacks_and_come_back_byte_exact(checkpoint, tmp_path):
    from train.export import save_merged

    src, model = checkpoint
    source = {}
    for f in sorted(src.glob("*.safetensors")):
        source.update(load_file(str(f)))
    state = dict(nnx.to_flat_state(nnx.state(model)))
    plan = checkpoint_plan(nnx.state(model))
    seen = set()
    for path, entry in plan.items():
        value = np.asarray(state[path][...])
        layers = list(value) if is_stacked(path) else [value]
        assert len(layers) == len(plan_names(entry))
        for name, ours in zip(plan_names(entry), layers):  # slice j of a stack is layer start + j
            hf = source["model." + name if name != "lm_head.weight" else name]
            back = ours.transpose(0, 2, 1) if ours.ndim == 3 else (ours.T if ours.ndim == 2 and
                                                                    "embed_tokens" not in name else ours)
            assert back.tobytes() == hf.tobytes(), name
            seen.add(name)
    assert len(seen) == len(source)
    out = save_merged(model, tmp_path / "hf", dtype="float32")  # per-layer names written from the stacks
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(str(f)))
    assert written.keys() == source.keys()
    assert all(written[k].tobytes() == source[k].tobytes() for k in source)
    # the Orbax layout of the stacks round-trips too
    saved = sharded_ckpt.save_model(model, tmp_path / "orbax")
    restored = dict(nnx.to_flat_state(nnx.state(small4_jax.from_pretrained(saved, dtype="float32"))))
    assert restored.keys() == state.keys()
    assert all(np.asarray(restored[p][...]).tobytes() == np.asarray(v[...]).tobytes() for p, v in state.items())
