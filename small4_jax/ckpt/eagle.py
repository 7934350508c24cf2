"""Loading an EAGLE draft head (`small4_jax.nn.eagle.EagleDraft`): its config and its weights.

Checkpoint layouts (read through `safetensors_io.CheckpointReader`):
- Mistral-native: `params.json` + `consolidated*.safetensors` with `eagle_linear.weight` (FP8 E4M3 with
  `eagle_linear.qscale_weight`, the native scale: W = W_fp8 * scale; `qscale_act` is ignored), `layers.{i}.*` in
  the target's native names and `norm.weight`;
- HF: `config.json` + `model*.safetensors` with `model.fc.weight` (or `fc.weight`), `model.layers.{i}.*`,
  `model.norm.weight`.
Embedding / lm_head tensors in the draft directory, if present, are ignored (the target's are used).

The draft's config is its own file, whose exact fields are not published: it is read liberally. Every field it
gives wins; fields it omits (vocabulary, RoPE / YaRN, norms, MoE sizes, ...) are the target's, because the draft runs
at the target's positions on its tokens; the layer count, if missing, is counted from the tensors. A field that is
there but malformed is an error naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from flax import nnx

from small4_jax.ckpt.plan import checkpoint_plan, load_state, verify_source
from small4_jax.ckpt.safetensors_io import CheckpointReader
from small4_jax.config import Small4Config
from small4_jax.errors import CheckpointError, ConfigError
from small4_jax.nn.eagle import EagleDraft

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------------
# Config.
def _native_view(c: Small4Config) -> dict:
    """The target's config in params.json vocabulary (the defaults a draft's params.json may omit)."""
    p = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
             n_kv_heads=c.num_key_value_heads, norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
             rope_theta=c.rope_theta, q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank,
             qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
             hidden_dim=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
             tied_embeddings=c.tie_word_embeddings)
    p["moe"] = dict(num_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
                    expert_hidden_dim=c.moe_intermediate_size, first_k_dense_replace=c.first_k_dense_replace,
                    num_shared_experts=c.n_shared_experts, routed_scale=c.routed_scaling_factor,
                    num_expert_groups=c.n_group, num_expert_groups_per_tok=c.topk_group,
                    renorm_strategy="WEIGHTS" if c.norm_topk_prob else "NONE")
    if c.rope_type == "yarn":
        p["yarn"] = dict(factor=c.yarn_factor, original_max_position_embeddings=c.original_max_position_embeddings,
                         beta=c.beta_fast, alpha=c.beta_slow, apply_scale=c.yarn_apply_scale)
    return p


_HF_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size", "q_lora_rank",
              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
              "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
              "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob",
              "max_position_embeddings", "hidden_act")
_ROPE_FIELDS = ("rope_type", "rope_theta", "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "rope_attention_factor", "rope_truncate", "scale_convention",
                "yarn_apply_scale", "rope_interleave")
# Target fields the draft inherits unless its file names them (runtime choices and position handling).
_INHERITED = ("runtime", "llama_4_scaling_beta", "llama_4_original_max_position_embeddings", "bos_token_id", "eos_token_id")


def _unwrap(d: dict) -> dict:
    """A config nested under a wrapper key (text_config, eagle_config, draft, ...) comes out flat."""
    for key in ("eagle_config", "draft_config", "draft", "eagle", "text_config"):
        if isinstance(d.get(key), dict) and not any(k in d for k in ("dim", "hidden_size")):
            return d[key]
    return d


def _tensor_hints(source) -> dict:
    """What the draft's tensors say about its config (native field names): layers, q-LoRA or not, dense MLP size."""
    names = set(source.names())
    layers = {int(m[1]) for n in names if (m := _LAYER_RE.match(n))}
    hints: dict = {}
    if layers:
        hints["n_layers"] = max(layers) + 1
    if "layers.0.self_attn.q_proj.weight" in names:
        hints["q_lora_rank"] = 0
    elif "layers.0.self_attn.q_a_proj.weight" in names:
        hints["q_lora_rank"] = source.shape("layers.0.self_attn.q_a_proj.weight")[0]
    dense = [i for i in sorted(layers) if f"layers.{i}.mlp.gate_proj.weight" in names]
    if dense:
        hints["hidden_dim"] = source.shape(f"layers.{dense[0]}.mlp.gate_proj.weight")[0]
        hints["first_k_dense_replace"] = len(dense)
    return hints


_HINT_TO_HF = {"n_layers": "num_hidden_layers", "q_lora_rank": "q_lora_rank", "hidden_dim": "intermediate_size",
               "first_k_dense_replace": "first_k_dense_replace"}


