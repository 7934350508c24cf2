"""Tests for small4_jax.ckpt.safetensors_io.CheckpointReader: HF and Mistral-native layouts, FP8, vision skipping, errors."""

from __future__ import annotations

import copy
import json
import logging
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch
from ckpt_utils import (
    HF_PREFIXES,
    canonical,
    fake_vision_tensors,
    hf_state_dict,
    make_hf_model,
    save_hf,
    save_hf_fp8,
    save_hf_layout,
    save_native,
    tiny_hf_config,
    truncate_file,
)
from safetensors.torch import save_file

import small4_jax.ckpt.safetensors_io as sio
from small4_jax.errors import CheckpointError
from small4_jax.ckpt.safetensors_io import CheckpointReader


@pytest.fixture(scope="module")
def model():
    return make_hf_model(tiny_hf_config(), seed=0)


@pytest.fixture(scope="module")
def ref(model):
    """Canonical name -> float32 numpy array of the model's weights."""
    return {canonical(k): v.numpy() for k, v in hf_state_dict(model).items()}


def assert_matches(reader: CheckpointReader, ref: dict[str, np.ndarray]) -> None:
    """Every canonical name present, with the right header shape and bit-identical float32 values."""
    assert reader.names() == sorted(ref)
    for name, want in ref.items():
        assert reader.shape(name) == want.shape, name
        got = reader.get(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# HF layout.


def test_hf_single_file(model, ref, tmp_path):
    save_hf(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    with CheckpointReader(tmp_path) as r:
        assert r.format == "hf" and r.directory == tmp_path and r.skipped == []
        assert "layers.1.mlp.experts.gate_up_proj" in r and "layers.0.mlp.gate_proj.weight" in r
        assert r.shape("layers.1.mlp.experts.gate_up_proj") == (8, 64, 64)
        assert r.shape("layers.1.mlp.experts.down_proj") == (8, 64, 32)
        assert_matches(r, ref)


def test_hf_sharded_with_index(model, ref, tmp_path):
    save_hf(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    with CheckpointReader(tmp_path) as r:
        assert_matches(r, ref)


def test_hf_sharded_without_index(model, ref, tmp_path):
    save_hf(model, tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").unlink()
    with CheckpointReader(tmp_path) as r:
        assert_matches(r, ref)


def test_hf_bf16_and_dtype_conversion(model, tmp_path):
    save_hf(copy.deepcopy(model).to(torch.bfloat16), tmp_path)
    want = hf_state_dict(model)["model.layers.1.mlp.experts.gate_up_proj"].to(torch.bfloat16)
    with CheckpointReader(tmp_path) as r:
        assert r.stored_dtype("layers.1.mlp.experts.gate_up_proj") == "BF16"
        got = r.get("layers.1.mlp.experts.gate_up_proj", dtype=ml_dtypes.bfloat16)
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(r.get("layers.1.mlp.experts.gate_up_proj"), want.float().numpy())
        assert r.get("norm.weight", dtype=np.float16).dtype == np.float16


@pytest.mark.parametrize("prefix", list(HF_PREFIXES))
def test_hf_prefixes_and_vision_skipped(model, ref, tmp_path, caplog, prefix):
    save_hf_layout(model, tmp_path, prefix=prefix, num_shards=2)
    caplog.set_level(logging.INFO, logger="small4_jax")
    with CheckpointReader(tmp_path) as r:
        assert_matches(r, ref)
        multimodal = HF_PREFIXES[prefix][2] is not None
        n = len(fake_vision_tensors(model.config.hidden_size))
        assert len(r.skipped) == (n if multimodal else 0)
    lines = [rec.getMessage() for rec in caplog.records if "skipped" in rec.getMessage()]
    assert lines == ([f"skipped {n} vision/projector tensors in {tmp_path}"] if multimodal else [])


# ----------------------------------------------------------------------------------------------------------------------
# Mistral-native layout.


@pytest.mark.parametrize("num_shards", [1, 3])
def test_native_matches_hf(model, ref, tmp_path, num_shards):
    save_native(model, tmp_path, num_shards=num_shards)
    hf_dir = tmp_path / "hf"
    save_hf(model, hf_dir)
    with CheckpointReader(tmp_path) as native, CheckpointReader(hf_dir) as hf:
        assert native.format == "native"
        assert native.names() == hf.names()
        for name in hf.names():
            assert native.shape(name) == hf.shape(name), name
            np.testing.assert_array_equal(native.get(name), hf.get(name), err_msg=name)
        assert_matches(native, ref)


def test_native_without_q_lora(tmp_path):
    """`attention.wq` (no q-LoRA) maps to `self_attn.q_proj.weight`."""
    model = make_hf_model(tiny_hf_config(q_lora_rank=None, num_hidden_layers=2), seed=1)
    save_native(model, tmp_path)
    assert json.loads((tmp_path / "params.json").read_text())["moe"]["num_experts"] == 8
    with CheckpointReader(tmp_path) as r:
        assert "layers.0.self_attn.q_proj.weight" in r and "layers.0.self_attn.q_a_proj.weight" not in r
        assert_matches(r, {canonical(k): v.numpy() for k, v in hf_state_dict(model).items()})


def test_tied_embeddings_store_no_lm_head(tmp_path):
    """Tied checkpoints (as save_pretrained writes them) have no lm_head; the reader does not invent one."""
    model = make_hf_model(tiny_hf_config(tie_word_embeddings=True, num_hidden_layers=2), seed=3)
    want = {canonical(k): v.numpy() for k, v in hf_state_dict(model).items() if k != "lm_head.weight"}
    save_hf_layout(model, tmp_path / "hf", prefix="language_model.model.")
    save_native(model, tmp_path / "native")
    for path in (tmp_path / "hf", tmp_path / "native"):
        with CheckpointReader(path) as r:
            assert "lm_head.weight" not in r
            assert_matches(r, want)


def test_native_vision_skipped_and_format_choice(model, tmp_path, caplog):
    save_native(model, tmp_path)
    save_file({"vision_encoder.patch_conv.weight": torch.zeros(4, 3, 2, 2), "patch_merger.merging_layer.weight":
               torch.zeros(4, 16)}, str(tmp_path / "consolidated-vision.safetensors"))
    save_hf(model, tmp_path)  # a directory with both layouts, as on Mistral's hub repos
    caplog.set_level(logging.INFO, logger="small4_jax")
    with CheckpointReader(tmp_path) as r:
        assert r.format == "hf" and r.skipped == []
    with CheckpointReader(tmp_path, fmt="native") as r:
        assert r.format == "native"
        assert sorted(r.skipped) == ["patch_merger.merging_layer.weight", "vision_encoder.patch_conv.weight"]
    assert [rec.getMessage() for rec in caplog.records] == [f"skipped 2 vision/projector tensors in {tmp_path}"]


# ----------------------------------------------------------------------------------------------------------------------
# FP8.


@pytest.mark.parametrize("per_expert", [True, False])
def test_hf_fp8_dequantised(model, tmp_path, per_expert):
    reference = save_hf_fp8(model, tmp_path, per_expert=per_expert, prefix="language_model.model.")
    with CheckpointReader(tmp_path) as r:
        assert not any("scale" in n for n in r.names())
        assert r.stored_dtype("layers.1.mlp.experts.gate_up_proj") == "F8_E4M3"
        assert r.stored_dtype("layers.1.mlp.gate.weight") == "F32"
        assert_matches(r, {canonical(k): v.numpy() for k, v in reference.items()})
        want = reference["model.layers.2.mlp.experts.down_proj"].to(torch.bfloat16).view(torch.int16).numpy()
        got = r.get("layers.2.mlp.experts.down_proj", dtype=ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got.view(np.int16), want)


def test_native_fp8_dequantised(model, tmp_path):
    reference = save_native(model, tmp_path, num_shards=2, fp8=True)
    with CheckpointReader(tmp_path) as r:
        assert r.stored_dtype("layers.1.self_attn.q_b_proj.weight") == "F8_E4M3"
        assert_matches(r, {canonical(k): v.numpy() for k, v in reference.items()})


def test_fp8_quantisation_error_is_small(model, ref, tmp_path):
    """The helper's FP8 reference is a real approximation of the model (guards against a wrong scale convention)."""
    save_hf_fp8(model, tmp_path)
    with CheckpointReader(tmp_path) as r:
        w = ref["layers.1.mlp.experts.gate_up_proj"]
        assert np.abs(r.get("layers.1.mlp.experts.gate_up_proj") - w).max() < 0.1 * np.abs(w).max()


def test_fp8_small_chunks(model, tmp_path, monkeypatch):
    """Many small read chunks give the same values as one chunk per tensor."""
    reference = save_hf_fp8(model, tmp_path)
    monkeypatch.setattr(sio, "_CHUNK_BYTES", 1000)
    with CheckpointReader(tmp_path) as r:
        assert_matches(r, {canonical(k): v.numpy() for k, v in reference.items()})


def test_fp8_scale_layouts(tmp_path, monkeypatch):
    """Per-expert [E] scales, transformers' own [E, 2, 1] gate/up scale grid, and 2-D block grids all multiply."""
    gen = torch.Generator().manual_seed(0)
    experts = torch.randn(4, 8, 6, generator=gen).to(torch.float8_e4m3fn)
    linear = torch.randn(8, 12, generator=gen).to(torch.float8_e4m3fn)
    s_e, s_gu, s_lin = torch.rand(4) + 0.5, torch.rand(4, 2, 1) + 0.5, torch.rand(4, 3) + 0.5
    save_file({
        "model.layers.0.mlp.experts.down_proj": experts, "model.layers.0.mlp.experts.down_proj_scale_inv": s_e,
        "model.layers.0.mlp.experts.gate_up_proj": experts.clone(),
        "model.layers.0.mlp.experts.gate_up_proj_scale_inv": s_gu,
        "model.layers.0.self_attn.o_proj.weight": linear, "model.layers.0.self_attn.o_proj.weight_scale_inv": s_lin,
    }, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(sio, "_CHUNK_BYTES", 100)  # forces chunks of whole scale blocks
    e32, l32 = experts.float(), linear.float()
    with CheckpointReader(tmp_path) as r:
        np.testing.assert_array_equal(r.get("layers.0.mlp.experts.down_proj"), (e32 * s_e[:, None, None]).numpy())
        want = e32 * s_gu.repeat_interleave(4, dim=1)
        np.testing.assert_array_equal(r.get("layers.0.mlp.experts.gate_up_proj"), want.numpy())
        want = l32 * s_lin.repeat_interleave(2, dim=0).repeat_interleave(4, dim=1)
        np.testing.assert_array_equal(r.get("layers.0.self_attn.o_proj.weight"), want.numpy())


def test_bad_scale_shape(tmp_path):
    save_file({"model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 12).to(torch.float8_e4m3fn),
               "model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(3, 5)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"scale 'model.layers.0.self_attn.o_proj.weight_scale_inv' has shape "
                       r"\[3, 5\], which does not fit"):
        CheckpointReader(tmp_path)


def test_get_peak_memory_is_output_plus_a_chunk(tmp_path, monkeypatch):
    """Reading a per-expert FP8 tensor never materialises a full float32 copy next to the output."""
    q = torch.randn(16, 128, 256).to(torch.float8_e4m3fn)
    scale = torch.rand(16, 1, 1) + 0.5
    save_file({"model.layers.0.mlp.experts.down_proj": q, "model.layers.0.mlp.experts.down_proj_scale_inv": scale},
              str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(sio, "_CHUNK_BYTES", 128 * 1024)
    with CheckpointReader(tmp_path) as r:
        tracemalloc.start()
        out = r.get("layers.0.mlp.experts.down_proj")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    np.testing.assert_array_equal(out, (q.float() * scale).numpy())
    assert peak < out.nbytes + 512 * 1024, (peak, out.nbytes)


# ----------------------------------------------------------------------------------------------------------------------
# Errors.


def test_truncated_file(model, tmp_path):
    save_hf(model, tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    truncate_file(shard, -100)
    with pytest.raises(CheckpointError, match="truncated") as e:
        CheckpointReader(tmp_path)
    assert str(shard) in str(e.value) and "needs bytes" in str(e.value)


def test_truncated_inside_header(tmp_path):
    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    truncate_file(tmp_path / "model.safetensors", 20)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt.*header needs bytes"):
        CheckpointReader(tmp_path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "model.safetensors"
    garbage = b"{not json!"
    path.write_bytes(len(garbage).to_bytes(8, "little") + garbage)
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        CheckpointReader(tmp_path)
    assert str(path) in str(e.value)


def test_absurd_header_length(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        CheckpointReader(tmp_path)


def test_offsets_disagree_with_shape(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"needs 16 bytes, data_offsets \[0, 12\] give 12"):
        CheckpointReader(tmp_path)


def test_missing_shard_from_index(model, tmp_path):
    save_hf(model, tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path)
    assert str(tmp_path / "model.safetensors.index.json") in str(e.value) and victim.name in str(e.value)


def test_missing_shard_without_index(model, tmp_path):
    save_native(model, tmp_path, num_shards=3)
    (tmp_path / "consolidated.safetensors.index.json").unlink()
    (tmp_path / "consolidated-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="consolidated-00002-of-00003.safetensors is missing"):
        CheckpointReader(tmp_path)


def test_empty_and_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found") as e:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")


def test_fp8_without_scale_and_unknown_names(tmp_path):
    save_file({"model.layers.0.self_attn.o_proj.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="has no scale tensor"):
        CheckpointReader(tmp_path)
    save_file({"transformer.h.0.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unrecognised tensor 'transformer.h.0.weight'"):
        CheckpointReader(tmp_path)


def test_unknown_canonical_name(model, tmp_path):
    save_hf(model, tmp_path)
    with CheckpointReader(tmp_path) as r, pytest.raises(CheckpointError, match="no tensor 'layers.9.foo'"):
        r.get("layers.9.foo")


@pytest.mark.parametrize("layout", ["hf_fp8_per_expert", "hf_fp8_per_tensor", "native_fp8", "hf"])
def test_row_ranges_equal_slices_of_the_whole(model, tmp_path, layout):
    """get(rows=...) reads a piece of the first axis (experts): what convert streams large tensors with."""
    if layout == "native_fp8":
        save_native(model, tmp_path, num_shards=2, fp8=True)
    elif layout == "hf":
        save_hf(model, tmp_path)
    else:
        save_hf_fp8(model, tmp_path, per_expert=layout.endswith("per_expert"))
    reader = CheckpointReader(tmp_path)
    for name in reader.names():
        shape = reader.shape(name)
        if len(shape) < 2 or shape[0] < 3:
            continue
        whole = reader.get(name, dtype=ml_dtypes.bfloat16)
        for rows in ((0, 1), (1, 3), (shape[0] - 2, shape[0])):
            np.testing.assert_array_equal(reader.get(name, dtype=ml_dtypes.bfloat16, rows=rows),
                                          whole[rows[0]:rows[1]], err_msg=f"{name} {rows}")
    with pytest.raises(ValueError, match="out of range"):
        reader.get("layers.1.mlp.experts.down_proj", rows=(0, 10**6))
