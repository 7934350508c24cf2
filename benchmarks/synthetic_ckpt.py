"""A synthetic multi-file HF checkpoint in the Mistral Small 4 layout (random bf16 tensors), for the memory benchmarks.

Written one shard at a time, so writing it needs memory for one shard, not the whole checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def add_shape_args(p: argparse.ArgumentParser, *, layers, hidden, experts, moe_intermediate, vocab, shards) -> None:
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=hidden, help="a multiple of 128 (heads of 128)")
    p.add_argument("--experts", type=int, default=experts)
    p.add_argument("--moe-intermediate", type=int, default=moe_intermediate)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--shards", type=int, default=shards)


def tensor_shapes(a) -> dict[str, tuple[int, ...]]:
    h, f, e, v, q, kv, nope, rope, vd, nh = (a.hidden, a.moe_intermediate, a.experts, a.vocab, a.hidden // 4,
                                             a.hidden // 16, 64, 64, 128, a.hidden // 128)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_a_proj.weight": (q, h), p + "self_attn.q_a_layernorm.weight": (q,),
            p + "self_attn.q_b_proj.weight": (nh * (nope + rope), q),
            p + "self_attn.kv_a_proj_with_mqa.weight": (kv + rope, h), p + "self_attn.kv_a_layernorm.weight": (kv,),
            p + "self_attn.kv_b_proj.weight": (nh * (nope + vd), kv), p + "self_attn.o_proj.weight": (h, nh * vd),
            p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * f, h),
            p + "mlp.experts.down_proj": (e, h, f), p + "mlp.shared_experts.gate_proj.weight": (f, h),
            p + "mlp.shared_experts.up_proj.weight": (f, h), p + "mlp.shared_experts.down_proj.weight": (h, f),
        })
    return shapes


def write_checkpoint(a, out: Path) -> dict:
    import ml_dtypes
    from safetensors.numpy import save_file

    shapes = tensor_shapes(a)
    h = a.hidden
    config = {
        "model_type": "mistral4", "vocab_size": a.vocab, "hidden_size": h, "intermediate_size": 4 * h,
        "moe_intermediate_size": a.moe_intermediate, "num_hidden_layers": a.layers, "num_attention_heads": h // 128,
        "num_key_value_heads": h // 128, "n_routed_experts": a.experts, "num_experts_per_tok": 4,
        "n_shared_experts": 1, "q_lora_rank": h // 4, "kv_lora_rank": h // 16, "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 32768, "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    names = list(shapes)
    per = math.ceil(len(names) / a.shards)
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(a.shards):
        fname = f"model-{s + 1:05d}-of-{a.shards:05d}.safetensors"
        chunk = {}
        for n in names[s * per:(s + 1) * per]:
            chunk[n] = (rng.standard_normal(shapes[n], dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        save_file(chunk, str(out / fname))
        weight_map.update(dict.fromkeys(chunk, fname))
        del chunk
    sizes = {n: math.prod(sh) * 2 for n, sh in shapes.items()}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}))
    largest = max(sizes, key=sizes.get)
    return {"total": sum(sizes.values()), "largest": sizes[largest], "largest_name": largest, "tensors": len(sizes)}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: reset at exec, unlike ru_maxrss, which keeps the pre-exec parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