def load_eagle_config(path: str | Path, target: Small4Config, hints: dict | None = None) -> Small4Config:
    """The draft's config from `path/params.json` (native) or `path/config.json` (HF): its fields, then what its
    tensors show (`hints`: layer count, q-LoRA rank, dense layers), then the target's."""
    hints = dict(hints or {})
    path = Path(path)
    native, hf = path / "params.json", path / "config.json"
    src = native if native.is_file() else hf
    if not src.is_file():
        raise ConfigError(f"{path}: no params.json or config.json for the EAGLE draft")
    try:
        raw = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{src}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a JSON object")
    d = _unwrap(raw)
    given = set(d)
    if src == native:
        p = _native_view(target)
        for k, v in d.items():
            if k in ("moe", "yarn") and isinstance(v, dict) and isinstance(p.get(k), dict):
                p[k] = {**p[k], **v}
            else:
                p[k] = v
        for k in ("n_layers", "q_lora_rank", "hidden_dim"):
            if k not in given and k in hints:
                p[k] = hints[k]
        moe_given = isinstance(d.get("moe"), dict) and "first_k_dense_replace" in d["moe"]
        if not moe_given and "first_k_dense_replace" in hints:
            p["moe"] = {**p["moe"], "first_k_dense_replace": hints["first_k_dense_replace"]}
        elif isinstance(p.get("moe"), dict) and p["moe"].get("first_k_dense_replace", 0) > p["n_layers"]:
            p["moe"] = {**p["moe"], "first_k_dense_replace": p["n_layers"]}
        config = Small4Config.from_native_dict(p, source=str(src))
    else:
        d = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "auto_map")}
        config = Small4Config.from_hf_dict({"model_type": "mistral4", **d}, source=str(src))
        # the fields the file does not give: what the tensors show, else the target's
        fill = {k: getattr(target, k) for k in _HF_FIELDS if k not in d}
        fill["num_hidden_layers"] = d.get("num_hidden_layers", hints.get("n_layers", target.num_hidden_layers))
        for k, v in hints.items():
            if _HINT_TO_HF[k] not in d:
                fill[_HINT_TO_HF[k]] = (v or None) if k == "q_lora_rank" else v
        if "rope_parameters" not in d and "rope_scaling" not in d:
            fill.update({k: getattr(target, k) for k in _ROPE_FIELDS})
        config = config.replace(**fill)
    if "dim" not in given and "hidden_size" not in given:
        config = config.replace(hidden_size=target.hidden_size)
    inherit = {k: getattr(target, k) for k in _INHERITED if k not in given}
    config = config.replace(**inherit)
    if config.hidden_size != target.hidden_size:
        raise ConfigError(f"{src}: hidden size {config.hidden_size} differs from the target's {target.hidden_size} "
                          "(the draft reads the target's hidden states and embeddings)")
    if config.vocab_size != target.vocab_size:
        raise ConfigError(f"{src}: vocab_size {config.vocab_size} differs from the target's {target.vocab_size}")
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Loading.
_SHARED = ("embed_tokens.weight", "lm_head.weight")


class _DraftSource:
    """The reader's tensors minus the shared embedding / head (which a draft may carry; the target's are used)."""

    def __init__(self, reader):
        self.reader = reader

    def names(self):
        return [n for n in self.reader.names() if n not in _SHARED]

    def shape(self, name):
        return self.reader.shape(name)

    def get(self, name, dtype=np.float32):
        return self.reader.get(name, dtype=dtype)


def load_eagle(path: str | Path, target, *, dtype=None) -> EagleDraft:
    """Load the EAGLE draft in `path` for `target` (a `Small4ForCausalLM`), in the target's dtype by default."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: EAGLE draft directory not found")
    reader = CheckpointReader(path)
    try:
        source = _DraftSource(reader)
        names = source.names()
        if "fc.weight" not in names:
            raise CheckpointError(f"{path}: no fusion linear (expected `eagle_linear.weight` in a native checkpoint "
                                  "or `model.fc.weight` in an HF one)")
        config = load_eagle_config(path, target.config, _tensor_hints(source))
        dtype = dtype or target.dtype
        abstract = nnx.eval_shape(lambda: EagleDraft(config, dtype=dtype, fc_bias="fc.bias" in names,
                                                     rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        plan = checkpoint_plan(state)
        verify_source(config, plan, source, f"{path} (EAGLE draft)")
        return load_state(graphdef, state, plan, source, dtype=dtype, where=f"{path} (EAGLE draft)", committed=False)
    finally:
        reader.close()
