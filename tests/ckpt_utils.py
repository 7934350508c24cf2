"""Test helpers that build tiny Mistral Small 4 models with transformers and WRITE them as checkpoints.

Layouts written (see ARCHITECTURE.md §4):
* `save_hf`: plain `save_pretrained` of a `Mistral4ForCausalLM` (keys `model.*`, `lm_head.weight`; fused experts).
* `save_hf_layout` / `save_hf_fp8`: HF layout written by hand, optionally FP8 (per-tensor `weight_scale_inv`, per-expert
  `[E, 1, 1]` expert scales, dummy activation scales), under any of the three key prefixes, with fake vision tensors and
  a `mistral3` `config.json` for the multimodal prefixes.
* `save_native`: Mistral-native `params.json` + `consolidated*.safetensors` with per-expert `w1/w2/w3`.

The FP8 writers return the dequantised float32 state dict (HF `Mistral4ForCausalLM` keys) so a test can load it into
transformers for reference values. Nothing here reads checkpoints; that is `small4_jax.ckpt.safetensors_io`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Mistral4Config, Mistral4ForCausalLM

FP8_MAX = 448.0  # largest finite float8_e4m3fn value

# HF module name (after `model.`) -> native name, for everything except the fused experts.
_HF_TO_NATIVE = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.q_a_proj": "attention.wq_a",
    "self_attn.q_a_layernorm": "attention.q_a_norm",
    "self_attn.q_b_proj": "attention.wq_b",
    "self_attn.kv_a_proj_with_mqa": "attention.wkv_a_with_mqa",
    "self_attn.kv_a_layernorm": "attention.kv_a_norm",
    "self_attn.kv_b_proj": "attention.wkv_b",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate": "gate",
    "mlp.shared_experts.gate_proj": "shared_experts.w1",
    "mlp.shared_experts.down_proj": "shared_experts.w2",
    "mlp.shared_experts.up_proj": "shared_experts.w3",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
# HF layouts: (text prefix, lm_head key, vision prefix or None). The last two are multimodal (Mistral3) checkpoints.
HF_PREFIXES = {
    "model.": ("model.", "lm_head.weight", None),
    "model.language_model.": ("model.language_model.", "lm_head.weight", "model."),
    "language_model.model.": ("language_model.model.", "language_model.lm_head.weight", ""),
}
# A complete toy vision tower + projector (the `vision_config` `_write_hf_config` writes: hidden 8, one layer, one
# head, patch 2): random tensors, read by a model with a vision block and skipped by text-only readers.
def fake_vision_tensors(text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Name after the vision prefix -> shape."""
    layer = "vision_tower.transformer.layers.0."
    return {
        "vision_tower.patch_conv.weight": (8, 3, 2, 2),
        "vision_tower.ln_pre.weight": (8,),
        **{layer + n: (8,) for n in ("attention_norm.weight", "ffn_norm.weight")},
        **{layer + f"attention.{p}_proj.weight": (8, 8) for p in "qkvo"},
        layer + "feed_forward.gate_proj.weight": (16, 8),
        layer + "feed_forward.up_proj.weight": (16, 8),
        layer + "feed_forward.down_proj.weight": (8, 16),
        "multi_modal_projector.norm.weight": (8,),
        "multi_modal_projector.patch_merger.merging_layer.weight": (8, 32),
        "multi_modal_projector.linear_1.weight": (text_hidden, 8),
        "multi_modal_projector.linear_2.weight": (text_hidden, text_hidden),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Models.


def tiny_hf_config(**overrides) -> Mistral4Config:
    """A tiny Mistral4Config: 3 layers (layer 0 dense, layers 1-2 MoE), 8 experts top-2, q-LoRA, YaRN factor 4.

    Any field can be overridden; `rope_parameters` is rebuilt from the final head dims unless given.
    """
    kw = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    kw.update(overrides)
    if "rope_parameters" not in overrides:
        kw["rope_parameters"] = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "max_position_embeddings": kw["max_position_embeddings"],
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
            "partial_rotary_factor": kw["qk_rope_head_dim"] / (kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]),
        }
    return Mistral4Config(**kw)


