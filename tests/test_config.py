"""Config loaders (YAML presets, HF config.json incl. the mistral3 wrapper, native params.json) and derived values."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from small4_jax.config import Small4Config, load_config
from small4_jax.errors import ConfigError
from small4_jax.nn.model import param_count

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_config_and_moe_agree_on_the_strategies():
    from small4_jax.nn import moe
    from small4_jax.config import MOE_STRATEGIES

    assert set(MOE_STRATEGIES) == set(moe.STRATEGIES)


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.vocab_size > 0 and cfg.num_hidden_layers > 0


def test_small4_preset_has_the_released_size():
    cfg = load_config(REPO / "configs" / "small4-119b.yaml")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (4096, 36, 128, 4)
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 320  # cached values per token per layer
    assert param_count(cfg.replace(vision=None)) == 118_972_826_624  # ARCHITECTURE.md §1.8: 118.973B text parameters
    # + vision tower 0.403B (24 x 16.78M + conv + ln_pre) + projector 0.025B = 119.40B
    assert param_count(cfg) - 118_972_826_624 == 24 * (4 * 1024**2 + 3 * 1024 * 4096 + 2 * 1024) + 1024 * 3 * 14 * 14 \
        + 1024 + (1024 + 4096 * 1024 + 1024 * 4096 + 4096**2)
    assert param_count(cfg) == 119_401_298_944


def test_yarn_frequencies_of_the_released_model():
    """ARCHITECTURE.md §1.4: pairs 0-12 keep their frequency, 25-31 are divided by 128, 13-24 blend."""
    cfg = Small4Config()
    inv = cfg.rope_inv_freq()
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv[:13], base[:13], rtol=1e-6)
    np.testing.assert_allclose(inv[25:], base[25:] / 128, rtol=1e-6)
    assert np.all((inv[13:25] < base[13:25]) & (inv[13:25] > base[13:25] / 128))
    assert cfg.rope_magnitude == 1.0


def test_yarn_frequencies_equal_transformers():
    from transformers import Mistral4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rp in ({"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0},
               {"factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 8.0, "beta_slow": 2.0,
                "truncate": False, "mscale": 0.0, "mscale_all_dim": 0.0}):
        rope = dict(rope_type="yarn", rope_theta=5000.0, llama_4_scaling_beta=0.1, partial_rotary_factor=0.5, **rp)
        hf = Mistral4Config(qk_nope_head_dim=16, qk_rope_head_dim=16, max_position_embeddings=256,
                            rope_parameters=rope)
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
        ours = Small4Config.from_hf_dict(hf.to_dict())
        np.testing.assert_allclose(ours.rope_inv_freq(), inv_freq.numpy(), rtol=1e-6)
        assert math.isclose(ours.rope_magnitude, factor, rel_tol=1e-7)


def test_softmax_scale_conventions(tmp_path):
    """Plain 1/sqrt(qk_head_dim) unless the config asks for mscale^2 (ARCHITECTURE.md §6.1); "mscale2" is exactly
    transformers' Mistral4 scale, and a runtime override wins over both."""
    plain = 128**-0.5
    hf = Small4Config.from_hf_dict({"model_type": "mistral4", **_hf_rope(mscale_all_dim=1.0)})
    assert hf.attn_softmax_scale == plain and not hf.yarn_apply_scale  # the release's mscale = mscale_all_dim = 1
    asked = Small4Config.from_hf_dict({"model_type": "mistral4", **_hf_rope(mscale_all_dim=1.0, apply_scale=True)})
    assert math.isclose(asked.attn_softmax_scale, plain * (1 + 0.1 * math.log(128)) ** 2)
    assert math.isclose(asked.attn_softmax_scale, 0.19496949, rel_tol=1e-6)
    no_mscale = Small4Config.from_hf_dict({"model_type": "mistral4", **_hf_rope(mscale_all_dim=0.0, apply_scale=True)})
    assert no_mscale.attn_softmax_scale == plain  # transformers folds nothing in when mscale_all_dim is 0
    native = Small4Config.from_native_dict(_native_params(apply_scale=False))
    assert native.attn_softmax_scale == plain  # 0.0884
    assert Small4Config.from_native_dict(_native_params(apply_scale=True)).attn_softmax_scale == asked.attn_softmax_scale
    assert hf.replace(softmax_scale=0.05).attn_softmax_scale == 0.05  # the runtime override wins
    assert asked.with_runtime(softmax_scale="plain").attn_softmax_scale == plain
    with pytest.raises(ConfigError, match=r"rope_parameters\.apply_scale = 'yes'; expected true or false"):
        Small4Config.from_hf_dict({"model_type": "mistral4", **_hf_rope(mscale_all_dim=1.0, apply_scale="yes")})
    # transformers (any version since #47435) computes exactly "mscale2" for the release's config.json
    from transformers import Mistral4Config
    from transformers.models.mistral4.modeling_mistral4 import Mistral4Attention

    attn = Mistral4Attention(Mistral4Config(**_hf_rope(mscale_all_dim=1.0)), layer_idx=0)
    assert attn.scaling == hf.with_runtime(softmax_scale="mscale2").attn_softmax_scale


