"""One typed config for the Mistral Small 4 text model, and its loaders.

Sources of a config:
- `Small4Config.from_yaml(path)`: our presets in `configs/` (flat keys, the field names below);
- `Small4Config.from_hf_json(path)`: a Hugging Face `config.json`, top-level `mistral4` or a `mistral3` wrapper with
  `text_config`;
- `Small4Config.from_native_json(path)`: a Mistral-native `params.json`;
- `load_config(path)`: any of these, or a checkpoint directory holding one.

Field names follow transformers' `Mistral4Config`; the RoPE settings that HF nests under `rope_parameters` are flat
here (`rope_factor` is HF's `factor`, `rope_attention_factor` its `attention_factor`, `rope_truncate` its `truncate`).

A config holds what the weights need (the architecture); how a run executes it (kernels, expert parallelism, layer
scanning, a softmax-scale override) is `config.runtime`, a `small4_jax.runtime.Runtime` (`with_runtime`). For
compatibility, the runtime fields are also accepted flat by `from_dict` / `replace` and readable as attributes
(`config.moe_impl` is `config.runtime.moe_impl`). `architecture()` is what a checkpoint and a run must agree on.

Softmax scale (ARCHITECTURE.md §6.1). The attention logits are multiplied by `attn_softmax_scale`:
1. `runtime.softmax_scale`, when set (`--softmax-scale` on every CLI, `runtime: softmax_scale` in run configs): a
   number, "plain" or "mscale2";
2. else `yarn_apply_scale`: true folds YaRN's mscale into it, `qk_head_dim**-0.5 * mscale**2` with
   `mscale = 0.1 * mscale_all_dim * ln(factor) + 1` (transformers' Mistral4 since PR #47435 does this whenever
   `mscale_all_dim` is non-zero: 0.195 for Small 4); false, the default, gives the plain `qk_head_dim**-0.5`
   (0.0884 for Small 4). A native params.json sets it from `yarn.apply_scale` (false in the release); an HF
   config.json from `rope_parameters.apply_scale` (the same key; absent in the release, so false). Mistral's HF
   converter writes `mscale = mscale_all_dim = 1.0` for every checkpoint as its encoding of `apply_scale: false`,
   and the measurements on the real weights (SGLang #26203, vLLM #57563, NeMo Automodel ea16f15e4) favour 0.0884.

The RoPE magnitude factor applied to cos/sin is transformers' YaRN `attention_factor` for HF configs (1 for the
release: mscale == mscale_all_dim) and exactly 1 for native ones (`scale_convention` records which format a config
came from; the two agree on the release).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from small4_jax.errors import ConfigError
from small4_jax.runtime import ATTN_IMPLS, DENSE_IMPLS, MOE_IMPLS, MOE_STRATEGIES, Runtime

__all__ = ["ATTN_IMPLS", "DENSE_IMPLS", "MOE_IMPLS", "MOE_STRATEGIES", "Runtime", "Small4Config", "VisionConfig",
           "load_config", "read_yaml"]

_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
_RUNTIME_FIELDS = frozenset(Runtime.field_names())
# Fields that the two released formats spell differently for the same weights: taken from the checkpoint, never
# compared (`architecture`). vision.rope_interleave is the q/k row layout the converter chose; the projector norm eps
# is 1e-6 in HF (the text rms_norm_eps) and 1e-5 in Mistral's native stack (ARCHITECTURE.md §3.3, "negligible").
FORMAT_FIELDS = ("scale_convention", "vision.rope_interleave", "vision.projector_norm_eps")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Pixtral vision encoder and the Mistral3 projector (ARCHITECTURE.md §3). Defaults are Small 4's.

    `rope_interleave` says which layout the q/k projection rows of the encoder are in: False for HF checkpoints
    (the converter permuted them to rotate-half, pair i = dims (i, i + head_dim/2)), True for Mistral-native ones
    (pair i = dims (2i, 2i+1)). `projector_norm_eps` is the text `rms_norm_eps` in HF (Mistral3 builds the projector
    norm with it) and 1e-5 in native checkpoints (vLLM's `pre_mm_projector_norm`).
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 1540  # the longest side an image is resized to (mistral-common's max_image_size)
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    norm_eps: float = 1e-5  # ln_pre and the encoder blocks' norms
    rope_interleave: bool = False
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    projector_norm_eps: float = 1e-6
    multimodal_projector_bias: bool = False
    vision_feature_layer: int = -1  # which encoder layer's output is projected (-1: the last; no final norm)
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    initializer_range: float = 0.02
    # The encoder's bidirectional attention (kernels/attention, block-diagonal through segment ids): "auto",
    # "blockwise", "pallas" or "reference" (every score materialised: tests only; 12,100 patches need O(N) memory).
    attn_impl: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "config") -> None:
        def bad(field: str, expected: str):
            raise ConfigError(f"{source}: field 'vision.{field}' = {getattr(self, field)!r}; expected {expected}")

        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "patch_size", "image_size", "spatial_merge_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, "a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"a divisor of vision.hidden_size = {self.hidden_size}")
        if self.head_dim % 4:
            bad("hidden_size", "hidden_size / num_attention_heads a multiple of 4 (2-D RoPE: row and column pairs)")
        for f in ("hidden_act", "projector_hidden_act"):
            if getattr(self, f) not in _ACTIVATIONS:
                bad(f, f"one of {', '.join(_ACTIVATIONS)}")
        if self.attn_impl not in ATTN_IMPLS:
            bad("attn_impl", f"one of {', '.join(ATTN_IMPLS)}")
        if not -self.num_hidden_layers <= self.vision_feature_layer < self.num_hidden_layers + 1:
            bad("vision_feature_layer", f"an encoder layer index in [-{self.num_hidden_layers}, "
                f"{self.num_hidden_layers}] (one layer, as Small 4 uses)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_token_size(self) -> int:
        """Pixels per side of one image token: patch_size x spatial_merge_size (28 for Small 4)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> VisionConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: field 'vision' must be a mapping of vision fields (or null)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join('vision.' + u for u in unknown)}; known vision "
                              f"fields: {', '.join(sorted(known))}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for k, v in d.items():
            check_type("vision." + k, v, types[k], source)
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], text: dict[str, Any], source: str) -> VisionConfig:
        """From a `mistral3` config.json: its `vision_config` (pixtral) and the top-level projector fields."""
        v = d.get("vision_config")
        if not isinstance(v, dict):
            raise ConfigError(f"{source}: model_type 'mistral3' needs a 'vision_config' mapping")
        if v.get("model_type", "pixtral") != "pixtral":
            raise ConfigError(f"{source}: unsupported vision_config.model_type {v.get('model_type')!r}; expected "
                              "'pixtral'")
        rope = v.get("rope_parameters") or {}
        layer = d.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigError(f"{source}: field 'vision_feature_layer' = {layer!r}; expected one integer layer")
        # transformers' PixtralVisionConfig defaults where the file is silent (shipped files state every field)
        out: dict[str, Any] = {"rope_interleave": False, "vision_feature_layer": layer, "patch_size": 16,
                               "image_size": 1024, "hidden_act": "gelu"}
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "patch_size", "image_size", "hidden_act", "initializer_range"):
            if v.get(k) is not None:
                out[k] = v[k]
        theta = rope.get("rope_theta", v.get("rope_theta"))
        if theta is not None:
            out["rope_theta"] = float(theta)
        for k in ("spatial_merge_size", "projector_hidden_act", "multimodal_projector_bias"):
            if d.get(k) is not None:
                out[k] = d[k]
        image_token = d.get("image_token_id", d.get("image_token_index"))
        if image_token is not None:
            out["image_token_id"] = image_token
        out["projector_norm_eps"] = float(text.get("rms_norm_eps", 1e-6))
        return cls.from_dict(out, source=source)

    @classmethod
    def from_native_dict(cls, v: dict[str, Any], source: str) -> VisionConfig:
        """From the `vision_encoder` block of a native params.json (q/k rows in the interleaved RoPE layout)."""
        if not isinstance(v, dict):
            raise ConfigError(f"{source}: field 'vision_encoder' must be a mapping")
        if v.get("mm_projector_id", "patch_merge") not in ("patch_merge", ""):
            raise ConfigError(f"{source}: vision_encoder.mm_projector_id = {v.get('mm_projector_id')!r}; expected "
                              "'patch_merge'")
        if v.get("add_pre_mm_projector_layer_norm") is False:
            raise ConfigError(f"{source}: vision_encoder.add_pre_mm_projector_layer_norm = false is not supported "
                              "(Small 4 normalises the features before the patch merger)")
        out: dict[str, Any] = {"rope_interleave": True, "hidden_act": "silu", "projector_norm_eps": 1e-5}
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "patch_size", "spatial_merge_size", "image_token_id", "image_break_token_id", "image_end_token_id"):
            if k not in v:
                raise ConfigError(f"{source}: missing field 'vision_encoder.{k}'")
            out[k] = v[k]
        size = v.get("max_image_size", v.get("image_size"))
        if size is not None:
            out["image_size"] = size
        if v.get("rope_theta") is not None:
            out["rope_theta"] = float(v["rope_theta"])
        out["multimodal_projector_bias"] = bool(v.get("adapter_bias", False))
        return cls.from_dict(out, source=source)