def pin_hf_softmax_scale(model, scale: float | None = None):
    """Set every Mistral4 attention's softmax scale of a transformers model (Mistral4 or Mistral3) to `scale`, by
    default the plain 1/sqrt(qk_head_dim) our configs default to (ARCHITECTURE.md §6.1). transformers folds YaRN's
    mscale^2 in since PR #47435 and may change again: parity tests set both sides explicitly. Returns the model."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "Mistral4Attention":
            module.scaling = module.qk_head_dim**-0.5 if scale is None else float(scale)
            n += 1
    assert n, "no Mistral4Attention module in the model"
    return model


@torch.no_grad()
def make_hf_model(config: Mistral4Config, seed: int = 0, softmax_scale: float | None = None) -> Mistral4ForCausalLM:
    """A float32 `Mistral4ForCausalLM` with every weight redrawn from a seeded generator, its softmax scale pinned
    (`pin_hf_softmax_scale`: the plain 1/sqrt(qk_head_dim) unless `softmax_scale`).

    Linears and experts: normal std 0.08; embeddings std 0.5; norm weights 1 + 0.1 * normal (non-unit); routers
    std 0.3 so router logits have std ~2 and top-k choices are not near-ties.
    """
    gen = torch.Generator().manual_seed(seed)
    model = Mistral4ForCausalLM(config).float().eval()
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith(("norm.weight", "layernorm.weight")):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("mlp.gate.weight"):
            p.copy_(0.3 * noise)
        elif name.endswith("embed_tokens.weight"):
            p.copy_(0.5 * noise)
        else:
            p.copy_(0.08 * noise)
    return pin_hf_softmax_scale(model, softmax_scale)


def hf_state_dict(model: Mistral4ForCausalLM) -> dict[str, torch.Tensor]:
    """`model.state_dict()` as contiguous CPU tensors (keys `model.*` and `lm_head.weight`)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def canonical(hf_key: str) -> str:
    """HF `Mistral4ForCausalLM` key -> canonical reader name (drops the leading `model.`)."""
    return hf_key.removeprefix("model.")


# ----------------------------------------------------------------------------------------------------------------------
# FP8 quantisation.


