"""Decode throughput and time to first token on a reduced-depth, full-width proxy of Small 4 (PERFORMANCE.md §7.5).

    python benchmarks/decode.py                       # P-8L-bf16: 8 layers, all 128 experts, random weights (GPU)
    python benchmarks/decode.py --small --no-peer     # a CPU smoke test on tiny dimensions

For each batch B and context T it times the engine's decode step (`small4_jax.nn.paged.step`, absorbed MLA over a
paged latent cache holding T tokens per row) and reports output tokens/s, the time per layer, and the fraction of
the bandwidth floor: the bytes a step must read (every attention / router / shared-expert weight, the routed
experts B x top-k can touch, the lm_head and the B x T latent rows) divided by the measured device copy bandwidth.
Time to first token is a chunked prefill of T tokens for one request (absorbed MLA over the pages, as the
engine). The peer is transformers `Mistral4ForCausalLM` on the same config in the same process (its own KV cache,
one token per forward).

Output: one JSON object per measurement on stdout and, with --markdown FILE, a table appended to FILE row by row (a
run killed at a time limit keeps the rows it measured). A peer that cannot run (not installed, out of memory) is a
row saying so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from small4_jax.decode.sampler import RowSampling, TokenHistory  # noqa: E402
from small4_jax.config import Small4Config  # noqa: E402
from small4_jax.nn.model import init_model  # noqa: E402
from small4_jax.nn.paged import PagedCache, cache_bytes_per_token_per_layer, step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def proxy_config(small: bool, layers: int) -> Small4Config:
    if small:
        return Small4Config.from_yaml(REPO / "configs" / "tiny.yaml").replace(vision=None)  # the text model
    return Small4Config.from_yaml(REPO / "configs" / "small4-119b.yaml").replace(num_hidden_layers=layers, vision=None)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 7, inner: int = 8) -> float:
    """Peak device copy bandwidth in bytes/s (read + write counted) over a buffer of `nbytes`: `inner` passes of
    x + 1 inside one jitted loop (so dispatch does not count), best of `repeats` timings.

    The floor divides a step's bytes by this, so it must not be low: a buffer the size of the step's bytes reads
    from the same level of the memory hierarchy as the step (a large buffer streams from DRAM while a small model
    sits in cache; that floor was beaten), and the best timing is the one least disturbed by a busy machine."""
    x = jnp.zeros((max(nbytes // 4, 1024),), jnp.float32)
    f = jax.jit(lambda a: jax.lax.fori_loop(0, inner, lambda i, v: v + 1, a))
    x = f(x).block_until_ready()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best = max(best, 2 * x.nbytes * inner / (time.perf_counter() - t0))
    return best


def floor_bytes(config: Small4Config, dtype, batch: int, context: int) -> int:
    """Minimal bytes read by one decode step (weights touched + latent cache), from the config."""
    c, b = config, jnp.dtype(dtype).itemsize
    h, nh = c.hidden_size, c.num_attention_heads
    q = h * c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim if c.q_lora_rank else h * nh * c.qk_head_dim
    attn = q + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    attn += nh * c.v_head_dim * h
    expert = 3 * h * c.moe_intermediate_size
    touched = min(c.n_routed_experts, batch * c.num_experts_per_tok)
    per_layer = attn + h * c.n_routed_experts + expert * (touched + c.n_shared_experts)
    weights = c.num_hidden_layers * per_layer + h * c.vocab_size + batch * h
    cache = batch * context * cache_bytes_per_token_per_layer(c, dtype) * c.num_hidden_layers
    return weights * b + cache


def time_decode(graphdef, state, config, dtype, batch, context, page_size, iters):
    pages_per_row = math.ceil((context + iters + 1) / page_size)
    cache = PagedCache.create(config, batch * pages_per_row + 1, page_size, dtype).pages
    table = (1 + np.arange(batch * pages_per_row, dtype=np.int32)).reshape(batch, pages_per_row)
    ids = np.full((batch, 1), 5, np.int32)
    sampling = RowSampling.greedy(batch, config.vocab_size)
    history = [TokenHistory.create(1, config.vocab_size)]
    rows = np.arange(batch)

    def one(pages, pos):
        seq = np.full((batch, 1), pos, np.int32)
        slots = np.stack([table[rows, pos // page_size], np.full(batch, pos % page_size)], -1)[:, None].astype(
            np.int32)
        *out, history[0], pages = step(graphdef, state, pages, history[0], ids, seq, seq, slots, table,
                                       np.zeros((batch,), np.int32), sampling, absorbed=True, num_top=1)
        return pages, out[0]

    cache, tok = one(cache, context)  # compile, untimed
    tok.block_until_ready()
    rounds = max(5, iters // 4)  # the median of >= 5 timed rounds of `per` steps each
    per = max(1, iters // rounds)
    times, pos = [], context + 1
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per):
            cache, tok = one(cache, pos)
            pos += 1
        tok.block_until_ready()
        times.append((time.perf_counter() - t0) / per)
    return float(np.median(times))


def time_prefill(graphdef, state, config, dtype, context, page_size, chunk):
    n_pages = math.ceil(context / page_size)
    cache = PagedCache.create(config, n_pages + 1, page_size, dtype).pages
    table = (1 + np.arange(n_pages, dtype=np.int32))[None]
    sampling = RowSampling.greedy(1, config.vocab_size)
    history = [TokenHistory.create(1, config.vocab_size)]

    def run(pages):
        tok = None
        for start in range(0, context, chunk):
            idx = np.minimum(np.arange(start, start + chunk), context - 1)[None].astype(np.int32)
            slots = np.stack([table[0, idx[0] // page_size], idx[0] % page_size], -1)[None].astype(np.int32)
            *out, history[0], pages = step(graphdef, state, pages, history[0], np.full((1, chunk), 5, np.int32), idx,
                                           idx, slots, table, np.array([min(chunk, context - start) - 1], np.int32),
                                           sampling, num_top=1)
            tok = out[0]
        tok.block_until_ready()
        return pages

    cache = run(cache)  # compile
    t0 = time.perf_counter()
    run(cache)
    return time.perf_counter() - t0


def peer_decode(config, batch, context, iters, device):
    """transformers Mistral4ForCausalLM on the same config: seconds per decode step, or why it did not run ("not
    installed", "out of memory: ...", another error's first line): a peer that cannot run is a row, not a crash."""
    try:
        import torch
        from transformers import Mistral4Config, Mistral4ForCausalLM
    except ImportError as e:
        return f"not installed ({e})"
    try:
        return _peer_decode(torch, Mistral4Config, Mistral4ForCausalLM, config, batch, context, iters, device)
    except Exception as e:  # noqa: BLE001 - torch.OutOfMemoryError above all (batch 64 x 8192 on an H100)
        if device == "cuda":
            torch.cuda.empty_cache()
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        return ("out of memory: " if oom else f"{type(e).__name__}: ") + str(e).splitlines()[0][:120]


def _peer_decode(torch, Mistral4Config, Mistral4ForCausalLM, config, batch, context, iters, device):
    c = config
    hf_config = Mistral4Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
        n_shared_experts=c.n_shared_experts, first_k_dense_replace=c.first_k_dense_replace,
        q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, max_position_embeddings=context + iters + 8,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Mistral4ForCausalLM(hf_config).to(dtype).eval()
    with torch.no_grad():
        ids = torch.full((batch, context), 5, device=device)
        out = model(ids, use_cache=True, logits_to_keep=1)  # the last position's logits only, as a server does
        past, tok = out.past_key_values, torch.full((batch, 1), 5, device=device)
        for i in range(iters + 1):
            if i == 1:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            past = model(tok, past_key_values=past, use_cache=True).past_key_values
        if device == "cuda":
            torch.cuda.synchronize()
    del model
    return (time.perf_counter() - t0) / iters


def markdown_row(r: dict) -> str:
    peer = (f"{r['peer_tokens_per_s']:.1f}" if r["peer_tokens_per_s"] is not None
            else f"did not run: {r['peer_error']}" if r.get("peer_error") else "-")
    return (f"| {r['batch']} | {r['context']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
            f"{r['us_per_layer']:.0f} | {r['floor_ms']:.2f} | {100 * r['fraction_of_floor']:.0f}% | "
            f"{r['copy_bandwidth_gbs']:.0f} | {r['ttft_ms']:.0f} | {peer} |")


def _append(path: str, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny dimensions (configs/tiny.yaml): a CPU smoke test")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", default=None, help="comma-separated (default 1,8,64,256; --small: 1,8)")
    p.add_argument("--contexts", default=None, help="comma-separated (default 1024,8192; --small: 64,256)")
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --small)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--dense-impl", default="xla", choices=("xla", "gmm", "auto"),
                   help="config.dense_impl: the dense projections by XLA (a copy of each layer's weights under the "
                        "scan) or read in place by the grouped-matmul kernel")
    p.add_argument("--markdown", help="append a results table to this file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    batches = [int(x) for x in (args.batches or ("1,8" if args.small else "1,8,64,256")).split(",")]
    contexts = [int(x) for x in (args.contexts or ("64,256" if args.small else "1024,8192")).split(",")]
    dtype = jnp.dtype(args.dtype or ("float32" if args.small else "bfloat16"))
    page_size = min(args.page_size, 16) if args.small else args.page_size
    chunk = min(args.prefill_chunk, 64) if args.small else args.prefill_chunk
    config = proxy_config(args.small, args.layers).replace(dense_impl=args.dense_impl)
    model = init_model(config, seed=0, dtype=dtype)
    graphdef, state = nnx.split(model)
    device = jax.devices()[0].device_kind
    rows = []
    if args.markdown:  # the heading first, then each row as it is measured: a killed run keeps what it measured
        _append(args.markdown, [f"\n### decode, {config.num_hidden_layers}-layer proxy, {dtype}, dense_impl "
                                f"{args.dense_impl}, {device} (copy bandwidth measured at each step's size, best of 7)\n",
                                "| batch | context | tok/s | step ms | us/layer | floor ms | % of floor | copy GB/s | TTFT ms "
                                "| transformers tok/s |",
                                "|---|---|---|---|---|---|---|---|---|---|"])
    for context in contexts:
        ttft = time_prefill(graphdef, state, config, dtype, context, page_size, chunk)
        for batch in batches:
            t = time_decode(graphdef, state, config, dtype, batch, context, page_size, args.iters)
            nbytes = floor_bytes(config, dtype, batch, context)
            bandwidth = copy_bandwidth(nbytes)  # measured at the step's size: the same cache level
            floor = nbytes / bandwidth
            if floor > t:  # a floor the step beats is a wrong floor: say so rather than print > 100%
                print(f"warning: batch {batch} context {context}: the step ({t * 1e3:.3f} ms) beat its floor "
                      f"({floor * 1e3:.3f} ms); the copy bandwidth understates what the step reads at", file=sys.stderr)
            peer = None
            if not args.no_peer:
                torch_device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
                peer = peer_decode(config, batch, context, max(3, args.iters // 4), torch_device)
            row = dict(device=device, layers=config.num_hidden_layers, dtype=str(dtype), batch=batch,
                       context=context, step_ms=t * 1e3, tokens_per_s=batch / t,
                       us_per_layer=t * 1e6 / config.num_hidden_layers, floor_ms=floor * 1e3,
                       fraction_of_floor=floor / t, ttft_ms=ttft * 1e3,
                       peer_tokens_per_s=batch / peer if isinstance(peer, float) else None,
                       peer_error=peer if isinstance(peer, str) else None, copy_bandwidth_gbs=bandwidth / 1e9)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.markdown:
                _append(args.markdown, [markdown_row(row)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
