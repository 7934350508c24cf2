"""The serving engine against transformers eager on the CPU, same weights, same process, interleaved.

    OMP_WAIT_POLICY=PASSIVE JAX_PLATFORMS=cpu python benchmarks/serve_vs_transformers.py [--reps 3]
        [--cases decode batch prefill] [--prefill-batch 4]

Medium config (issue 13): hidden 512, 4 layers (all MoE), 16 routed experts top-4 + 1 shared, MLA, vocab 32768,
float32. transformers' Mistral4 with random weights is saved and loaded by `small4_jax.from_pretrained`. Three
measurements, each run alternately by the two (medians over --reps, after a warm-up of each):
- decode: one request, 16-token prompt, 64 generated tokens (greedy, EOS ignored): tokens/s;
- batch: 16 requests of 16-token prompts at once, 64 tokens each: generated tokens/s;
- prefill: one 1024-token prompt to its first token: seconds (a new random prompt each run, so nothing comes from
  the prefix cache).
The engine is warmed up (`Engine.warmup`) first, so its numbers exclude compilation. Results: benchmarks/RESULTS.md. OMP_WAIT_POLICY=PASSIVE keeps
torch's idle OpenMP threads from spinning on the cores JAX is using (set it in the environment before starting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MEDIUM = dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
              num_hidden_layers=4, first_k_dense_replace=0, num_attention_heads=8, num_key_value_heads=8,
              q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
              n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, max_position_embeddings=2048,
              eos_token_id=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new", type=int, default=64, help="generated tokens per request")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--prefill-batch", type=int, default=1,
                   help="requests prefilled together in one step (infer.serve's default is 4)")
    p.add_argument("--cases", nargs="*", default=["decode", "batch", "prefill"], choices=["decode", "batch", "prefill"])
    args = p.parse_args(argv)

    import torch
    from ckpt_utils import make_hf_model, save_hf, tiny_hf_config

    import small4_jax
    from infer.engine.engine import Engine, SamplingOptions

    torch.manual_seed(0)
    hf = make_hf_model(tiny_hf_config(**MEDIUM), seed=0)
    with tempfile.TemporaryDirectory() as d:
        save_hf(hf, d)
        model = small4_jax.from_pretrained(d, dtype="float32")
    page = 16
    max_len = args.prefill + 64
    engine = Engine(model, None, max_batch=args.batch, page_size=page, max_model_len=max_len,
                    prefill_chunk=args.prefill_chunk, prefill_batch=args.prefill_batch, batch_buckets=(1, args.batch),
                    page_buckets=(-(-(16 + args.new) // page), -(-max_len // page)))
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    short = [[1] + rng.integers(40, MEDIUM["vocab_size"], 15).tolist() for _ in range(args.batch)]

    def long():  # a fresh prompt each time: a repeated one would be served from the engine's prefix cache
        return [1] + rng.integers(40, MEDIUM["vocab_size"], args.prefill - 1).tolist()

    greedy = SamplingOptions(max_tokens=args.new, ignore_eos=True)

    def ours(prompts, options):
        t = time.perf_counter()
        outs = engine.generate(prompts, options)
        dt = time.perf_counter() - t
        assert all(len(o.token_ids) == options.max_tokens for o in outs)
        return dt

    def theirs(prompts, new):
        ids = torch.tensor(prompts)
        t = time.perf_counter()
        with torch.no_grad():
            if new == 0:
                hf(ids).logits[:, -1].argmax(-1)
            else:
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False)
        return time.perf_counter() - t

    cases = {
        "decode_tokens_per_s": (lambda: args.new / ours(short[:1], greedy),
                                lambda: args.new / theirs(short[:1], args.new)),
        "batch_tokens_per_s": (lambda: args.batch * args.new / ours(short, greedy),
                               lambda: args.batch * args.new / theirs(short, args.new)),
        "prefill_seconds": (lambda: ours([long()], SamplingOptions(max_tokens=1)), lambda: theirs([long()], 0)),
    }
    report = {"config": MEDIUM, "torch_threads": torch.get_num_threads(), "engine_warmup_s": round(warmup_s, 1)}
    cases = {name: v for name, v in cases.items() if name.split("_")[0] in args.cases}
    for name, (a, b) in cases.items():
        a(), b()  # warm-up (allocations, caches)
        ra, rb = [], []
        for _ in range(args.reps):
            ra.append(a())
            rb.append(b())
        ma, mb = statistics.median(ra), statistics.median(rb)
        ratio = ma / mb if name.endswith("per_s") else mb / ma  # > 1: the engine is faster
        report[name] = {"small4_jax": round(ma, 3), "transformers": round(mb, 3), "speedup": round(ratio, 3)}
        print(name, report[name], file=sys.stderr, flush=True)
    report["engine_host_ms_per_step"] = round(1e3 * engine.stats["host_seconds"] / max(engine.stats["steps"], 1), 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