def test_mistral3_wrapper_and_native_params_give_the_same_text_config(tmp_path):
    text = {"model_type": "mistral4", **_hf_rope(mscale_all_dim=1.0), "hidden_size": 4096, "num_hidden_layers": 36}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": text,
                                                      "vision_config": {"model_type": "pixtral"}}))
    wrapped = load_config(tmp_path)
    assert wrapped.replace(vision=None) == Small4Config.from_hf_dict(text)
    # the vision block takes transformers' PixtralVisionConfig defaults for the fields it leaves out
    from transformers import PixtralVisionConfig

    pix = PixtralVisionConfig()
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                  "image_size", "hidden_act"):
        assert getattr(wrapped.vision, field) == getattr(pix, field), field
    native = Small4Config.from_native_dict(_native_params(apply_scale=False))
    for field in ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "q_lora_rank",
                  "kv_lora_rank", "moe_intermediate_size", "original_max_position_embeddings", "llama_4_scaling_beta"):
        assert getattr(native, field) == getattr(wrapped, field), field
    np.testing.assert_allclose(native.rope_inv_freq(), wrapped.rope_inv_freq())
    assert native.scale_convention == "native" and wrapped.scale_convention == "hf"


def test_hf_config_json_round_trips_through_transformers(tmp_path):
    from transformers import Mistral4Config

    hf = Mistral4Config(q_lora_rank=None, n_group=4, topk_group=2, first_k_dense_replace=3, norm_topk_prob=False,
                        routed_scaling_factor=2.5, n_shared_experts=2, rope_interleave=False, rms_norm_eps=1e-5,
                        tie_word_embeddings=True, attention_bias=True, eos_token_id=[2, 7])
    hf.save_pretrained(tmp_path)
    cfg = load_config(tmp_path / "config.json")
    assert cfg.q_lora_rank is None and cfg.n_group == 4 and cfg.topk_group == 2 and cfg.first_k_dense_replace == 3
    assert cfg.norm_topk_prob is False and cfg.routed_scaling_factor == 2.5 and cfg.n_shared_experts == 2
    assert cfg.rope_interleave is False and cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings is True
    assert cfg.attention_bias is True and cfg.eos_token_id == (2, 7)
    assert cfg.llama_4_scaling_beta == 0.1 and cfg.rope_factor == 128.0


def test_bad_configs_name_the_file_and_field(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("hidden_size: 64\nnum_layers: 3\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown field\(s\) num_layers"):
        load_config(p)
    p.write_text("hidden_size: sixty\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: field 'hidden_size' = 'sixty'; expected int"):
        load_config(p)
    p.write_text("moe_strategy: scatter\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: field 'moe_strategy' = 'scatter'; expected one of auto, replicated"):
        load_config(p)
    p.write_text("n_routed_experts: 8\nn_group: 3\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: field 'n_group' = 3; expected a divisor of n_routed_experts"):
        load_config(p)
    j = tmp_path / "config.json"
    j.write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model_type 'deepseek_v3'"):
        load_config(j)
    j.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_config(j)
    n = tmp_path / "params.json"
    n.write_text(json.dumps({"dim": 64}))
    with pytest.raises(ConfigError, match=r"params\.json: missing field 'n_layers'"):
        load_config(n)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty: no config\.json \(Hugging Face\) or params\.json"):
        load_config(empty)


def _hf_rope(mscale_all_dim: float, **extra) -> dict:
    return {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                                "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
                                "mscale": 1.0, "mscale_all_dim": mscale_all_dim, "llama_4_scaling_beta": 0.1,
                                "partial_rotary_factor": 0.5, **extra}}


def _native_params(apply_scale: bool) -> dict:
    return {
        "dim": 4096, "n_layers": 36, "n_heads": 32, "n_kv_heads": 32, "hidden_dim": 12288, "norm_eps": 1e-6,
        "vocab_size": 131072, "rope_theta": 10000.0, "q_lora_rank": 1024, "kv_lora_rank": 256,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 128, "tied_embeddings": False,
        "moe": {"num_experts": 128, "num_experts_per_tok": 4, "expert_hidden_dim": 2048, "first_k_dense_replace": 0,
                "num_shared_experts": 1, "routed_scale": 1.0, "num_expert_groups": 1, "num_expert_groups_per_tok": 1},
        "yarn": {"factor": 128.0, "original_max_position_embeddings": 8192, "beta": 32.0, "alpha": 1.0,
                 "apply_scale": apply_scale},
        "llama_4_scaling": {"original_max_position_embeddings": 8192, "beta": 0.1},
    }

