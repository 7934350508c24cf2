"""Export a fine-tuned run: an HF PEFT adapter and/or a merged HF safetensors checkpoint.

    python -m train.export --run runs/finetune-tiny --peft OUT_ADAPTER          # adapter_config.json + safetensors
    python -m train.export --run runs/finetune-tiny --merged OUT_CHECKPOINT     # config.json + model.safetensors

The adapter uses PEFT's layout for transformers' Mistral4 (`small4_jax.lora.adapters.to_peft`): dense adapters through
`target_modules`, routed experts through `target_parameters` on the fused 3-D `experts.gate_up_proj` /
`experts.down_proj`; load it with `PeftModel.from_pretrained(model, OUT_ADAPTER)` or `infer.generate --lora`.
The merged checkpoint holds W + (alpha/r) A B for every adapted weight, in HF names and layout, with the source
checkpoint's config.json (or one written from the model config for random-weight presets) and tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from small4_jax.ckpt.safetensors_io import save_safetensors
from small4_jax.config import Small4Config
from small4_jax.console import cli_main, on_interrupt
from small4_jax.errors import ConfigError, Small4Error


def hf_config_dict(c: Small4Config, dtype: str = "float32") -> dict:
    """A transformers `Mistral4Config` dict for `c`, spelled as Mistral's converter writes the release (the rope
    block's mscale fields; `apply_scale: true` only when `c.yarn_apply_scale`). Runtime options are not written."""
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type == "yarn":
        rope.update(factor=c.rope_factor, original_max_position_embeddings=c.original_max_position_embeddings,
                    beta_fast=c.beta_fast, beta_slow=c.beta_slow, mscale=c.mscale, mscale_all_dim=c.mscale_all_dim,
                    truncate=c.rope_truncate)
        if c.rope_attention_factor is not None:
            rope["attention_factor"] = c.rope_attention_factor
        if c.yarn_apply_scale:
            rope["apply_scale"] = True
    if c.llama_4_scaling_beta is not None:
        rope["llama_4_scaling_beta"] = c.llama_4_scaling_beta
    if c.llama_4_original_max_position_embeddings not in (None, c.original_max_position_embeddings):
        raise ConfigError("llama_4_original_max_position_embeddings has no config.json field")
    rope["partial_rotary_factor"] = c.qk_rope_head_dim / c.qk_head_dim
    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
            "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
            "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
            "norm_topk_prob", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_interleave",
            "attention_bias", "attention_dropout")
    d = {"architectures": ["Mistral4ForCausalLM"], "model_type": "mistral4", "dtype": dtype}
    d.update({k: getattr(c, k) for k in keys})
    if isinstance(d["eos_token_id"], tuple):
        d["eos_token_id"] = list(d["eos_token_id"])
    d["rope_parameters"] = rope
    return d


