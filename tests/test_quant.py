"""Quantised weights (small4_jax.quant.formats): formats, the in-kernel-dequantising grouped matmul, FP8 checkpoints kept FP8.

Every kernel case draws fresh random inputs and compares the Pallas kernel (interpret mode) with
`gmm_quant_reference` (dequantise in float32, then the plain grouped matmul), forward, transposed and the input
gradient. Checkpoint cases write tiny FP8 checkpoints (HF and Mistral-native) with tests/ckpt_utils.py and check that
the loaded model holds exactly the FP8 bytes plus scales and computes what the dequantised model computes.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from ckpt_utils import make_hf_model, save_hf_fp8, save_native, tiny_hf_config
from flax import nnx

import small4_jax
from small4_jax.quant import formats as quant
from small4_jax.kernels import GmmTiling
from small4_jax.kernels.gmm import api
from small4_jax.kernels.gmm.reference import gmm_quant_reference
from small4_jax.nn.model import layer_groups, per_layer_items


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------------------------------
# Formats.
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_round_trip_error_is_bounded_by_the_scale(fmt):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 256, 40)).astype(np.float32) * rng.uniform(0.1, 3, size=(3, 1, 40)).astype(np.float32)
    q = quant.quantize(w, fmt)
    vshape, sshape, vdtype = quant.stored_shapes(w.shape, fmt)
    assert (q.values.shape, q.scale.shape, np.dtype(q.values.dtype)) == (vshape, sshape, np.dtype(vdtype)), seed
    assert q.shape == w.shape and q.format == fmt
    assert np.dtype(q.scale.dtype) == np.dtype(quant.scale_dtype(fmt)), seed
    back = quant.dequantize(q)
    if fmt == "fp8":  # 3 mantissa bits: relative error <= 2^-4 above the subnormal range
        assert np.all(np.abs(back - w) <= np.abs(w) * 2.0**-4 + q.scale * 2.0**-9), seed
    elif fmt == "int8":  # round to nearest: at most half a step, the step being the scale of the element's column
        assert np.all(np.abs(back - w) <= np.repeat(q.scale, 256, axis=1) / 2 * (1 + 1e-5)), seed
    else:  # int4: per group column, the least squared error over the clipping grid, levels [-8, 7], bf16 scales
        blocks = w.reshape(3, 2, 128, 40)
        s = np.asarray(q.scale, np.float32)[:, :, None, :]
        levels = quant.int_values(q).reshape(blocks.shape)
        np.testing.assert_array_equal(back.reshape(blocks.shape), levels * s)  # exactly q * scale
        assert levels.min() >= -8 and levels.max() <= 7
        err = ((back.reshape(blocks.shape) - blocks) ** 2).sum(2)
        inside = np.abs(blocks / s) <= np.where(blocks / s < 0, 8, 7)  # not clipped: rounded to the nearest level
        half_step = np.broadcast_to(np.abs(s) / 2 * (1 + 1e-5), blocks.shape)
        assert np.all(np.abs(back.reshape(blocks.shape) - blocks)[inside] <= half_step[inside]), seed
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(2)[:, :, None], 2)
        for r in quant.INT4_CLIP:  # an independent evaluation of every candidate the search had
            c = (-extreme / 8 * np.float32(r)).astype(ml_dtypes.bfloat16).astype(np.float32)
            cand = ((np.clip(np.round(blocks / c), -8, 7) * c - blocks) ** 2).sum(2)
            assert np.all(err <= cand * (1 + 1e-6)), (seed, r)
        rtn7 = np.abs(blocks).max(2, keepdims=True) / 7  # the old [-7, 7] absmax rounding: worse in total
        assert err.sum() < 0.85 * ((np.round(blocks / rtn7) * rtn7 - blocks) ** 2).sum(), seed
    # jax and numpy quantise alike
    qj = quant.quantize(jnp.asarray(w), fmt)
    np.testing.assert_array_equal(np.asarray(qj.values).view(np.uint8), np.asarray(q.values).view(np.uint8))


def test_int4_packing_layout():
    """Byte j of each 128-row group holds row j (low nibble) and row j + 64 (high nibble), stored as q + 8."""
    rng = np.random.default_rng(0)
    ints = rng.integers(-8, 8, size=(256, 3)).astype(np.float32)
    q = quant.quantize_int4(ints, scale=np.ones((2, 3), np.float32))  # a given scale: the values are the ints
    np.testing.assert_array_equal(np.asarray(q.scale, np.float32), np.ones((2, 3), np.float32))
    v = q.values.astype(np.int32)
    np.testing.assert_array_equal((v[:64] & 15) - 8, ints[:64])
    np.testing.assert_array_equal((v[:64] >> 4) - 8, ints[64:128])
    np.testing.assert_array_equal((v[64:] >> 4) - 8, ints[192:])
    np.testing.assert_array_equal(quant.int_values(q), ints)


def test_gptq_lowers_the_output_error_on_correlated_inputs_and_is_rounding_without_correlation():
    """GPTQ (quant.gptq_int4) minimises ||X (W - W_q)|| over calibration inputs X: with correlated inputs (as a
    model's activations are) it beats rounding each weight; with uncorrelated ones (H = c I) it is rounding, bit for
    bit."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    k, n = 128, 48
    w = rng.normal(size=(2, k, n)).astype(np.float32)  # two stacked matrices (experts), each with its own H
    mix = rng.normal(size=(2, k, k)) * np.exp(-np.arange(k) / 16)[None, None, :]  # a few dominant directions
    x = np.einsum("etk,ekj->etj", rng.normal(size=(2, 512, k)), mix).astype(np.float32)
    h = np.einsum("etk,etj->ekj", x, x)
    g, plain = quant.gptq_int4(w, h), quant.quantize_int4(w)
    assert g.values.shape == plain.values.shape and g.scale.dtype == plain.scale.dtype
    out_err = [float(np.linalg.norm(x @ (np.asarray(quant.dequantize(q)) - w))) for q in (g, plain)]
    assert out_err[0] < 0.75 * out_err[1], (seed, out_err)  # measured 0.60-0.66 over seeds
    iso = quant.gptq_int4(w, np.broadcast_to(3.0 * np.eye(k), (2, k, k)))
    np.testing.assert_array_equal(iso.values, plain.values, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(iso.scale, np.float32), np.asarray(plain.scale, np.float32))


def test_calibration_file_errors_name_the_line(tmp_path):
    from small4_jax.quant.calibration import read_calibration

    f = tmp_path / "calib.jsonl"
    f.write_text('{"ids": [1, 5, 9]}\n\n{"ids": []}\n')
    with pytest.raises(small4_jax.ConfigError, match=r"calib.jsonl:3: expected \{\"text\": non-empty string\}"):
        read_calibration(f)
    f.write_text('{"text": "hello"}\n')
    with pytest.raises(small4_jax.ConfigError, match=r"calib.jsonl:1: a \"text\" row needs a tokenizer"):
        read_calibration(f)
    f.write_text('{"ids": [1, 5, 9]}\n{"ids": [3]}\n')
    assert read_calibration(f) == [[1, 5, 9], [3]]


# ----------------------------------------------------------------------------------------------------------------------
# The grouped matmul with quantised weights: Pallas (interpret) vs the reference.
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_gmm_quant_kernel_matches_reference(fmt):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    m, k, n, g, local = 45, 128, 48, 5, 3
    sizes = rng.multinomial(m - 4, [0.3, 0.0, 0.3, 0.2, 0.2]).astype(np.int32)  # an empty group, rows past the sum
    offset = 1  # the window holds groups 1..3
    w = quant.quantize(jnp.asarray(rng.normal(size=(local, k, n)), jnp.float32), fmt)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    gs = jnp.asarray(sizes)
    tiling = GmmTiling(block_m=16, block_k=64, block_n=32, split_k=2)

    def run(backend, x, transpose=False):
        return api.gmm(x, w, gs, offset, backend=backend, tiling=tiling, transpose_rhs=transpose)

    ref = gmm_quant_reference(lhs, w, gs, offset)
    np.testing.assert_allclose(run("pallas", lhs), ref, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    np.testing.assert_allclose(run("ragged_dot", lhs), ref, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    ref_t = gmm_quant_reference(dy, w, gs, offset, transpose_rhs=True)
    np.testing.assert_allclose(run("pallas", dy, True), ref_t, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    grad = jax.grad(lambda x: jnp.vdot(run("pallas", x), dy))(lhs)
    np.testing.assert_allclose(grad, ref_t, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    # bf16 activations: the kernel casts each dequantised tile to bf16, as the reference casts the weights
    xb = lhs.astype(jnp.bfloat16)
    out_b = api.gmm(xb, w, gs, offset, backend="pallas", tiling=tiling, preferred_element_type=jnp.float32)
    ref_b = gmm_quant_reference(xb, w, gs, offset, preferred_element_type=jnp.float32)
    assert _rel(out_b, ref_b) < 1e-2, seed


def _w8a8_numpy(x, values, col_scale, act, sizes, offset):
    """W8A8 grouped matmul in numpy (float64 sums), independent of small4_jax: per row of local group g,
    q = e4m3(clip(x / s_x[g], +-448)) and y = (q @ values[g]) * s_x[g] * s_w[g, column]; zero outside the window."""
    x = np.asarray(x, np.float32)
    v = np.asarray(values, np.float32)
    out = np.zeros((x.shape[0], v.shape[-1]))
    ends = np.cumsum(sizes)
    for g in range(v.shape[0]):
        lo, hi = ends[offset + g] - sizes[offset + g], ends[offset + g]
        q = np.clip(x[lo:hi] / act[g], -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        out[lo:hi] = (q @ v[g]) * act[g] * col_scale[g]
    return out


def test_gmm_w8a8_kernel_matches_reference():
    """fp8 activations x fp8 weights: the Pallas kernel (interpret mode, split-K decode tiling and a prefill tiling,
    a layer stack read at a layer), the ragged_dot backend and `gmm_w8a8_reference` all equal an independent numpy
    evaluation, with activation scales that saturate some rows; its gradient is refused with the reason."""
    from small4_jax.kernels.gmm.reference import gmm_w8a8_reference

    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    m, k, n, g, local, layers = 45, 128, 48, 5, 3, 2
    sizes = rng.multinomial(m - 4, [0.3, 0.0, 0.3, 0.2, 0.2]).astype(np.int32)  # an empty group, rows past the sum
    offset = 1
    w = rng.normal(size=(layers, local, k, n)).astype(np.float32)
    values = np.clip(w / 0.01, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.005, 0.02, size=(layers, local, 1, 2)).astype(np.float32)  # native w1 | w3: two per expert
    lhs = (rng.normal(size=(m, k)) * rng.uniform(0.1, 3, size=(m, 1))).astype(np.float32)
    act = (np.abs(lhs).max() / 448 * rng.uniform(0.5, 2.0, size=(layers, local, 1, 1))).astype(np.float32)
    li = 1
    rows2 = lhs[sizes[:2].sum():sizes[:3].sum()]  # group 2 (local 1): a scale that saturates its largest entries
    act[li, 1] = np.abs(rows2).max(initial=1.0) / 448 * 0.5
    x = jnp.asarray(lhs, jnp.bfloat16)  # bf16 activations, as served
    q = quant.QArray(jnp.asarray(values), jnp.asarray(scale), jnp.asarray(act))
    gs = jnp.asarray(sizes)
    want = _w8a8_numpy(x, values[li], np.repeat(scale[li, :, 0], n // 2, axis=-1), act[li, :, 0, 0], sizes, offset)
    at = jax.tree.map(lambda a: a[li], q)
    for tiling in (GmmTiling(block_m=16, block_k=64, block_n=32, split_k=2), GmmTiling(block_m=32, block_k=32,
                                                                                       block_n=16)):
        got = api.gmm(x, q, gs, offset, layer=jnp.int32(li), backend="pallas", tiling=tiling,
                      preferred_element_type=jnp.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed} {tiling}")
    for got in (api.gmm(x, at, gs, offset, backend="ragged_dot", preferred_element_type=jnp.float32),
                gmm_w8a8_reference(x, at, gs, offset, preferred_element_type=jnp.float32)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    with pytest.raises(NotImplementedError, match="W8A8 .* is inference only"):
        jax.grad(lambda x: api.gmm(x, at, gs, offset, backend="pallas").astype(jnp.float32).sum())(x)
    int8 = quant.quantize(jnp.asarray(w[0]), "int8")
    with pytest.raises(Exception, match="fp8 activations need fp8 weights"):
        api.gmm(x, int8._replace(act_scale=jnp.asarray(act[0])), gs, offset, backend="pallas")


def test_gmm_quant_narrow_groups_fall_back_to_dequantise_then_gmm():
    """int4 with K = 80 (groups of 16: half-groups of 8 rows, narrower than any kernel tile) still computes."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    w = quant.quantize(jnp.asarray(rng.normal(size=(3, 80, 32)), jnp.float32), "int4")
    assert w.scale.shape == (3, 5, 32)
    lhs = jnp.asarray(rng.normal(size=(20, 80)), jnp.float32)
    gs = jnp.asarray([7, 0, 13], jnp.int32)
    out = api.gmm(lhs, w, gs, backend="pallas", tiling=GmmTiling(block_m=16, block_k=16, block_n=16))
    np.testing.assert_allclose(out, gmm_quant_reference(lhs, w, gs), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Models.
@pytest.fixture(scope="module")
def hf_model():
    config = tiny_hf_config()
    return config, make_hf_model(config, seed=11)


@pytest.fixture(scope="module")
def fp8_dirs(hf_model, tmp_path_factory):
    _, hf = hf_model
    root = tmp_path_factory.mktemp("fp8")
    save_hf_fp8(hf, root / "hf", per_expert=True)
    save_native(hf, root / "native", fp8=True)
    return root


def _ids(vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, size=(2, 16)).astype(np.int32)


@pytest.mark.parametrize("layout", ["hf", "native"])
def test_fp8_checkpoint_stays_fp8_in_memory_and_computes_the_dequantised_model(hf_model, fp8_dirs, layout):
    config, _ = hf_model
    before = {id(a) for a in jax.live_arrays()}
    model = small4_jax.from_pretrained(fp8_dirs / layout, dtype="bfloat16")  # default: FP8 stays FP8
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    fp8_bytes = scale_bytes = other_bytes = 0
    for path, v in flat.items():
        leaf = str(path[-1])
        if leaf.endswith("_scale"):
            assert v.dtype == jnp.float32
            scale_bytes += v.nbytes
        elif (path[:-1] + (leaf + "_scale",)) in flat:
            assert v.dtype == jnp.float8_e4m3fn, path
            fp8_bytes += v.nbytes
        else:  # embeddings, lm_head, norms, router: never quantised
            assert v.dtype == jnp.bfloat16, path
            assert leaf in ("embedding", "weight") or "lm_head" in map(str, path), path
            other_bytes += v.nbytes
    # the expected bytes, counted from the checkpoint's own shapes: every FP8 tensor at one byte per element
    from small4_jax.ckpt.safetensors_io import CheckpointReader

    with CheckpointReader(fp8_dirs / layout) as reader:
        fp8_expected = sum(int(np.prod(reader.shape(n))) for n in reader.names()
                           if reader.stored_dtype(n) == "F8_E4M3")
    assert fp8_bytes == fp8_expected
    # scales: one float32 per dense tensor; per expert for HF's fused experts; native w1 | w3 carry a scale each,
    # kept as one scale per gate_up column (the halves' scales, repeated), and one per expert for down
    dense = sum(v.shape[0] if str(p[0]) == "layer_stacks" else 1  # a layer stack's: one per layer
                for p, v in flat.items() if str(p[-1]) == "kernel_scale")
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    per_gate_up = 2 * config.moe_intermediate_size if layout == "native" else 1
    assert scale_bytes == 4 * (dense + moe_layers * config.n_routed_experts * (per_gate_up + 1))
    live = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
    assert live == fp8_bytes + scale_bytes + other_bytes  # measured: nothing else stayed on the device

    deq = small4_jax.from_pretrained(fp8_dirs / layout, dtype="bfloat16", quantize="none")
    ids = _ids(config.vocab_size)
    assert _rel(model(ids), deq(ids)) < 2e-2


def _random_act_scales(src, dst, seed):
    """A copy of checkpoint directory `src` whose static activation scales are random positive values (what a
    calibrated release has: each tensor its own, each expert its own); returns the new values by key."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    raw = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        for key, t in tensors.items():
            if key.endswith(("activation_scale", ".qscale_act")):
                tensors[key] = torch.tensor(rng.uniform(0.01, 0.1, size=tuple(t.shape)).astype(np.float32))
                raw[key] = tensors[key].numpy()
        save_file(tensors, f, metadata={"format": "pt"})
    return raw


@pytest.mark.parametrize("layout", ["hf", "native"])
def test_w8a8_load_keeps_the_checkpoint_activation_scales(hf_model, fp8_dirs, tmp_path, layout):
    """activations="fp8": every fp8 weight's static activation scale becomes a parameter beside it (HF per tensor
    and [E] per expert; native per tensor, the fused gate_up taking the max of w1's and w3's), and the model's
    activations are quantised: its logits move from the weight-only fp8 model's by about e4m3's rounding."""
    raw = _random_act_scales(fp8_dirs / layout, tmp_path / layout, seed=int(np.random.SeedSequence().entropy % 2**31))
    model = small4_jax.from_pretrained(tmp_path / layout, dtype="float32", activations="fp8")
    config = model.config
    from small4_jax.nn.model import abstract_model

    shapes = lambda m: {p: (v.shape, v.dtype) for p, v in nnx.to_flat_state(nnx.state(m))  # noqa: E731
                        if str(p[-1]).endswith("_act_scale")}
    # the abstract W8A8 model (what aot_programs compiles) has the loaded model's activation scales
    assert shapes(abstract_model(config, dtype="float32", quantize="fp8", activations="fp8")) == shapes(model)
    state = dict(per_layer_items(config, nnx.state(model)))
    acts = {p: v for p, v in state.items() if p[-1].endswith("_act_scale")}
    assert len(acts) == sum(p[-1].endswith("_scale") and not p[-1].endswith("_act_scale") for p in state)
    layer = config.num_hidden_layers - 1  # a MoE layer
    o_proj, experts = ("layers", str(layer), "self_attn", "o_proj"), ("layers", str(layer), "mlp", "experts")
    if layout == "hf":
        want_o = raw[f"model.layers.{layer}.self_attn.o_proj.activation_scale"]
        want_gu = raw[f"model.layers.{layer}.mlp.experts.gate_up_proj_activation_scale"]
    else:
        want_o = raw[f"layers.{layer}.attention.wo.qscale_act"]
        want_gu = [max(raw[f"layers.{layer}.experts.{e}.{w}.qscale_act"] for w in ("w1", "w3"))
                   for e in range(config.n_routed_experts)]
    np.testing.assert_array_equal(np.asarray(acts[o_proj + ("kernel_act_scale",)]).reshape(()), want_o)
    np.testing.assert_array_equal(np.asarray(acts[experts + ("gate_up_act_scale",)]).reshape(-1), np.float32(want_gu))
    if layout == "hf":  # (one layout is enough for the logits: the compute does not depend on it)
        weight_only = small4_jax.from_pretrained(tmp_path / layout, dtype="float32")
        ids = _ids(config.vocab_size, seed=5)[:1, :8]
        assert 1e-3 < _rel(model(ids), weight_only(ids)) < 6e-2


def test_w8a8_misuse_is_a_clear_error(hf_model, fp8_dirs, tmp_path):
    import shutil

    from ckpt_utils import save_hf
    from safetensors.torch import load_file, save_file

    from small4_jax.errors import CheckpointError, ConfigError

    _, hf = hf_model
    with pytest.raises(ConfigError, match=r"^activations = 'fp8' \(W8A8\) needs fp8 weights; quantize = 'int4'$"):
        small4_jax.from_pretrained(fp8_dirs / "hf", quantize="int4", activations="fp8")
    with pytest.raises(ConfigError, match=r"^activations = 'int8': expected 'fp8' \(W8A8"):
        small4_jax.from_pretrained(fp8_dirs / "hf", activations="int8")
    save_hf(hf, tmp_path / "bf16")
    with pytest.raises(CheckpointError, match="needs an FP8 checkpoint .* this one is not stored in FP8"):
        small4_jax.from_pretrained(tmp_path / "bf16", activations="fp8")
    with pytest.raises(CheckpointError, match=r"activation scales, and \S+ is not stored in FP8"):
        small4_jax.from_pretrained(tmp_path / "bf16", quantize="fp8", activations="fp8")
    # a native checkpoint without one weight's qscale_act: the error names that weight
    shutil.copytree(fp8_dirs / "native", tmp_path / "native")
    f = next((tmp_path / "native").glob("*.safetensors"))
    tensors = load_file(f)
    del tensors["layers.0.attention.wo.qscale_act"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.o_proj\.weight has no static activation scale"):
        small4_jax.from_pretrained(tmp_path / "native", activations="fp8")
    small4_jax.from_pretrained(tmp_path / "native")  # weight-only fp8 does not need it
    sharded = tmp_path / "sharded"  # what `convert` writes (the markers are enough: the check comes first)
    sharded.mkdir()
    (sharded / "small4_config.json").write_text("{}")
    (sharded / "_METADATA").write_text("{}")
    with pytest.raises(CheckpointError, match="a converted sharded checkpoint has none"):
        small4_jax.from_pretrained(sharded, activations="fp8")


def test_w8a8_linear_and_routed_experts_match_numpy():
    """W8A8 products against numpy: the dense `quant.w8a8_dot` (what `QLinear` runs) and every impl of
    `moe.routed_experts` over W8A8 experts (CPU auto: the tile loop; ragged_dot; dense), each expert quantising its
    own rows with its own activation scale."""
    from small4_jax.nn import moe

    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)

    def fp8(shape, scale_shape):
        w = rng.normal(size=shape).astype(np.float32)
        s = rng.uniform(0.002, 0.01, size=scale_shape).astype(np.float32)
        return np.clip(w / 0.004, -448, 448).astype(ml_dtypes.float8_e4m3fn), s

    def w8a8(x, v, s_w, s_x):  # numpy: e4m3(clip(x / s_x)) @ v * s_x * s_w
        q = np.clip(np.asarray(x, np.float32) / s_x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        return (q @ v.astype(np.float64)) * s_x * s_w

    v, s = fp8((64, 40), (1, 1))
    x = rng.normal(size=(3, 5, 64)).astype(np.float32)
    q = quant.QArray(jnp.asarray(v), jnp.asarray(s), jnp.asarray(np.float32([[0.02]])))
    np.testing.assert_allclose(quant.w8a8_dot(jnp.asarray(x), q, jnp.float32), w8a8(x, v, s[0, 0], 0.02),
                               rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")

    e, h, f, k, n = 6, 64, 32, 2, 9
    (gv, gs), (dv, ds) = fp8((e, h, 2 * f), (e, 1, 1)), fp8((e, f, h), (e, 1, 1))
    ga, da = (rng.uniform(0.005, 0.02, size=(e, 1, 1)).astype(np.float32) for _ in range(2))
    gu = quant.QArray(*map(jnp.asarray, (gv, gs, ga)))
    dn = quant.QArray(*map(jnp.asarray, (dv, ds, da)))
    x = rng.normal(size=(n, h)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.uniform(size=(n, k)).astype(np.float32)
    want = np.zeros((n, h))
    for t in range(n):
        for j in range(k):
            i = ids[t, j]
            hh = w8a8(x[t:t + 1], gv[i], gs[i, 0, 0], ga[i, 0, 0]).astype(np.float32)
            a = hh[:, :f] / (1 + np.exp(-hh[:, :f])) * hh[:, f:]
            want[t] += w[t, j] * w8a8(a, dv[i], ds[i, 0, 0], da[i, 0, 0])[0]
    for impl in ("auto", "ragged_dot", "dense"):  # the Pallas kernel: test_gmm_w8a8_kernel_matches_reference
        got = moe.routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), gu, dn, impl=impl)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=f"seed {seed} {impl}")


@pytest.mark.parametrize("fmt,tol", [("fp8", 4e-2), ("int8", 1e-2), ("int4", 5e-2), ("int4-all", 0.12)])
def test_quantised_logits_stay_near_the_float_model(hf_model, tmp_path_factory, fmt, tol):
    """Float32 compute, so the difference is the weight format alone; relative error = Frobenius norm over the whole
    logits. Measured here: fp8 3.2%, int8 0.6%, int4 (experts int4, dense linears int8) 3.2% (3.0-3.9% over five
    input seeds), int4-all 9.5%. int4 meets the issue's 5e-2; int4 everywhere does not (9.4% rms weight error,
    amplified by the dense linears every token passes through), hence 0.12 for it. fp8's 2e-2 target is below
    e4m3's floor on random models (2.6% rms weight error at any scale, amplified 1.3x by this model: quant.py's
    docstring and benchmarks/quant_logits.py), hence 4e-2."""
    from ckpt_utils import save_hf

    config, hf = hf_model
    d = tmp_path_factory.getbasetemp() / "float_ckpt"
    if not d.exists():
        save_hf(hf, d)
    ref = small4_jax.from_pretrained(d, dtype="float32")
    q = small4_jax.from_pretrained(d, dtype="float32", quantize=fmt)
    ids = _ids(config.vocab_size, seed=3)
    assert _rel(q(ids), ref(ids)) < tol


def test_calibrated_int4_checkpoint_load_fits_its_calibration_text_better(hf_model, tmp_path_factory, monkeypatch):
    """from_pretrained(quantize="int4", calibration=...): every linear and expert is quantised by GPTQ against the
    inputs it saw on the calibration sequences, layer after layer through the already quantised layers, so on those
    sequences the model is closer to the float one than the uncalibrated int4 model. `convert --quantize int4
    --calibration FILE` runs the same pipeline reading one layer at a time from the checkpoint, and a conversion
    killed inside a layer resumes from its saved hidden states to the same bytes."""
    from ckpt_utils import save_hf

    from small4_jax.ckpt import sharded as sharded_ckpt
    from small4_jax.tools.convert import main
    from small4_jax.ckpt.safetensors_io import CheckpointReader

    config, hf = hf_model
    d = tmp_path_factory.getbasetemp() / "float_ckpt"
    if not d.exists():
        save_hf(hf, d)
    cal = np.random.RandomState(5).randint(0, config.vocab_size, size=(6, 48)).astype(np.int32)
    ref = small4_jax.from_pretrained(d, dtype="float32")
    plain = small4_jax.from_pretrained(d, dtype="float32", quantize="int4")
    gptq = small4_jax.from_pretrained(d, dtype="float32", quantize="int4", calibration=cal.tolist())
    state = dict(per_layer_items(gptq.config, nnx.state(gptq)))  # the stacks unstacked to per-layer paths
    plain_state = dict(per_layer_items(plain.config, nnx.state(plain)))
    experts = ("layers", "1", "mlp", "experts", "gate_up")
    assert state[experts].dtype == jnp.uint8  # GPTQ chose the int4 experts' values ...
    assert np.asarray(state[experts]).tobytes() != np.asarray(plain_state[experts]).tobytes()
    o_proj = ("layers", "0", "self_attn", "o_proj", "kernel")  # ... and left the int8 dense linears rounded to nearest
    assert state[o_proj].dtype == jnp.int8
    assert np.asarray(state[o_proj]).tobytes() == np.asarray(plain_state[o_proj]).tobytes()
    want = np.asarray(ref(cal))
    errs = [_rel(np.asarray(m(cal)), want) for m in (gptq, plain)]
    assert errs[0] < 0.9 * errs[1], errs  # measured 0.068 against 0.089
    with pytest.raises(small4_jax.ConfigError, match="calibration is for quantize='int4'"):
        small4_jax.from_pretrained(d, quantize="fp8", calibration=cal.tolist())

    # convert: killed while writing layer 1 (the first MoE layer: its expert values written, their scales not)
    f = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    f.write_text("".join(json.dumps({"ids": row}) + "\n" for row in cal.tolist()))
    out = f.parent / "ckpt"
    args = ["--from", str(d), "--to", str(out), "--dtype", "f32", "--quantize", "int4", "--calibration", str(f),
            "--quiet"]
    reads, writes = [], []
    real_get, real_create = CheckpointReader.get, sharded_ckpt.Writer.create
    moe_stack = ("params", "layer_stacks", str(len(layer_groups(small4_jax.load_config(d))) - 1))

    def get(self, name, *a, **k):
        reads.append(int(name.split(".")[1]) if name.startswith("layers.") else None)
        return real_get(self, name, *a, **k)

    def create(self, key, *a, kill=True, **k):
        if kill and key == moe_stack + ("mlp", "experts", "gate_up_scale"):
            raise KeyboardInterrupt("simulated kill")
        writes.append(key)
        return real_create(self, key, *a, **k)

    monkeypatch.setattr(CheckpointReader, "get", get)
    monkeypatch.setattr(sharded_ckpt.Writer, "create", create)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert moe_stack + ("mlp", "experts", "gate_up") in writes and not out.exists()
    layers = [i for i in reads if i is not None]
    assert layers == sorted(layers) and set(layers) == {0, 1}  # the loader was asked for one layer at a time
    reads.clear(), writes.clear()
    monkeypatch.setattr(sharded_ckpt.Writer, "create",
                        lambda self, key, *a, **k: create(self, key, *a, kill=False, **k))
    assert main(args) == 0
    layers = [i for i in reads if i is not None]
    assert layers == sorted(layers) and set(layers) == {1, 2}  # resumed at layer 1, from its saved inputs
    assert not any(k[2] == "0" for k in writes if k[1] == "layer_stacks")  # layer 0's stack not written again
    assert not list(out.glob("_hidden*")) and not list(out.glob("_progress*"))
    loaded = small4_jax.from_pretrained(out, dtype="float32")
    loaded = dict(per_layer_items(loaded.config, nnx.state(loaded)))
    assert loaded.keys() == state.keys()
    for path, v in state.items():  # the in-memory pipeline's model, byte for byte
        assert np.asarray(loaded[path]).tobytes() == np.asarray(v).tobytes(), path
    # the same from our own sharded float checkpoint (read a layer at a time through TensorStore)
    from small4_jax.tools.convert import convert

    orbax = convert(d, f.parent / "f32", dtype="f32", progress=None)
    again = convert(orbax, f.parent / "from_orbax", dtype="f32", quantize="int4", calibration=cal.tolist(),
                    progress=None)
    again = dict(per_layer_items(gptq.config, nnx.state(small4_jax.from_pretrained(again, dtype="float32"))))
    for path, v in state.items():
        assert np.asarray(again[path]).tobytes() == np.asarray(v).tobytes(), path


def test_unknown_format_is_a_clear_error(fp8_dirs, tmp_path, capsys):
    with pytest.raises(small4_jax.ConfigError,
                       match=r"^quantize = 'int3': expected one of fp8, int8, int4, int4-all \(or none\)$"):
        small4_jax.from_pretrained(fp8_dirs / "hf", quantize="int3")
    from infer.generate import main as generate
    from small4_jax.tools.convert import main as convert

    for main, argv in ((convert, ["--from", str(fp8_dirs / "hf"), "--to", str(tmp_path / "out")]),
                       (generate, ["--config", "configs/tiny.yaml", "--prompt", "hi"])):  # before any model is built
        assert main(argv + ["--quantize", "int3"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == \
            "error: --quantize = 'int3': expected one of fp8, int8, int4, int4-all (or none)"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("fmt,dense", [("int4", "int8"), ("int4-all", "int4"), ("fp8", "fp8")])
def test_policy_puts_int4_on_the_routed_experts_and_int8_on_the_dense_linears(hf_model, fmt, dense):
    """quantize="int4": the routed expert stacks int4 g128 (packed [E, K/2, N], bf16 scales [E, K/g, N]); every other
    quantised linear (attention projections, the shared expert, the first layer's dense MLP) int8 per output channel
    ([K, N], float32 scales [1, N]); "int4-all" int4 everywhere. Embeddings, lm_head, norms, router stay float."""
    from small4_jax.config import Small4Config
    from small4_jax.nn.model import abstract_model

    assert quant.policy(fmt) == quant.Policy(experts="fp8" if fmt == "fp8" else "int4", dense=dense)
    assert quant.spelling(quant.policy(fmt)) == fmt
    config = Small4Config.from_hf_dict(hf_model[0].to_dict())  # first_k_dense_replace = 1: a dense MLP layer too
    def flat(model):  # {path of str: ShapeDtypeStruct}; layer stacks keep their leading layer axis
        return {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}

    floats, state = flat(abstract_model(config)), flat(abstract_model(config, quantize=fmt))
    moe = str(len(layer_groups(config)) - 1)  # the MoE layers' stack (the dense first layer's is "0")
    seen = {"experts": 0, "dense": 0, "dense_mlp": 0, "shared": 0, "float": 0}
    for path, v in state.items():
        names = path
        if names[-1].endswith("_scale"):
            continue
        if (path[:-1] + (names[-1] + "_scale",)) not in state:  # never quantised
            assert v.dtype == jnp.float32 and v.shape == floats[path].shape, path
            seen["float"] += 1
            continue
        part = "experts" if "experts" in names else "dense"
        f = fmt if fmt == "fp8" else ("int4" if part == "experts" else dense)
        vshape, sshape, vdtype = quant.stored_shapes(floats[path].shape, f)
        scale = state[path[:-1] + (names[-1] + "_scale",)]
        assert (v.shape, v.dtype, scale.shape, scale.dtype) == (vshape, vdtype, sshape, quant.scale_dtype(f)), path
        seen[part] += 1
        seen["dense_mlp"] += names[:2] == ("layer_stacks", "0") and "mlp" in names
        seen["shared"] += "shared_experts" in names
    assert all(seen.values()), seen
    if fmt == "int4":
        n, e, h, f2 = layer_groups(config)[-1][1], config.n_routed_experts, config.hidden_size, \
            2 * config.moe_intermediate_size
        assert state[("layer_stacks", moe, "mlp", "experts", "gate_up")].shape == (n, e, h // 2, f2)
        assert state[("layer_stacks", moe, "mlp", "experts", "gate_up_scale")].shape == (n, e, 1, f2)  # K = 64: one group
        assert state[("layer_stacks", moe, "self_attn", "o_proj", "kernel")].dtype == jnp.int8
        assert state[("layer_stacks", moe, "self_attn", "o_proj", "kernel_scale")].shape == (n, 1, h)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_sharded_checkpoint_loads_without_requantising(hf_model, fp8_dirs, tmp_path, fmt):
    """convert --quantize writes the quantised model's own arrays; loading on an expert mesh gives them back."""
    from small4_jax.tools.convert import convert
    from small4_jax.parallel.sharding import make_mesh

    config, _ = hf_model
    out = convert(fp8_dirs / "native", tmp_path / fmt, dtype="f32", quantize=fmt, progress=None)
    direct = small4_jax.from_pretrained(fp8_dirs / "native", quantize=fmt, dtype="float32")
    mesh = make_mesh({"data": 2, "expert": 4, "tensor": 1})
    loaded = small4_jax.from_pretrained(out, mesh=mesh, dtype="float32")
    want, got = dict(nnx.to_flat_state(nnx.state(direct))), dict(nnx.to_flat_state(nnx.state(loaded)))
    assert want.keys() == got.keys()
    for path, v in want.items():
        assert got[path].dtype == v.dtype, path
        np.testing.assert_array_equal(np.asarray(got[path][...]).view(np.uint8) if v.dtype.itemsize == 1 else
                                      np.asarray(got[path][...]), np.asarray(v[...]).view(np.uint8)
                                      if v.dtype.itemsize == 1 else np.asarray(v[...]), err_msg=str(path))
    moe = len(layer_groups(loaded.config)) - 1  # the MoE layers' stack: [layers, E, ...], the layer axis unsharded
    experts = got[("layer_stacks", moe, "mlp", "experts", "gate_up")]
    assert experts[...].sharding.spec[1] == "expert"  # sharded over experts, and so are its scales:
    assert got[("layer_stacks", moe, "mlp", "experts", "gate_up_scale")][...].sharding.spec[1] == "expert"
    ids = _ids(config.vocab_size)
    assert _rel(loaded(ids), direct(ids)) < 1e-5  # expert-parallel over quantised experts = one device


def test_converted_checkpoint_loads_as_its_stored_dtypes_say(fp8_dirs, tmp_path):
    """A converted checkpoint's parts load in the formats its stored arrays hold, not as its format file's spelling
    says: one converted with int4 everywhere and labelled "int4" (as conversions before the per-part policy wrote
    it) loads as int4-all, byte for byte, and asking for "int4" (experts-only) is refused, not requantised."""
    from small4_jax.tools.convert import convert

    out = convert(fp8_dirs / "native", tmp_path / "all", dtype="f32", quantize="int4-all", progress=None)
    fmt_file = out / "small4_format.json"
    want = dict(nnx.to_flat_state(nnx.state(small4_jax.from_pretrained(out, dtype="float32"))))
    fmt_file.write_text(json.dumps({**json.loads(fmt_file.read_text()), "quantize": "int4"}))
    got = dict(nnx.to_flat_state(nnx.state(small4_jax.from_pretrained(out, dtype="float32"))))
    assert got.keys() == want.keys()
    assert got[("layer_stacks", 0, "self_attn", "o_proj", "kernel")].dtype == jnp.uint8  # int4 dense linears
    for path, v in want.items():
        assert got[path].dtype == v.dtype and np.asarray(got[path][...]).tobytes() == np.asarray(v[...]).tobytes()
    with pytest.raises(small4_jax.CheckpointError, match="holds int4-all weights; it loads as int4-all"):
        small4_jax.from_pretrained(out, quantize="int4")


def test_interrupted_quantized_conversion_resumes_to_the_same_bytes(fp8_dirs, tmp_path, monkeypatch):
    """convert --quantize int4 killed mid-way (inside a stacked expert tensor: its values written, its scales not)
    resumes: finished tensors are not written again, the cut-off one is rewritten whole, and every stored array is
    byte-identical to an uninterrupted conversion's."""
    from small4_jax.ckpt import sharded as sharded_ckpt
    from small4_jax.tools.convert import convert

    src, out = fp8_dirs / "native", tmp_path / "int4"
    writes = []
    real_create = sharded_ckpt.Writer.create
    moe = str(len(layer_groups(small4_jax.load_config(src))) - 1)  # the MoE layers' stack
    experts = ("params", "layer_stacks", moe, "mlp", "experts")

    def crashing_create(self, key, shape, dtype):
        if key[:-1] == experts and key[-1] == "gate_up_scale":  # the stacked experts: values created, scales next
            raise KeyboardInterrupt("simulated kill")
        writes.append(key)
        return real_create(self, key, shape, dtype)

    monkeypatch.setattr(sharded_ckpt.Writer, "create", crashing_create)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, dtype="f32", quantize="int4", progress=None)
    assert not out.exists() and (tmp_path / "int4.partial" / "_progress.json").is_file()
    first = list(writes)
    assert experts + ("gate_up",) in first  # cut off inside this tensor
    writes.clear()
    monkeypatch.setattr(sharded_ckpt.Writer, "create",
                        lambda self, k, shape, dtype: (writes.append(k), real_create(self, k, shape, dtype))[1])
    convert(src, out, dtype="f32", quantize="int4", progress=None)
    assert writes[:2] == [experts + ("gate_up",), experts + ("gate_up_scale",)]  # rewritten whole
    assert not set(first[:-1]) & set(writes)  # everything finished before the kill is not written again
    assert not (tmp_path / "int4.partial").exists()
    whole = convert(src, tmp_path / "whole", dtype="f32", quantize="int4", progress=None)
    resumed, want = (dict(nnx.to_flat_state(nnx.state(small4_jax.from_pretrained(d, dtype="float32"))))
                     for d in (out, whole))
    assert resumed.keys() == want.keys()
    for path, v in want.items():
        assert resumed[path].dtype == v.dtype, path
        assert np.asarray(resumed[path][...]).tobytes() == np.asarray(v[...]).tobytes(), path
    assert json.loads((out / "small4_format.json").read_text()) == json.loads(
        (whole / "small4_format.json").read_text())


def test_qlora_gradients_flow_through_the_dequantising_kernel():
    """LoRA over an int4 base: gradients reach every adapter through the dequantising matmuls (the base gets none)."""
    from small4_jax import load_config
    from small4_jax.lora.adapters import TRAINABLE, LoRAConfig, apply_lora
    from small4_jax.nn.model import init_model

    # the kernel's own input gradient is checked against the reference in test_gmm_quant_kernel_matches_reference;
    # here the model-level wiring, with the XLA grouped matmul (Pallas interpret mode is slow on a whole model)
    config = load_config("configs/tiny.yaml").replace(moe_impl="ragged_dot", num_hidden_layers=1)
    model = init_model(config, seed=0, quantize="int4")
    apply_lora(model, LoRAConfig(targets=("all",), rank=4))
    ids = jnp.asarray(_ids(config.vocab_size, seed=4)[:1, :6])
    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)

    def loss(trainable):
        m = nnx.merge(graphdef, trainable, rest)
        logits = m(ids[:, :-1]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    # B starts at zero, so A's gradient is zero: the signal is in B, for dense and expert adapters alike
    grads = dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(trainable)))
    for path, g in grads.items():
        if str(path[-1]) in ("lora_b", "gate_up_b", "down_b"):
            assert float(jnp.abs(g[...]).max()) > 0, path


def test_engine_start_up_report_states_quantised_weights_cache_and_headroom():
    from infer.engine.engine import Engine

    from small4_jax import load_config
    from small4_jax.nn.model import init_model

    config = load_config("configs/tiny.yaml")
    dense = Engine(init_model(config), max_batch=2, num_pages=9, max_model_len=64)
    engine = Engine(init_model(config, quantize="int8"), max_batch=2, num_pages=9, max_model_len=64)
    state = nnx.state(engine.model)
    assert engine.memory["weights"] == sum(x.nbytes for x in jax.tree.leaves(state))
    assert engine.memory["weights"] < dense.memory["weights"] / 2  # int8 linears and experts, f32 embeddings/head
    assert engine.memory["cache"] == sum(x.nbytes for x in jax.tree.leaves(engine.pages))
    assert engine.memory["weights_by_format"] == {"int8": sum(x.nbytes for x in jax.tree.leaves(state)
                                                              if x.dtype == jnp.int8)}
    assert f"int8 {engine.memory['weights_by_format']['int8'] / 2**20:.2f} MiB;" in engine.report
    assert "headroom unknown" in engine.report  # CPU: no limit


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_routed_experts_on_quantised_weights_match_dequantised_weights(fmt):
    """Every path of moe.routed_experts (CPU auto: gather / dense, and ragged_dot) on a QArray = the same call on the
    dequantised float weights."""
    from small4_jax.nn import moe

    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    e, h, f, k = 8, 64, 32, 2
    gu = quant.quantize(jnp.asarray(rng.normal(size=(e, h, 2 * f)) * 0.1, jnp.float32), fmt)
    dn = quant.quantize(jnp.asarray(rng.normal(size=(e, f, h)) * 0.1, jnp.float32), fmt)
    gu_f, dn_f = quant.dequantize(gu), quant.dequantize(dn)
    for n in (1, 12):  # one token: gather; 12 tokens: dense
        x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
        ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
        w = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
        want = moe.routed_experts(x, ids, w, gu_f, dn_f, impl="dense")
        for impl in ("auto", "ragged_dot"):
            got = moe.routed_experts(x, ids, w, gu, dn, impl=impl)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed} {impl} {n}")


def test_qlora_merged_export_equals_the_adapted_quantised_model():
    """merge_into dequantises the base and folds the adapters in: the merged float model computes what the QLoRA
    model (quantised base + unmerged adapters) computes."""
    from small4_jax import load_config
    from small4_jax.lora.adapters import TRAINABLE, LoRAConfig, apply_lora, merge_into
    from small4_jax.nn.model import init_model

    config = load_config("configs/tiny.yaml").replace(num_hidden_layers=1, moe_impl="ragged_dot")
    model = init_model(config, seed=1, quantize="int8")
    apply_lora(model, LoRAConfig(targets=("all",), rank=4))
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    flat = [(p, v.replace(jnp.asarray(rng.normal(size=v.shape) * 0.05, jnp.float32)))
            for p, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))]
    nnx.update(model, nnx.from_flat_state(flat))  # non-zero B: the adapters change the output
    merged = merge_into(init_model(config, seed=7), model)
    ids = jnp.asarray(_ids(config.vocab_size, seed=2)[:, :10])
    assert _rel(merged(ids), model(ids)) < 1e-4
    assert _rel(merged(ids), init_model(config, seed=1, quantize="int8")(ids)) > 1e-2  # the adapters mattered