def quantize_fp8(w: torch.Tensor, per_expert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (or per-expert, over axis 0) float8_e4m3fn quantisation with scale = amax / 448.

    Returns (w_fp8, scale) with scale of shape [] or [E, 1, 1]; dequantise as `w_fp8.float() * scale`.
    """
    w = w.float()
    amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True) if per_expert else w.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _is_quantised(hf_key: str) -> bool:
    """The FP8 checkpoints quantise every linear and expert tensor except embeddings, lm_head, norms and routers."""
    return not hf_key.endswith(("embed_tokens.weight", "lm_head.weight", "norm.weight", "mlp.gate.weight"))


# ----------------------------------------------------------------------------------------------------------------------
# Writers.


def _write_shards(out_dir: Path, tensors: dict[str, torch.Tensor], stem: str, num_shards: int) -> None:
    """Write `tensors` as `{stem}.safetensors`, or as `num_shards` files plus `{stem}.safetensors.index.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}  # no shared storage (tied weights)
    if num_shards == 1:
        save_file(tensors, str(out_dir / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    keys = list(tensors)
    per = math.ceil(len(keys) / num_shards)
    weight_map = {}
    for i in range(num_shards):
        name = f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
        save_file(chunk, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_hf(model: Mistral4ForCausalLM, out_dir: str | os.PathLike, max_shard_size: str | int | None = None) -> Path:
    """`model.save_pretrained(out_dir)`: safetensors (the only format in transformers v5, which has no
    `safe_serialization` argument). `max_shard_size="20KB"` gives many `model-0000k-of-0000N` shards plus an index."""
    out_dir = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out_dir), **kwargs)
    return out_dir


def save_hf_layout(
    model: Mistral4ForCausalLM,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "model.",
    fp8: bool = False,
    per_expert: bool = True,
    num_shards: int = 1,
) -> dict[str, torch.Tensor]:
    """Write the HF layout by hand; return the (dequantised) float32 state dict with `Mistral4ForCausalLM` keys.

    prefix: one of `HF_PREFIXES`. For the two multimodal prefixes, fake vision/projector tensors are added and
      `config.json` is a `mistral3` wrapper with the text config under `text_config`.
    fp8: quantise per `_is_quantised` to float8_e4m3fn. Linears get a `[]` `weight_scale_inv` and a dummy
      `activation_scale`; experts get `[E, 1, 1]` `*_scale_inv` (or one `[1]` scale when `per_expert=False`) and
      dummy `[E]` `*_activation_scale`.
    """
    out_dir = Path(out_dir)
    text_prefix, lm_head_key, vision_prefix = HF_PREFIXES[prefix]
    on_disk: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for key, w in hf_state_dict(model).items():
        disk_key = lm_head_key if key == "lm_head.weight" else text_prefix + canonical(key)
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            reference[key] = reference["model.embed_tokens.weight"]  # tied: not stored, as save_pretrained does
            continue
        if not (fp8 and _is_quantised(key)):
            on_disk[disk_key] = reference[key] = w.float()
            continue
        is_experts = key.endswith(("experts.gate_up_proj", "experts.down_proj"))
        q, scale = quantize_fp8(w, per_expert=is_experts and per_expert)
        reference[key] = q.float() * scale
        on_disk[disk_key] = q
        if is_experts:
            on_disk[disk_key + "_scale_inv"] = scale if per_expert else scale.reshape(1)
            on_disk[disk_key + "_activation_scale"] = torch.full((w.shape[0],), 0.05)
        else:
            on_disk[disk_key + "_scale_inv"] = scale.reshape(())
            on_disk[disk_key.removesuffix("weight") + "activation_scale"] = torch.tensor(0.05)
    if vision_prefix is not None:
        gen = torch.Generator().manual_seed(1234)
        for name, shape in fake_vision_tensors(model.config.hidden_size).items():
            on_disk[vision_prefix + name] = torch.randn(shape, generator=gen)
    _write_shards(out_dir, on_disk, "model", num_shards)
    _write_hf_config(model.config, out_dir, multimodal=vision_prefix is not None, fp8=fp8)
    return reference


def save_hf_fp8(
    model: Mistral4ForCausalLM,
    out_dir: str | os.PathLike,
    per_expert: bool = True,
    prefix: str = "model.",
    num_shards: int = 1,
) -> dict[str, torch.Tensor]:
    """FP8 HF checkpoint (see `save_hf_layout`); returns the dequantised float32 reference state dict."""
    return save_hf_layout(model, out_dir, prefix=prefix, fp8=True, per_expert=per_expert, num_shards=num_shards)


def _write_hf_config(config: Mistral4Config, out_dir: Path, multimodal: bool, fp8: bool) -> None:
    text = config.to_dict()
    text["architectures"] = ["Mistral4ForCausalLM"]
    quant = {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "weight_block_size": None,
        "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    }
    if not multimodal:
        cfg = dict(text, **({"quantization_config": quant} if fp8 else {}))
    else:
        cfg = {
            "architectures": ["Mistral3ForConditionalGeneration"],
            "model_type": "mistral3",
            "text_config": text,
            "vision_config": {"model_type": "pixtral", "hidden_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 1, "intermediate_size": 16, "patch_size": 2, "image_size": 16},
            "image_token_id": 10,
            "spatial_merge_size": 2,
            "vision_feature_layer": -1,
            "multimodal_projector_bias": False,
            "projector_hidden_act": "gelu",
        }
        if fp8:
            cfg["quantization_config"] = quant
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def native_params(config: Mistral4Config, fp8: bool = False) -> dict:
    """Mistral-native `params.json` content for `config` (`q_lora_rank` omitted when None)."""
    rope = config.rope_parameters
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "hidden_dim": config.intermediate_size,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": rope["rope_theta"],
        "max_position_embeddings": config.max_position_embeddings,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "tied_embeddings": config.tie_word_embeddings,
        "moe": {
            "num_experts": config.n_routed_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "expert_hidden_dim": config.moe_intermediate_size,
            "first_k_dense_replace": config.first_k_dense_replace,
            "num_shared_experts": config.n_shared_experts,
            "routed_scale": config.routed_scaling_factor,
            "num_expert_groups": config.n_group,
            "num_expert_groups_per_tok": config.topk_group,
        },
        "yarn": {
            "factor": rope["factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope["beta_fast"],
            "alpha": rope["beta_slow"],
            "apply_scale": False,
        },
        "llama_4_scaling": {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope["llama_4_scaling_beta"],
        },
    }
    if config.q_lora_rank is not None:
        params["q_lora_rank"] = config.q_lora_rank
    if fp8:
        params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    return params


def _native_key(hf_key: str) -> str:
    """HF key (not fused experts) -> native key."""
    special = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}
    if hf_key in special:
        return special[hf_key]
    layer, rest = canonical(hf_key).removeprefix("layers.").split(".", 1)
    module = rest.removesuffix(".weight")
    return f"layers.{layer}.{_HF_TO_NATIVE[module]}.weight"


def save_native(
    model: Mistral4ForCausalLM, out_dir: str | os.PathLike, num_shards: int = 1, fp8: bool = False
) -> dict[str, torch.Tensor]:
    """Write `params.json` + `consolidated*.safetensors` with native names; return the (dequantised) float32 state dict.

    Fused HF experts are split into per-expert `layers.i.experts.e.w1/w2/w3.weight`. With `fp8`, every tensor that
    `_is_quantised` is float8_e4m3fn with its own `[]` `qscale_weight` (per expert for expert tensors) and a dummy
    `qscale_act`. `num_shards > 1` writes `consolidated-0000k-of-0000N.safetensors` and
    `consolidated.safetensors.index.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_disk: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}

    def put(native_key: str, w: torch.Tensor, quantise: bool) -> torch.Tensor:
        if not quantise:
            on_disk[native_key] = w
            return w
        q, scale = quantize_fp8(w)
        base = native_key.removesuffix(".weight")
        on_disk[native_key], on_disk[base + ".qscale_weight"] = q, scale.reshape(())
        on_disk[base + ".qscale_act"] = torch.tensor(0.05)
        return q.float() * scale

    for key, w in hf_state_dict(model).items():
        quantise = fp8 and _is_quantised(key)
        if key.endswith("experts.gate_up_proj"):
            layer = canonical(key).split(".")[1]
            f_dim = w.shape[1] // 2
            gate_up = [
                torch.cat([put(f"layers.{layer}.experts.{e}.w1.weight", w[e, :f_dim].clone(), quantise),
                           put(f"layers.{layer}.experts.{e}.w3.weight", w[e, f_dim:].clone(), quantise)])
                for e in range(w.shape[0])
            ]
            reference[key] = torch.stack(gate_up)
        elif key.endswith("experts.down_proj"):
            layer = canonical(key).split(".")[1]
            reference[key] = torch.stack(
                [put(f"layers.{layer}.experts.{e}.w2.weight", w[e].clone(), quantise) for e in range(w.shape[0])]
            )
        elif key == "lm_head.weight" and model.config.tie_word_embeddings:
            reference[key] = reference["model.embed_tokens.weight"]  # tied: no output.weight
        else:
            reference[key] = put(_native_key(key), w.float(), quantise)
    _write_shards(out_dir, on_disk, "consolidated", num_shards)
    (out_dir / "params.json").write_text(json.dumps(native_params(model.config, fp8), indent=2))
    return reference


