"""`python -m small4_jax.convert`: streaming conversion to a sharded Orbax checkpoint, loading onto other meshes,
FP8 storage, resumption after an interruption."""

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import small4_jax
from ckpt_utils import make_hf_model, save_hf, save_native, tiny_hf_config, unstack_orbax
from small4_jax.ckpt import sharded as sharded_ckpt
from small4_jax.config import Small4Config
from small4_jax.tools.convert import convert, main
from small4_jax.errors import CheckpointError
from small4_jax.nn.model import layer_groups, per_layer_items
from small4_jax.parallel.sharding import make_mesh

IDS = (np.arange(40, dtype=np.int32)[None] * 7) % 128


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    save_hf(make_hf_model(tiny_hf_config(), seed=8), path)
    reference = small4_jax.from_pretrained(path, dtype="float32")
    return path, reference, np.asarray(reference(IDS))


def _params(model):
    """Every parameter per layer (layer stacks unstacked to `layers.i.*` paths), as numpy."""
    return {p: np.asarray(v) for p, v in per_layer_items(model.config, nnx.state(model))}


def test_f32_conversion_loads_on_any_mesh(source, tmp_path):
    """... and carries the source's tokenizer, so `generate --checkpoint OUT` (README) finds it."""
    src, _, ref = source
    out = tmp_path / "ckpt"
    tekken = Path(small4_jax.__file__).parent / "assets" / "tiny_tekken.json"
    shutil.copyfile(tekken, src / "tekken.json")
    try:
        assert main(["--from", str(src), "--to", str(out), "--dtype", "f32", "--quiet"]) == 0
    finally:
        (src / "tekken.json").unlink()
    assert sharded_ckpt.is_sharded_checkpoint(out) and not (tmp_path / "ckpt.partial").exists()
    assert (out / "tekken.json").read_bytes() == tekken.read_bytes()
    assert small4_jax.load_tokenizer(out).vocab_size == small4_jax.load_tokenizer(tekken).vocab_size
    for shape in (None, {"data": 1, "expert": 8, "tensor": 1}, {"data": 2, "expert": 2, "tensor": 2}):
        mesh = None if shape is None else make_mesh(shape)
        model = small4_jax.from_pretrained(out, dtype="float32", mesh=mesh)
        if mesh is not None:
            assert model.layers[1].mlp.experts.gate_up[...].sharding.mesh.shape == mesh.shape
        np.testing.assert_allclose(np.asarray(model(IDS)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_orbax_restores_it_directly(source, tmp_path):
    """The output is a plain Orbax checkpoint: StandardCheckpointer restores it onto a 4-device mesh."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    src, reference, _ = source
    out = convert(src, tmp_path / "ckpt", dtype="f32", progress=None)
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    want = reference.layers[2].mlp.experts.down[...]
    g, (start, n) = next((g, (s, n)) for g, (s, n) in enumerate(layer_groups(reference.config)) if s <= 2 < s + n)
    shape = (n,) + want.shape  # layer 2 is slice 2 - start of its layer stack
    abstract = {"params": {"layer_stacks": {str(g): {"mlp": {"experts": {
        "down": jax.ShapeDtypeStruct(shape, want.dtype, sharding=NamedSharding(mesh, P(None, "x")))}}}}}}
    restored = ocp.PyTreeCheckpointer().restore(
        out, args=ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract), partial_restore=True))
    down = np.asarray(restored["params"]["layer_stacks"][str(g)]["mlp"]["experts"]["down"])
    np.testing.assert_array_equal(down[2 - start], want)


def test_fp8_storage_dequantises_on_load(source, tmp_path):
    src, reference, _ = source
    out = convert(src, tmp_path / "fp8", dtype="fp8", progress=None)
    mesh = make_mesh({"data": 2, "expert": 4, "tensor": 1})
    model = small4_jax.from_pretrained(out, dtype="float32", mesh=mesh, quantize="none")
    kept = _params(small4_jax.from_pretrained(out, dtype="float32", mesh=mesh))  # default: FP8 storage stays FP8
    got, want = _params(model), _params(reference)
    for key, w in want.items():
        if key[-1] == "kernel" and key[-2] != "lm_head" or key[-2] == "experts":
            # an independent e4m3 round trip: the scale maps the tensor's (per expert: each expert's) amax to 448,
            # e4m3's largest finite value, and every stored value is w / scale rounded to nearest by ml_dtypes
            w = np.asarray(w, np.float32)
            axes = tuple(range(1, w.ndim)) if key[-2] == "experts" else None
            scale = np.abs(w).max(axis=axes, keepdims=axes is not None) / np.float32(448.0)
            stored_scale = kept[key[:-1] + (key[-1] + "_scale",)]
            np.testing.assert_allclose(stored_scale.reshape(np.shape(scale)), scale, rtol=1e-6, err_msg=str(key))
            stored_scale = stored_scale.reshape(np.shape(scale))
            q = (w / stored_scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            np.testing.assert_array_equal(kept[key], q, err_msg=str(key))
            assert np.abs(q).max() == 448.0  # the amax is represented exactly
            np.testing.assert_array_equal(got[key], q * stored_scale, err_msg=str(key))
            assert np.abs(got[key] - w).max() <= np.abs(w).max() / 16  # e4m3: 3 mantissa bits
        else:  # embeddings, head, norms and router stay bf16
            np.testing.assert_array_equal(got[key], w.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert json.loads((out / "small4_format.json").read_text())["dtype"] == "fp8"


def test_interrupted_conversion_resumes(source, tmp_path, monkeypatch):
    src, _, ref = source
    out = tmp_path / "ckpt"
    writes = []  # every array written goes through Writer.create
    real_create = sharded_ckpt.Writer.create

    def crashing_create(self, key, shape, dtype):
        if len(writes) == 20:
            raise KeyboardInterrupt("simulated kill")
        writes.append(key)
        return real_create(self, key, shape, dtype)

    monkeypatch.setattr(sharded_ckpt.Writer, "create", crashing_create)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, dtype="f32", progress=None)
    assert not out.exists() and (tmp_path / "ckpt.partial" / "_progress.json").is_file()
    first = list(writes)
    writes.clear()
    monkeypatch.setattr(sharded_ckpt.Writer, "create",
                        lambda self, k, shape, dtype: (writes.append(k), real_create(self, k, shape, dtype))[1])
    convert(src, out, dtype="f32", progress=None)
    assert not set(first) & set(writes)  # finished tensors are not written again
    # every parameter array (a layer stack's: once, all its layers) written once
    assert len(first) + len(writes) == len(nnx.to_flat_state(nnx.state(small4_jax.from_pretrained(out))))
    model = small4_jax.from_pretrained(out, dtype="float32")
    np.testing.assert_allclose(np.asarray(model(IDS)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_native_source_and_errors(source, tmp_path):
    src, _, ref = source
    hf = make_hf_model(tiny_hf_config(), seed=8)
    native = tmp_path / "native"
    save_native(hf, native, num_shards=2)
    out = convert(native, tmp_path / "from_native", dtype="f32", progress=None)
    np.testing.assert_allclose(np.asarray(small4_jax.from_pretrained(out, dtype="float32")(IDS)), ref,
                               rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(CheckpointError, match="a converted checkpoint is already there"):
        convert(native, out, progress=None)
    partial = tmp_path / "other.partial"
    partial.mkdir()
    (partial / "_progress.json").write_text(json.dumps({"job": {"source": "elsewhere"}, "done": []}))
    with pytest.raises(CheckpointError, match="interrupted conversion of a different source"):
        convert(src, tmp_path / "other", progress=None)


def test_a_per_layer_checkpoint_names_migrate_which_stacks_it(source, tmp_path):
    src, _, _ = source
    new = convert(src, tmp_path / "new", dtype="fp8", progress=None)
    config = Small4Config.from_dict(json.loads((new / sharded_ckpt.CONFIG_FILE).read_text()))
    old = unstack_orbax(new, tmp_path / "old", layer_groups(config))
    assert sharded_ckpt.is_per_layer(old) and not sharded_ckpt.is_per_layer(new)
    with pytest.raises(CheckpointError, match=r"saved before the layers were stacked .*`python -m small4_jax.convert "
                                              r"--migrate --from .*old --to .*old-stacked`"):
        small4_jax.from_pretrained(old, dtype="float32")
    assert main(["--migrate", "--from", str(old), "--to", str(tmp_path / "migrated"), "--quiet"]) == 0
    for quantize in (None, "none"):  # FP8 kept (its scale grids) and dequantised
        want = _params(small4_jax.from_pretrained(new, dtype="float32", quantize=quantize))
        got = _params(small4_jax.from_pretrained(tmp_path / "migrated", dtype="float32", quantize=quantize))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