def hf_multimodal_config_dict(c: Small4Config, dtype: str = "float32") -> dict:
    """A transformers `Mistral3Config` dict (mistral4 text + pixtral vision) for a config with a vision block."""
    v = c.vision
    if v.rope_interleave:
        raise ConfigError("this vision encoder's q/k rows are in the native interleaved RoPE layout; a config.json "
                          "(HF rotate-half layout) can only be written for HF-layout encoders")
    vision = {"model_type": "pixtral", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
              "num_channels": v.num_channels, "patch_size": v.patch_size, "image_size": v.image_size,
              "hidden_act": v.hidden_act, "head_dim": v.head_dim,
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    return {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "dtype": dtype,
            "text_config": hf_config_dict(c, dtype), "vision_config": vision, "image_token_index": v.image_token_id,
            "spatial_merge_size": v.spatial_merge_size, "projector_hidden_act": v.projector_hidden_act,
            "multimodal_projector_bias": v.multimodal_projector_bias,
            "vision_feature_layer": v.vision_feature_layer, "tie_word_embeddings": c.tie_word_embeddings}


def save_merged(model, out_dir: str | Path, *, source: str | Path | None = None, dtype: str = "float32",
                max_shard_bytes: int = 5 << 30, tokenizer: str | Path | None = None) -> Path:
    """Write the merged weights of `model` (adapters attached) as an HF checkpoint directory.

    The tokenizer files come from `source`; `tokenizer` (the file the run trained with) is copied when `source`
    has none, so the export always generates text (`infer.generate --checkpoint OUT`)."""
    from flax import nnx

    from small4_jax.lora import adapters as lora
    from small4_jax.ckpt.plan import checkpoint_plan, is_stacked, plan_names
    from small4_jax.nn.model import abstract_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    merged = lora.merged_params(model)
    plan = checkpoint_plan(nnx.state(abstract_model(model.config, dtype="float32"), nnx.Param))
    tensors = {}
    for path, entry in plan.items():
        hf_shape = entry[1]
        whole = merged[tuple(str(p) for p in path)]
        layers = list(whole) if is_stacked(path) else [whole]  # a layer stack: slice j is layer start + j
        for name, w in zip(plan_names(entry), layers):
            if w.ndim == 3:
                w = w.transpose(0, 2, 1)
            elif w.ndim == 2 and not name.endswith("embed_tokens.weight"):
                w = w.T
            assert tuple(w.shape) == tuple(hf_shape), (name, w.shape, hf_shape)
            key = name if name == "lm_head.weight" else "model." + name
            if model.config.vision is not None and not name.startswith(("vision_tower.", "multi_modal_projector.",
                                                                        "lm_head.")):
                key = "model.language_model." + name  # transformers' Mistral3ForConditionalGeneration layout
            tensors[key] = np.ascontiguousarray(w.astype(np_dtype))
    _write_shards(out, tensors, max_shard_bytes)
    src = Path(source) if source else None
    if src is not None and (src / "config.json").is_file():
        shutil.copy(src / "config.json", out / "config.json")
    else:
        write = hf_config_dict if model.config.vision is None else hf_multimodal_config_dict
        (out / "config.json").write_text(json.dumps(write(model.config, dtype), indent=2) + "\n")
    if src is not None:
        for pattern in ("tekken.json", "tokenizer.model*", "tokenizer.json", "tokenizer_config.json",
                        "generation_config.json", "special_tokens_map.json"):
            for f in src.glob(pattern):
                shutil.copy(f, out / f.name)
    tok = Path(tokenizer) if tokenizer else None
    if tok is not None and tok.is_file() and not any(out.glob("tekken.json")) and not any(out.glob("tokenizer.model*")):
        shutil.copy(tok, out / ("tekken.json" if tok.suffix == ".json" else "tokenizer.model"))
    return out


def _write_shards(out: Path, tensors: dict[str, np.ndarray], max_bytes: int) -> None:
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        if cur and size + v.nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_safetensors(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_run(run_dir: str | Path, step: int | None = None):
    """(model with the run's adapters restored, run config, step) from a training output directory."""
    from train import config as run_config
    from train.trainer import build_model, restore_lora

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a training run directory (config.yaml missing)")
    cfg = run_config.load(run / "config.yaml")
    from train.trainer import check_step

    step = check_step(run, step)  # before the model is built
    model = build_model(cfg)
    step = restore_lora(model, run, step)
    return model, cfg, step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="training output directory (train.out_dir)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--peft", help="write an HF PEFT adapter directory here")
    p.add_argument("--merged", help="write a merged HF safetensors checkpoint here")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="merged weights dtype")
    args = p.parse_args(argv)
    if not args.peft and not args.merged:
        p.error("give --peft DIR and/or --merged DIR")
    on_interrupt(lambda: "the export stopped; what it had written under "
                         + " and ".join(d for d in (args.peft, args.merged) if d) + " may be incomplete: run it again")
    try:
        from small4_jax.lora import adapters as lora

        model, cfg, step = load_run(args.run, args.step)
        if args.peft:
            lora.save_peft(model, args.peft, base_model_name_or_path=cfg.base.checkpoint)
            print(f"PEFT adapter (step {step}) -> {args.peft}", file=sys.stderr)
        if args.merged:
            from train.trainer import tokenizer_path

            save_merged(model, args.merged, source=cfg.base.checkpoint, dtype=args.dtype,
                        tokenizer=tokenizer_path(cfg))
            print(f"merged checkpoint (step {step}) -> {args.merged}", file=sys.stderr)
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
