"""Peak host memory of `from_pretrained` against the largest tensor and the total checkpoint size.

    python benchmarks/load_memory.py                      # ~1 GB synthetic bf16 checkpoint in 4 files
    python benchmarks/load_memory.py --layers 2 --hidden 256 --experts 8 --moe-intermediate 128 --vocab 4096

It writes a synthetic multi-file HF checkpoint (random bf16 tensors, Mistral Small 4 layout), then loads it with
`small4_jax.from_pretrained` in a fresh process and reports that process's RSS before the load, its peak during the
load (ru_maxrss) and after it. On a CPU backend the loaded parameters themselves live in host memory, so what the
loader costs on top of the model is `peak - after` (the transient), which should stay near one tensor (the largest
one, plus its transposed copy); on a GPU the parameters leave host memory as they are placed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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


def measure(path: str) -> None:
    """Child process: load `path` and print the memory figures as JSON."""
    import jax

    import small4_jax

    jax.devices()
    before = _rss_bytes()
    t = time.perf_counter()
    model = small4_jax.from_pretrained(path, dtype="bfloat16")
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    seconds = time.perf_counter() - t
    print(json.dumps({"before": before, "peak": _peak_bytes(), "after": _rss_bytes(), "seconds": seconds,
                      "backend": jax.default_backend()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory, removed after)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure:
        measure(a.measure)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.dir or tmp) / "ckpt"
        info = write_checkpoint(a, out)
        proc = subprocess.run([sys.executable, __file__, "--measure", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        m = json.loads(proc.stdout.strip().splitlines()[-1])
    transient = max(m["peak"] - m["after"], 0)  # statm and ru_maxrss differ by a few pages
    rows = [
        ("checkpoint total", info["total"]),
        (f"largest tensor ({info['largest_name']})", info["largest"]),
        ("RSS before load", m["before"]),
        ("RSS peak during load", m["peak"]),
        ("RSS after load (model resident on the CPU backend)", m["after"]),
        ("loader transient = peak - after", transient),
    ]
    print(f"from_pretrained memory, {info['tensors']} tensors in {a.shards} files, backend {m['backend']}, "
          f"{m['seconds']:.1f} s")
    print(f"{'quantity':<58} {'MiB':>10}")
    for name, v in rows:
        print(f"{name:<58} {v / MB:>10.1f}")
    print(f"{'transient / largest tensor':<58} {transient / info['largest']:>10.2f}")
    print(f"{'transient / checkpoint total':<58} {transient / info['total']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
