"""Logit parity with transformers' Mistral4ForCausalLM (float32) on random tiny models read from disk.

Every option of the config is exercised by at least one case: q-LoRA on/off, dense first layers, group-limited
routing, norm_topk_prob off, routed_scaling_factor, several shared experts, interleaved and half-split RoPE, the YaRN
magnitude factor (mscale_all_dim = 0) and mscale != mscale_all_dim, tied embeddings, attention biases, rms_norm_eps.
Sequences (40 tokens) run well past original_max_position_embeddings (16), so YaRN and the Llama-4 query scaling act.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import small4_jax
from ckpt_utils import make_hf_model, save_hf, save_hf_fp8, save_native, tiny_hf_config

SEQ, BATCH = 40, 2


def rope(**changes):
    base = {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        "partial_rotary_factor": 0.5,
    }
    base.update(changes)
    return base


CASES = {
    # 3 layers (layer 0 dense), q-LoRA, interleaved RoPE, top-2 of 8, mscale == mscale_all_dim (the release's spelling).
    "default": {},
    "plain_q_grouped_halfsplit": dict(
        q_lora_rank=None, rope_interleave=False, n_group=4, topk_group=2, num_experts_per_tok=3,
        norm_topk_prob=False, routed_scaling_factor=2.5, n_shared_experts=2, rms_norm_eps=1e-5, first_k_dense_replace=0,
    ),
    "yarn_magnitude_tied_bias": dict(
        rope_parameters=rope(mscale=0.0, mscale_all_dim=0.0, llama_4_scaling_beta=0.3),
        tie_word_embeddings=True, attention_bias=True, first_k_dense_replace=2, n_group=2, topk_group=1,
    ),
    "mscale_ratio_no_shared": dict(
        rope_parameters=rope(mscale=0.707, mscale_all_dim=1.0, factor=8.0, beta_fast=16.0, beta_slow=2.0),
        n_shared_experts=0, hidden_act="gelu",
    ),
}


def _ids(vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, size=(BATCH, SEQ)).astype(np.int32)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    config = tiny_hf_config(**CASES[case])
    hf = make_hf_model(config, seed=len(case))
    save_hf(hf, tmp_path, max_shard_size="40KB" if case == "default" else None)
    if case == "default":
        assert (tmp_path / "model.safetensors.index.json").is_file()  # multi-file with an index
    ours = small4_jax.from_pretrained(tmp_path, dtype="float32")
    ids = _ids(config.vocab_size)
    ref = _hf_logits(hf, ids)
    out = ours(ids)
    assert out.shape == (BATCH, SEQ, config.vocab_size)
    assert _rel(out, ref) < 1e-4


def test_native_layout_matches_hf(tmp_path):
    """Same weights as an HF directory and as a Mistral-native one (per-expert w1/w2/w3, sharded) give equal logits.

    The scale each side asks for: native yarn.apply_scale = HF rope_parameters.apply_scale. False (the release)
    is the plain 1/sqrt(d); true folds mscale^2 in, which transformers is set to through its own `yarn_apply_mscale`.
    """
    import json

    from transformers.modeling_rope_utils import yarn_apply_mscale

    ids = _ids(128, seed=3)
    for apply_scale in (True, False):
        config = tiny_hf_config(rope_parameters=rope(**({"apply_scale": True} if apply_scale else {})))
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        hf = make_hf_model(config, seed=7, softmax_scale=yarn_apply_mscale(config.rope_parameters, qk**-0.5)
                           if apply_scale else None)
        hf_dir, native_dir = tmp_path / f"hf{apply_scale}", tmp_path / f"native{apply_scale}"
        save_hf(hf, hf_dir)
        save_native(hf, native_dir, num_shards=3)
        params = json.loads((native_dir / "params.json").read_text())
        params["yarn"]["apply_scale"] = apply_scale
        (native_dir / "params.json").write_text(json.dumps(params))
        from_hf = small4_jax.from_pretrained(hf_dir, dtype="float32")
        assert math.isclose(from_hf.config.attn_softmax_scale, hf.model.layers[0].self_attn.scaling, rel_tol=1e-12)
        from_hf = np.asarray(from_hf(ids))
        from_native = np.asarray(small4_jax.from_pretrained(native_dir, dtype="float32")(ids))
        assert _rel(from_native, from_hf) < 1e-6
        assert _rel(from_native, _hf_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("per_expert,prefix", [(True, "model."), (False, "language_model.model.")])
def test_fp8_checkpoint_matches_transformers_on_dequantised_weights(per_expert, prefix, tmp_path):
    config = tiny_hf_config()
    hf = make_hf_model(config, seed=11)
    reference = save_hf_fp8(hf, tmp_path, per_expert=per_expert, prefix=prefix)
    hf.load_state_dict(reference)  # transformers on the dequantised weights
    ours = small4_jax.from_pretrained(tmp_path, dtype="float32")
    ids = _ids(config.vocab_size, seed=5)
    assert _rel(ours(ids), _hf_logits(hf, ids)) < 1e-4


def test_bfloat16_parameters_stay_close(tmp_path):
    """Parameters in the dtype asked; bf16 logits stay near the float32 reference."""
    import jax.numpy as jnp
    from flax import nnx

    config = tiny_hf_config()
    hf = make_hf_model(config, seed=2)
    save_hf(hf, tmp_path)
    ours = small4_jax.from_pretrained(tmp_path)  # default dtype: bfloat16
    dtypes = {x.dtype for x in __import__("jax").tree.leaves(nnx.state(ours))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    ids = _ids(config.vocab_size, seed=9)
    assert _rel(ours(ids).astype(jnp.float32), _hf_logits(hf, ids)) < 5e-2


def test_packed_segments_equal_separate_sequences(tmp_path):
    """Two documents packed in one row with segment ids and per-document positions = each run alone."""
    config = tiny_hf_config()
    hf = make_hf_model(config, seed=13)
    save_hf(hf, tmp_path)
    ours = small4_jax.from_pretrained(tmp_path, dtype="float32")
    a, b = _ids(config.vocab_size, seed=1)[0, :23], _ids(config.vocab_size, seed=2)[0, :17]
    packed = np.concatenate([a, b])[None]
    positions = np.concatenate([np.arange(23), np.arange(17)])[None]
    segments = np.concatenate([np.zeros(23), np.ones(17)]).astype(np.int32)[None]
    out = np.asarray(ours(packed, positions=positions, segment_ids=segments))[0]
    np.testing.assert_allclose(out[:23], np.asarray(ours(a[None]))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[23:], np.asarray(ours(b[None]))[0], rtol=1e-5, atol=1e-5)


def test_bf16_matches_transformers_bf16_routing_and_logits(tmp_path, monkeypatch):
    """bf16 against transformers in bf16 (the same bf16 weights on disk), with the float32 model as the truth.

    Routing: transformers rounds its router logits to bf16 (F.linear in the weights' dtype) and so ties experts that
    ours (float32 products and softmax) tells apart; every decision whose transformers margin between the k-th and
    the (k+1)-th logit is wider than ROUTING_MARGIN (a few bf16 ulps of logits of magnitude ~8, plus the bf16 noise
    of the router's input) must pick the same experts, and nearly all decisions must be that clear.
    Logits: both are bf16 computations of one function, so the yardstick is transformers' own bf16 error against its
    float32 run: ours must be no further from the float32 logits than transformers' bf16 is at worst (the max),
    as far on average (within 25%: two bf16 computations with as many roundings), and no further from
    transformers' bf16 than twice that error on average."""
    import sys

    ROUTING_MARGIN = 0.05
    config = tiny_hf_config()
    ids = _ids(config.vocab_size, seed=5)
    truth = _hf_logits(make_hf_model(config, seed=3), ids)
    hf = make_hf_model(config, seed=3).to(torch.bfloat16)
    theirs_routes = []
    for layer in hf.model.layers:
        if hasattr(layer.mlp, "gate"):  # Mistral4TopkRouter -> (router_logits, weights, indices)
            layer.mlp.gate.register_forward_hook(
                lambda m, i, out: theirs_routes.append((out[0].float().numpy(), out[2].numpy())))
    theirs = _hf_logits(hf, ids)
    save_hf(hf, tmp_path)  # bf16 tensors
    ours_model = small4_jax.from_pretrained(tmp_path, dtype="bfloat16")
    assert ours_model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    model_module = sys.modules[type(ours_model).__module__]
    route, our_routes = model_module.route, []

    def recording_route(logits, **kw):  # under the layer scan: the values leave through a callback, in order
        out = route(logits, **kw)
        jax.debug.callback(lambda ids: our_routes.append(np.asarray(ids)), out[0], ordered=True)
        return out

    monkeypatch.setattr(model_module, "route", recording_route)
    ours = np.asarray(ours_model(ids), np.float32)
    k = config.num_experts_per_tok
    assert len(our_routes) == len(theirs_routes) == config.num_hidden_layers - config.first_k_dense_replace
    clear = 0
    for mine, (their_logits, their_ids) in zip(our_routes, theirs_routes):
        top = np.sort(their_logits, -1)[:, ::-1]
        decided = top[:, k - 1] - top[:, k] > ROUTING_MARGIN
        np.testing.assert_array_equal(np.sort(mine, -1)[decided], np.sort(their_ids, -1)[decided])
        clear += decided.sum()
    assert clear >= 0.9 * len(our_routes) * BATCH * SEQ
    bf16_error = np.abs(theirs - truth)
    assert np.abs(ours - truth).max() <= bf16_error.max()
    assert np.abs(ours - truth).mean() <= 1.25 * bf16_error.mean()
    assert np.abs(ours - theirs).mean() <= 2 * bf16_error.mean()
    assert bf16_error.mean() < 0.01 * np.abs(truth).max()  # and that error is bf16-sized
