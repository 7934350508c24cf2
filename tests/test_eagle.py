"""EAGLE speculative decoding (`small4_jax/nn/eagle.py`, `infer/speculative/eagle_drafter.py`) on a tiny random draft checkpoint.

The draft checkpoint is Mistral-native as the released one is laid out: `params.json` with only some fields (the rest
come from the target), `consolidated.safetensors` with the layers in native names and `eagle_linear.weight` in FP8
with its `qscale_weight` / `qscale_act`. References: the dequantised tensors written; the draft's recurrence run with
plain causal attention over whole sequences (`eagle.reference_forward`) on the target's hidden states from its own
modules; the engine without speculation (greedy token for token).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import small4_jax
from ckpt_utils import make_hf_model, quantize_fp8, save_native, tiny_hf_config
from infer.engine.engine import Engine, SamplingOptions
from infer.speculative.decoder import SpeculativeConfig
from small4_jax.ckpt.eagle import load_eagle, load_eagle_config
from small4_jax.nn.eagle import reference_forward
from small4_jax.errors import CheckpointError, ConfigError
from small4_jax.nn.model import rope_cos_sin
from test_speculative import _run  # the speculative tests' engine driver

ENGINE = dict(max_batch=4, page_size=8, prefill_chunk=16, prefill_batch=2, batch_buckets=(4,), page_buckets=(8,),
              max_model_len=64, num_pages=13)  # the shapes of tests/test_speculative.py (shared compiles)
PARAMS = {"dim": 128, "n_layers": 2, "hidden_dim": 96, "n_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
          "qk_rope_head_dim": 16, "v_head_dim": 32}  # no vocab, RoPE, norm eps or MoE block: the target's


@pytest.fixture(scope="module")
def target():
    config = small4_jax.load_config("configs/tiny.yaml").replace(max_position_embeddings=64)
    return small4_jax.init_model(config, seed=3)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, target):
    """A 2-layer dense MLA draft: the layers of a transformers model, saved natively, plus an FP8 eagle_linear."""
    donor = make_hf_model(tiny_hf_config(vocab_size=512, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                         first_k_dense_replace=2, num_attention_heads=4, num_key_value_heads=4,
                                         q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                         v_head_dim=32), seed=8)
    path = tmp_path_factory.mktemp("eagle")
    reference = save_native(donor, path, fp8=True)
    tensors = load_file(path / "consolidated.safetensors")
    del tensors["tok_embeddings.weight"]  # the draft ships no embedding (an lm_head it may: it is ignored)
    fc = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)) * 0.08
    q, scale = quantize_fp8(fc)
    tensors.update({"eagle_linear.weight": q, "eagle_linear.qscale_weight": scale.reshape(()),
                    "eagle_linear.qscale_act": torch.tensor(0.02)})
    save_file(tensors, path / "consolidated.safetensors")
    (path / "params.json").write_text(json.dumps(PARAMS))
    reference["fc"] = q.float() * scale
    return path, reference


def test_loads_the_native_fp8_draft_with_the_target_config_filling_in(draft_dir, target):
    path, reference = draft_dir
    draft = load_eagle(path, target)
    c = draft.config
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.intermediate_size, c.q_lora_rank) == (2, 2, 96, None)
    for field in ("vocab_size", "rope_type", "rope_theta", "rope_factor", "original_max_position_embeddings",
                  "rms_norm_eps", "llama_4_scaling_beta", "max_position_embeddings"):
        assert getattr(c, field) == getattr(target.config, field), field
    np.testing.assert_array_equal(np.asarray(draft.fc.kernel[...]), reference["fc"].numpy().T)
    np.testing.assert_array_equal(np.asarray(draft.layers[1].self_attn.kv_b_proj.kernel[...]),
                                  reference["model.layers.1.self_attn.kv_b_proj.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(draft.layers[0].mlp.down_proj.kernel[...]),
                                  reference["model.layers.0.mlp.down_proj.weight"].numpy().T)


def test_bad_draft_directories(tmp_path, draft_dir, target):
    with pytest.raises(ConfigError, match="no params.json or config.json"):
        load_eagle_config(tmp_path, target.config)
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "dim": 64}))
    with pytest.raises(ConfigError, match="params.json: hidden size 64 differs from the target's 128"):
        load_eagle_config(tmp_path, target.config)
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "kv_lora_rank": "wide"}))
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        load_eagle_config(tmp_path, target.config)
    path, _ = draft_dir
    tensors = load_file(path / "consolidated.safetensors")
    bad = tmp_path / "nofc"
    bad.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("eagle_linear")}, bad / "consolidated.safetensors")
    (bad / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(CheckpointError, match="no fusion linear"):
        load_eagle(bad, target)


PAD = 64  # sequences are padded to one length (causal: the padding never reaches earlier positions): one compile


@functools.partial(jax.jit, static_argnums=0)
def _target_hidden(graphdef, state, ids):
    """Final-normed hidden states [1, PAD, H] of the target, from its own modules with plain causal attention."""
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    cos, sin = rope_cos_sin(model.config, positions)
    h = model.embed_tokens(ids)
    for layer in model.layers:
        h, _ = layer(h, positions, cos, sin)
    return model.norm(h)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _draft_reference(target_def, target_state, draft_def, draft_state, ids, hidden):
    return reference_forward(nnx.merge(draft_def, draft_state), nnx.merge(target_def, target_state), ids, hidden)


def _padded(ids):
    return jnp.asarray([list(ids) + [0] * (PAD - len(ids))], jnp.int32)


def _reference_drafts(target, draft, tokens, n):
    """Greedy EAGLE chain after `tokens` (t_0..t_N; the target has computed t_0..t_{N-1}): n proposals."""
    (tdef, tstate), (ddef, dstate) = nnx.split(target), nnx.split(draft)
    hidden = _target_hidden(tdef, tstate, _padded(tokens[:-1]))  # h_0 .. h_{N-1} (then padding)
    ids = list(tokens[1:])  # t_1 .. t_N
    out = []
    for _ in range(n):
        logits, g = _draft_reference(tdef, tstate, ddef, dstate, _padded(ids), hidden)
        out.append(int(jnp.argmax(logits[0, len(ids) - 1])))
        ids.append(out[-1])
        hidden = hidden.at[0, len(ids) - 1].set(g[0, len(ids) - 2])  # the draft's state stands in for h
    return out


@pytest.mark.parametrize("k,sharded", [(3, None), (3, "cache"), (3, "context")])
def test_eagle_speculative_greedy_equals_plain_greedy_and_drafts_match_the_reference(draft_dir, target, k, sharded):
    """On one device, on a cache sharded over data=2 by row (8 devices, the MoE expert-parallel over expert=4), and
    split over data=2 by position (`context_axes`, decode context parallelism): the draft's cache is sharded as the
    target's and its steps run in the engine's layout."""
    path, _ = draft_dir
    rng = np.random.default_rng(k)
    prompts = [[1] + rng.integers(3, 512, n - 1).tolist() for n in (9, 23, 14, 30, 6)]
    options = [SamplingOptions(max_tokens=m, ignore_eos=True) for m in (14, 9, 17, 20, 12)]
    options[4] = SamplingOptions(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)  # a sampled row too
    plain = _run(Engine(target, **ENGINE), prompts, options)
    if sharded:
        from flax import nnx

        from small4_jax.parallel.placement import place_model
        from small4_jax.parallel.sharding import make_mesh

        mesh = make_mesh({"data": 2, "expert": 4, "tensor": 1})
        axes = dict(context_axes=("data",)) if sharded == "context" else {}
        spec = Engine(place_model(nnx.clone(target), mesh), mesh=mesh,
                      speculative=SpeculativeConfig("eagle", str(path), k), **dict(ENGINE, num_pages=2 * 13), **axes)
        assert (spec.context_shards if axes else spec.cache_shards) == 2
        assert spec.speculator.drafter.pages.sharding.spec == spec.pages.sharding.spec
    else:
        spec = Engine(target, speculative=SpeculativeConfig("eagle", str(path), k), **ENGINE)
    drafter = spec.speculator.drafter
    # the draft was loaded (and placed) before the cache was sized; the start-up report lists it and its pages
    assert drafter.draft is spec.draft and "draft cache" in spec.report
    assert spec.memory["draft"] > 0 and spec.memory["draft cache"] > 0
    drafter.warmup(spec)  # compiles the draft's shapes ahead (what --warmup runs)
    calls = []
    propose = drafter.propose

    def recording(engine, reqs, rooms):
        out = propose(engine, reqs, rooms)
        calls.extend((list(r.tokens), d) for r, d in zip(reqs, out))
        return out

    drafter.propose = recording
    got = _run(spec, prompts, options)  # 5 requests over 4 slots and 12 pages: joins, leaves, preemption
    for i, (w, g) in enumerate(zip(plain, got)):
        if i < 4:
            assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason and len(g.token_ids) == len(w.token_ids)
    m = spec.metrics()
    assert m["spec_draft_tokens"] > 0 and m["pages_used"] == 0
    checked = 0
    for tokens, drafts in calls[:: max(1, len(calls) // 6)]:  # a sample of the proposals, against the reference
        if drafts:
            assert drafts == _reference_drafts(target, drafter.draft, tokens, len(drafts)), tokens
            checked += 1
    assert checked >= 3


def test_hf_layout_config_is_completed_by_the_tensors_and_the_target(tmp_path, target):
    """An HF-style draft config naming only a few fields (an MoE draft here): the rest is the target's."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["EagleMistral4"], "hidden_size": 128,
                                                       "n_routed_experts": 8, "num_experts_per_tok": 2}))
    c = load_eagle_config(tmp_path, target.config, {"n_layers": 2, "q_lora_rank": 64})
    t = target.config
    assert (c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok, c.q_lora_rank) == (2, 8, 2, 64)
    assert c.first_k_dense_replace == t.first_k_dense_replace and c.moe_intermediate_size == t.moe_intermediate_size
    for field in ("vocab_size", "rope_type", "rope_factor", "kv_lora_rank", "rms_norm_eps", "scale_convention"):
        assert getattr(c, field) == getattr(t, field), field