@dataclasses.dataclass(frozen=True)
class Small4Config:
    """Hyper-parameters of the Mistral Small 4 text decoder. Defaults are the released 119B model."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 12288  # dense SwiGLU layers (the first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    # MLA expands the latent to every attention head through kv_b_proj, so this field does not change the math;
    # it is kept so that HF configs round-trip.
    num_key_value_heads: int = 32
    # Mixture of experts.
    n_routed_experts: int = 128
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    # Multi-head latent attention.
    q_lora_rank: int | None = 1024  # None: a plain q_proj
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    # transformers builds q_a_layernorm and kv_a_layernorm with its default eps (1e-6) whatever rms_norm_eps says.
    latent_norm_eps: float = 1e-6
    # Positions.
    max_position_embeddings: int = 1048576
    rope_type: str = "yarn"  # "yarn" or "default"
    rope_theta: float = 10000.0
    rope_factor: float | None = 128.0  # None: max_position_embeddings / original_max_position_embeddings
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = 1.0
    rope_attention_factor: float | None = None  # HF `attention_factor`: overrides the one derived from mscale
    rope_truncate: bool = True
    rope_interleave: bool = True
    llama_4_scaling_beta: float | None = 0.1  # None or 0: no Llama-4 query scaling
    llama_4_original_max_position_embeddings: int | None = None  # None: original_max_position_embeddings
    scale_convention: str = "hf"  # the format the config came from: "hf" or "native" (the RoPE magnitude; see above)
    # YaRN's mscale^2 folded into the softmax scale (native `yarn.apply_scale`, HF `rope_parameters.apply_scale`).
    yarn_apply_scale: bool = False
    # Embeddings and special ids.
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = 11
    # Image input (ARCHITECTURE.md §3): the vision encoder and projector; None for a text-only model.
    vision: VisionConfig | None = None
    # How the model runs (not part of the weights): kernels, expert parallelism, scan/remat, softmax-scale override.
    runtime: Runtime = Runtime()

    def __post_init__(self):
        if isinstance(self.runtime, dict):
            object.__setattr__(self, "runtime", Runtime.from_dict(self.runtime))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig.from_dict(self.vision))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ----------------------------------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        """Raise ConfigError naming the first inconsistent field."""

        def bad(field: str, expected: str):
            raise ConfigError(f"{source}: field '{field}' = {getattr(self, field)!r}; expected {expected}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "max_position_embeddings", "original_max_position_embeddings", "n_group", "topk_group"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, "a positive integer")
        if self.qk_nope_head_dim < 0:
            bad("qk_nope_head_dim", "a non-negative integer")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "an even number (RoPE rotates pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "a positive integer or null (plain q_proj)")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"at most n_routed_experts = {self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"a divisor of n_routed_experts = {self.n_routed_experts}")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            bad("n_group", "at most n_routed_experts / 2 (a group is scored by its top-2 experts)")
        if self.topk_group > self.n_group:
            bad("topk_group", f"at most n_group = {self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad("num_experts_per_tok", "at most the number of experts in the kept groups")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"between 0 and num_hidden_layers = {self.num_hidden_layers}")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            bad("intermediate_size", "a positive integer (there are dense layers)")
        if self.hidden_act not in _ACTIVATIONS:
            bad("hidden_act", f"one of {', '.join(_ACTIVATIONS)}")
        if self.rope_type not in ("yarn", "default"):
            bad("rope_type", "'yarn' or 'default'")
        if not isinstance(self.runtime, Runtime):
            raise ConfigError(f"{source}: field 'runtime' must be a mapping of runtime options")
        self.runtime.validate(f"{source}: runtime")
        if self.scale_convention not in ("hf", "native"):
            bad("scale_convention", "'hf' or 'native'")
        if self.rope_type == "yarn" and self.yarn_factor <= 0:
            bad("rope_factor", "a positive number")

    # ----------------------------------------------------------------------------------------------------------------
    # Derived values.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_factor(self) -> float:
        if self.rope_factor is None:
            return self.max_position_embeddings / self.original_max_position_embeddings
        return float(self.rope_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def llama_4_original(self) -> int:
        return self.llama_4_original_max_position_embeddings or self.original_max_position_embeddings

    @property
    def attn_softmax_scale(self) -> float:
        """The factor applied to q·k before the softmax (see the module docstring)."""
        override = self.runtime.softmax_scale
        if isinstance(override, (int, float)):
            return float(override)
        if override == "mscale2" or (override is None and self.yarn_apply_scale):
            return self.mscale2_softmax_scale
        return self.qk_head_dim**-0.5

    @property
    def mscale2_softmax_scale(self) -> float:
        """transformers' Mistral4 scale (`yarn_apply_mscale`): qk_head_dim**-0.5 times mscale(factor,
        mscale_all_dim)**2 for a YaRN config with a non-zero mscale_all_dim, else the plain one."""
        base = self.qk_head_dim**-0.5
        if self.rope_type == "default" or not self.mscale_all_dim:
            return base
        m = _yarn_mscale(self.yarn_factor, self.mscale_all_dim)
        return base * m * m

    def __getattr__(self, name: str):
        """The runtime options read where they used to be fields: `config.moe_impl` is `config.runtime.moe_impl`."""
        if name in _RUNTIME_FIELDS and "runtime" in self.__dict__:
            return getattr(self.__dict__["runtime"], name)
        raise AttributeError(f"'Small4Config' object has no attribute {name!r}")

    def with_runtime(self, runtime: Runtime | dict | None = None, **changes) -> Small4Config:
        """This architecture with `runtime` (a Runtime, or a mapping of options over the current ones) and/or the
        runtime fields in `changes` replaced."""
        rt = self.runtime
        if isinstance(runtime, Runtime):
            rt = runtime
        elif runtime is not None:
            rt = Runtime.from_dict(runtime, base=rt)
        if changes:
            rt = Runtime.from_dict(changes, base=rt)
        return dataclasses.replace(self, runtime=rt)

    def architecture(self) -> dict[str, Any]:
        """What the weights need, resolved: the fields a run and its checkpoint must agree on. Leaves out the runtime
        options and the FORMAT_FIELDS, and resolves spellings that mean the same thing (the Llama-4 original length
        left to default, a null rope_factor, the vision encoder's attn_impl)."""
        d = self.to_dict()
        d["llama_4_original_max_position_embeddings"] = self.llama_4_original
        d["rope_factor"] = self.yarn_factor if self.rope_type == "yarn" else None
        for f in FORMAT_FIELDS:
            if "." not in f:
                d.pop(f, None)
        if d.get("vision") is not None:
            for f in FORMAT_FIELDS:
                if f.startswith("vision."):
                    d["vision"].pop(f.removeprefix("vision."), None)
            d["vision"].pop("attn_impl", None)
        return d

    @property
    def rope_magnitude(self) -> float:
        """The factor cos/sin are multiplied by (YaRN's "attention factor"; 1 for the released model)."""
        if self.rope_type == "default" or self.scale_convention == "native":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        f = self.yarn_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(f, self.mscale) / _yarn_mscale(f, self.mscale_all_dim)
        return _yarn_mscale(f, 1.0)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies of the qk_rope_head_dim/2 rotation pairs, float32 (YaRN ramp as in transformers)."""
        dim = self.qk_rope_head_dim
        base = self.rope_theta
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
        inv_freq = (1.0 / pos_freqs).astype(np.float32)
        if self.rope_type == "default":
            return inv_freq
        factor = self.yarn_factor

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(self.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
                2 * math.log(base)
            )

        low, high = correction_dim(self.beta_fast or 32), correction_dim(self.beta_slow or 1)
        if self.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        extrapolation = 1 - ramp
        inv_interp = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
        return (inv_interp * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)

    # ----------------------------------------------------------------------------------------------------------------
    # Loaders.
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Small4Config:
        """Build from a flat dict of our field names; unknown keys are an error naming them. Runtime options may be
        given flat (the presets' old spelling) or as a `runtime` mapping."""
        d = dict(d)
        flat_runtime = {k: d.pop(k) for k in list(d) if k in _RUNTIME_FIELDS}
        if flat_runtime or isinstance(d.get("runtime"), dict) or "runtime" in d:
            nested = d.pop("runtime", None)
            base = nested if isinstance(nested, Runtime) else Runtime.from_dict(nested, f"{source}: runtime")
            d["runtime"] = Runtime.from_dict(flat_runtime, source, base=base)
        known = set(cls.field_names())
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        d = dict(d)
        if isinstance(d.get("vision"), dict):
            d["vision"] = VisionConfig.from_dict(d["vision"], source=source)
        for k, v in d.items():
            if (k == "vision" and (v is None or isinstance(v, VisionConfig))) or k == "runtime":
                continue
            check_type(k, v, types[k], source)
        try:
            cfg = cls(**d)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Small4Config:
        path = Path(path)
        d = read_yaml(path)
        if "model" in d and isinstance(d["model"], dict):  # allow a nested `model:` section
            d = d["model"]
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> Small4Config:
        path = Path(path)
        d = _read_json(path)
        return cls.from_hf_dict(d, source=str(path))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Small4Config:
        mt = d.get("model_type")
        vision = None
        if mt == "mistral3":
            text = d.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type 'mistral3' needs a 'text_config' mapping")
            if text.get("model_type", "mistral4") != "mistral4":
                raise ConfigError(
                    f"{source}: unsupported text_config.model_type {text.get('model_type')!r}; expected 'mistral4'"
                )
            vision = VisionConfig.from_hf_dict(d, text, source) if d.get("vision_config") is not None else None
            if d.get("tie_word_embeddings") is not None:  # transformers ties the head by the wrapper's flag
                text = dict(text, tie_word_embeddings=d["tie_word_embeddings"])
            d = text
        elif mt != "mistral4":
            raise ConfigError(
                f"{source}: unsupported model_type {mt!r}; expected 'mistral4', or 'mistral3' with a mistral4 text_config"
            )
        out: dict[str, Any] = {}
        # Fields with the same name in config.json; the RoPE ones live under rope_parameters and are read below.
        direct = set(cls.field_names()) - {"rope_type", "rope_factor", "rope_attention_factor", "rope_truncate",
                                           "llama_4_scaling_beta", "yarn_apply_scale", "scale_convention", "runtime",
                                           "vision"}
        _check_typos(d, direct | {"rope_parameters", "rope_scaling", "rope_theta"}, source)
        for k in direct:
            if k in d and d[k] is not None:
                out[k] = d[k]
        if "q_lora_rank" in d and d["q_lora_rank"] is None:
            out["q_lora_rank"] = None
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: 'rope_parameters' must be a mapping")
        _check_typos(rope, _ROPE_KEYS, f"{source}: rope_parameters")
        rope_type = rope.get("rope_type", rope.get("type", "default" if not rope else "yarn"))
        out["rope_type"] = rope_type
        if "rope_theta" in rope or "rope_theta" in d:
            out["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta")))
        if rope_type == "yarn":
            out["rope_factor"] = rope.get("factor")
            for ours, theirs in (("original_max_position_embeddings", "original_max_position_embeddings"),
                                 ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
                if rope.get(theirs) is not None:
                    out[ours] = rope[theirs]
            out["mscale"] = rope.get("mscale")
            out["mscale_all_dim"] = rope.get("mscale_all_dim")
            out["rope_attention_factor"] = rope.get("attention_factor")
            out["rope_truncate"] = bool(rope.get("truncate", True))
            apply = rope.get("apply_scale", False)
            if not isinstance(apply, bool):
                raise ConfigError(f"{source}: rope_parameters.apply_scale = {apply!r}; expected true or false")
            out["yarn_apply_scale"] = apply
        elif "original_max_position_embeddings" in rope:
            out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        out["llama_4_scaling_beta"] = rope.get("llama_4_scaling_beta")
        if rope_type != "yarn":
            out.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
        out["scale_convention"] = "hf"
        eos = out.get("eos_token_id")
        if isinstance(eos, list):
            out["eos_token_id"] = tuple(eos)
        for k in ("rope_theta", "beta_fast", "beta_slow", "routed_scaling_factor", "rms_norm_eps"):
            if isinstance(out.get(k), int) and not isinstance(out.get(k), bool):
                out[k] = float(out[k])
        out["vision"] = vision
        return cls.from_dict(out, source=source)

    @classmethod
    def from_native_json(cls, path: str | os.PathLike) -> Small4Config:
        path = Path(path)
        return cls.from_native_dict(_read_json(path), source=str(path))

    @classmethod
    def from_native_dict(cls, p: dict[str, Any], source: str = "params.json") -> Small4Config:
        def need(key: str, block: dict | None = None, where: str = ""):
            b = p if block is None else block
            if key not in b:
                raise ConfigError(f"{source}: missing field '{where}{key}'")
            return b[key]

        out: dict[str, Any] = dict(
            hidden_size=need("dim"),
            num_hidden_layers=need("n_layers"),
            num_attention_heads=need("n_heads"),
            num_key_value_heads=p.get("n_kv_heads", p["n_heads"]),
            rms_norm_eps=float(p.get("norm_eps", 1e-6)),
            vocab_size=need("vocab_size"),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            q_lora_rank=p.get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            tie_word_embeddings=bool(p.get("tied_embeddings", False)),
            scale_convention="native",
            rope_interleave=True,
        )
        if p.get("q_lora_rank") in (0, None):
            out["q_lora_rank"] = None
        if "hidden_dim" in p:
            out["intermediate_size"] = p["hidden_dim"]
        mpe = p.get("max_position_embeddings", p.get("max_seq_len"))
        moe = p.get("moe")
        if not isinstance(moe, dict):
            raise ConfigError(f"{source}: missing 'moe' block (Mistral Small 4 is a mixture of experts)")
        out.update(
            n_routed_experts=need("num_experts", moe, "moe."),
            num_experts_per_tok=need("num_experts_per_tok", moe, "moe."),
            moe_intermediate_size=need("expert_hidden_dim", moe, "moe."),
            first_k_dense_replace=moe.get("first_k_dense_replace", 0),
            n_shared_experts=moe.get("num_shared_experts", 0),
            routed_scaling_factor=float(moe.get("routed_scale", 1.0)),
            n_group=moe.get("num_expert_groups", 1) or 1,
            topk_group=moe.get("num_expert_groups_per_tok", 1) or 1,
            norm_topk_prob=moe.get("renorm_strategy", "WEIGHTS") == "WEIGHTS",
        )
        yarn = p.get("yarn")
        if isinstance(yarn, dict):
            factor = float(need("factor", yarn, "yarn."))
            orig = need("original_max_position_embeddings", yarn, "yarn.")
            out.update(
                rope_type="yarn",
                rope_factor=factor,
                original_max_position_embeddings=orig,
                beta_fast=float(yarn.get("beta", 32.0)),
                beta_slow=float(yarn.get("alpha", 1.0)),
                yarn_apply_scale=bool(yarn.get("apply_scale", False)),
            )
            if mpe is None:
                mpe = int(orig * factor)
        else:
            out["rope_type"] = "default"
        if mpe is not None:
            out["max_position_embeddings"] = int(mpe)
        if out["rope_type"] == "default":
            out["original_max_position_embeddings"] = out.get("max_position_embeddings", 8192)
        l4 = p.get("llama_4_scaling")
        if isinstance(l4, dict):
            out["llama_4_scaling_beta"] = float(l4.get("beta", 0.0))
            if "original_max_position_embeddings" in l4:
                out["llama_4_original_max_position_embeddings"] = l4["original_max_position_embeddings"]
        else:
            out["llama_4_scaling_beta"] = None
        if p.get("vision_encoder") is not None:
            out["vision"] = VisionConfig.from_native_dict(p["vision_encoder"], source)
        return cls.from_dict(out, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The architecture fields (what a checkpoint stores; `runtime` is left out: `runtime.to_dict()`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "runtime"}
        d = json.loads(json.dumps({k: dataclasses.asdict(v) if isinstance(v, VisionConfig) else v
                                   for k, v in d.items()}))
        return d

    def replace(self, **changes) -> Small4Config:
        """A copy with fields replaced; runtime options (`moe_impl=...`, `runtime=...`) go to `runtime`."""
        rt = {k: changes.pop(k) for k in list(changes) if k in _RUNTIME_FIELDS}
        out = dataclasses.replace(self, **changes) if changes else self
        return out.with_runtime(**rt) if rt else out


def load_config(path: str | os.PathLike, runtime: Runtime | dict | None = None) -> Small4Config:
    """A config from a YAML preset, an HF `config.json`, a native `params.json`, or a directory holding either;
    `runtime` (a Runtime or a mapping of its options) replaces the runtime options."""
    config = _load_config(Path(path))
    return config if runtime is None else config.with_runtime(runtime)


def _load_config(path: Path) -> Small4Config:
    if path.is_dir():
        if (path / "config.json").is_file():
            return Small4Config.from_hf_json(path / "config.json")
        if (path / "params.json").is_file():
            return Small4Config.from_native_json(path / "params.json")
        raise ConfigError(f"{path}: no config.json (Hugging Face) or params.json (Mistral native) in this directory")
    if path.suffix in (".yaml", ".yml"):
        return Small4Config.from_yaml(path)
    if path.name == "params.json":
        return Small4Config.from_native_json(path)
    if path.suffix == ".json":
        return Small4Config.from_hf_json(path)
    raise ConfigError(f"{path}: expected a .yaml preset, a config.json, a params.json, or a checkpoint directory")


# --------------------------------------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); ConfigError naming the file otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(d).__name__}")
    return d


def _yarn_mscale(scale: float, mscale: float) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "apply_scale", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "attention_factor", "truncate", "llama_4_scaling_beta"}


def _check_typos(d: dict[str, Any], read: set[str], source: str) -> None:
    """A config.json holds many keys we do not read (transformers' own), so unknown keys are fine, except one that
    looks like a misspelling of a key we read and which is missing: that key would silently take the 119B default
    and surface later as a page of shape errors that never name it."""
    import difflib

    for key in sorted(set(d) - read):
        close = [k for k in difflib.get_close_matches(key, sorted(read), n=3, cutoff=0.85) if k not in d]
        if close:
            raise ConfigError(f"{source}: unknown key '{key}'; did you mean '{close[0]}'? (without it "
                              f"'{close[0]}' takes its default)")


def check_type(key: str, value: Any, annotation: str, source: str) -> None:
    """Light type check of one field against its annotation string (the module uses postponed annotations)."""
    ann = str(annotation)
    allowed: list[type] = []
    if "int" in ann:
        allowed.append(int)
    if "float" in ann:
        allowed += [float, int]
    if "bool" in ann:
        allowed.append(bool)
    if "str" in ann:
        allowed.append(str)
    if "tuple" in ann:
        allowed += [tuple, list]
    if "dict" in ann:
        allowed.append(dict)
    if value is None:
        if "None" in ann:
            return
        raise ConfigError(f"{source}: field '{key}' must not be null (expected {ann})")
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{source}: field '{key}' = {value!r}; expected {ann}")
    if not isinstance(value, tuple(allowed)):
        raise ConfigError(f"{source}: field '{key}' = {value!r}; expected {ann}")