def save_native_mistral3(hf, out_dir, image_break_token_id: int = 12, image_end_token_id: int = 13) -> None:
    """A transformers Mistral3ForConditionalGeneration's weights as a Mistral-native checkpoint: text through
    `save_native`, vision renamed and the encoder's q/k rows permuted from rotate-half (HF) back to interleaved
    pairs, and a `vision_encoder` block in params.json."""
    out_dir = Path(out_dir)
    text = Mistral4ForCausalLM(hf.config.text_config).float().eval()
    state = {k: v for k, v in hf.state_dict().items()}
    text.model.load_state_dict({k.removeprefix("model.language_model."): v for k, v in state.items()
                                if k.startswith("model.language_model.")})
    text.lm_head.weight.data.copy_(state["lm_head.weight"])
    save_native(text, out_dir)
    vc = hf.config.vision_config
    nh, hd = vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads
    names = {"attention.q_proj": "attention.wq", "attention.k_proj": "attention.wk", "attention.v_proj": "attention.wv",
             "attention.o_proj": "attention.wo", "feed_forward.gate_proj": "feed_forward.w1",
             "feed_forward.down_proj": "feed_forward.w2", "feed_forward.up_proj": "feed_forward.w3",
             "attention_norm": "attention_norm", "ffn_norm": "ffn_norm"}
    native = {}
    for k, v in state.items():
        if k.startswith("model.vision_tower.transformer.layers."):
            layer, rest = k.removeprefix("model.vision_tower.transformer.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            if module in ("attention.q_proj", "attention.k_proj"):  # (head, half, i) -> (head, i, half)
                v = v.view(nh, 2, hd // 2, -1).transpose(1, 2).reshape(nh * hd, -1)
            native[f"vision_encoder.transformer.layers.{layer}.{names[module]}.weight"] = v
        elif k.startswith("model.vision_tower."):
            native["vision_encoder." + k.removeprefix("model.vision_tower.")] = v
    proj = "model.multi_modal_projector."
    native["pre_mm_projector_norm.weight"] = state[proj + "norm.weight"]
    native["patch_merger.merging_layer.weight"] = state[proj + "patch_merger.merging_layer.weight"]
    native["vision_language_adapter.w_in.weight"] = state[proj + "linear_1.weight"]
    native["vision_language_adapter.w_out.weight"] = state[proj + "linear_2.weight"]
    save_file({k: v.contiguous() for k, v in native.items()}, str(out_dir / "consolidated-vision.safetensors"))
    params = json.loads((out_dir / "params.json").read_text())
    params["vision_encoder"] = {
        "hidden_size": vc.hidden_size, "num_channels": 3, "max_image_size": vc.image_size, "image_size": vc.image_size,
        "patch_size": vc.patch_size, "rope_theta": 10000.0, "intermediate_size": vc.intermediate_size,
        "num_hidden_layers": vc.num_hidden_layers, "num_attention_heads": vc.num_attention_heads,
        "image_token_id": hf.config.image_token_id, "image_break_token_id": image_break_token_id,
        "image_end_token_id": image_end_token_id, "spatial_merge_size": hf.config.spatial_merge_size,
        "mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": True, "adapter_bias": False,
    }
    (out_dir / "params.json").write_text(json.dumps(params))


def truncate_file(path: str | os.PathLike, nbytes: int) -> None:
    """Cut `path` to its first `nbytes` bytes (a negative `nbytes` drops that many bytes from the end)."""
    size = os.path.getsize(path)
    os.truncate(path, nbytes if nbytes >= 0 else size + nbytes)


def unstack_orbax(src, out, groups: list[tuple[int, int]]) -> Path:
    """An Orbax checkpoint directory in the layout of before the decoder layers were stacked: every array
    `….layer_stacks.G.REST` [n, ...] written as n arrays `….layers.N.REST` (N = the stack's first layer + row), FP8
    scales of a stacked tensor as () / [E, 1, 1]; Orbax's metadata entries keep their key types. `groups`:
    `layer_groups(config)`. What an old conversion or LoRA run left on disk, for the migration tests."""
    import numpy as np
    import tensorstore as ts

    from small4_jax.ckpt import sharded

    import base64

    src, out = Path(src).resolve(), Path(out)
    meta = json.loads((src / "_METADATA").read_text())
    writer, tree = sharded.Writer(out), {}
    b64 = lambda key: base64.b64encode(".".join(key).encode()).decode()  # noqa: E731  (Orbax's `_sharding` keys)
    old_sharding = json.loads((src / "_sharding").read_text()) if (src / "_sharding").is_file() else None
    sharding = {}
    for e in meta["tree_metadata"].values():
        key = tuple(k["key"] for k in e["key_metadata"])
        if e["value_metadata"].get("skip_deserialize"):  # no array behind it (an empty optimizer state, ...)
            tree[str(key)] = e
            continue
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{src}", "path": ".".join(key)}}
        arr = np.asarray(ts.open(spec).result().read().result())
        if "layer_stacks" not in key:
            writer.write(key, arr)
            tree[str(key)] = e
            if old_sharding is not None and b64(key) in old_sharding:
                sharding[b64(key)] = old_sharding[b64(key)]
            continue
        at = key.index("layer_stacks")
        start = groups[int(key[at + 1])][0]
        for j in range(arr.shape[0]):
            row = arr[j]
            if key[0] == "fp8_scales":
                row = row.reshape(row.shape[:-2] + (1, 1) if key[-2] == "experts" else ())
            old = key[:at] + ("layers", str(start + j)) + key[at + 2:]
            writer.write(old, row)
            entry = json.loads(json.dumps(e))
            entry["key_metadata"] = [dict(m, key=k) for m, k in zip(entry["key_metadata"], old)]
            entry["value_metadata"]["write_shape"] = list(row.shape)
            tree[str(old)] = entry
            if old_sharding is not None and b64(key) in old_sharding:
                sharding[b64(old)] = old_sharding[b64(key)]
    (out / "_METADATA").write_text(json.dumps(dict(meta, tree_metadata=tree)))
    if old_sharding is not None:
        (out / "_sharding").write_text(json.dumps(sharding))
    for name in (sharded.CONFIG_FILE, sharded.FORMAT_FILE):
        if (src / name).is_file():
            (out / name).write_bytes((src / name).read_bytes())
    return out
