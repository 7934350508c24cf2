"""Decode tokens/s with quantised weights (fp8, int8, int4 g128) against bf16, and against the bandwidth floor.

    python benchmarks/quant_decode.py                          # reduced-depth full-width proxy (GPU), B = 1, 64
    python benchmarks/quant_decode.py --small                  # CPU smoke test on configs/tiny.yaml

For each weight format and batch B it times the engine's decode step (absorbed MLA over a paged cache of `context`
tokens per row; `benchmarks/decode.py`'s timing loop) and reports tokens/s, ms per step and the fraction of the
bandwidth floor. The floor is the bytes one step must read, counted from the model's own parameters at their stored
width: every non-expert weight, the routed experts B x top-k can touch (at most all), the scales, the lm_head, and the
B x context latent rows, divided by the measured device copy bandwidth. Decode is bandwidth-bound, so fewer bytes
per weight should be speed: PERFORMANCE.md's batch-1 floor on an H100 is 3.64 ms/token in bf16, 1.98 in fp8 and 1.15
in int4 for the full model.

Peer (on a GPU only, import-guarded): tokamax's `ragged_dot` at the same decode shapes (one MoE layer's gate_up and
down, B x top-k rows), bf16 and, where the installed tokamax takes quantised operands, quantised; beside our grouped
matmul on the same QArray. Reported as microseconds per layer.

Output: one JSON object per measurement on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import copy_bandwidth, proxy_config, time_decode  # noqa: E402

from small4_jax import quant  # noqa: E402
from small4_jax.model import init_model  # noqa: E402
from small4_jax.paged import cache_bytes_per_token_per_layer  # noqa: E402


def floor_bytes(model, dtype, batch: int, context: int) -> int:
    """Bytes one decode step reads, from the parameters as stored (module docstring)."""
    c = model.config
    touched = min(c.n_routed_experts, batch * c.num_experts_per_tok) / c.n_routed_experts
    total = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        nbytes = v.nbytes
        if names[0] == "embed_tokens":
            nbytes = batch * c.hidden_size * v.dtype.itemsize  # one row per token
        elif "experts" in names and "shared_experts" not in names:
            nbytes = int(nbytes * touched)
        total += nbytes
    return total + batch * context * cache_bytes_per_token_per_layer(c, dtype) * c.num_hidden_layers


def tokamax_peer(config, batch: int, fmt: str | None, dtype) -> dict:
    """tokamax.ragged_dot on one layer's gate_up and down at B x top-k rows: microseconds, or why it did not run."""
    if jax.devices()[0].platform != "gpu":
        return {"peer": "tokamax: GPU only"}
    try:
        import tokamax
    except ImportError as e:
        return {"peer": f"tokamax not installed ({e})"}
    from small4_jax.kernels import gmm

    c = config
    rows = batch * c.num_experts_per_tok
    rng = np.random.default_rng(0)
    sizes = np.bincount(rng.integers(0, c.n_routed_experts, rows), minlength=c.n_routed_experts).astype(np.int32)
    x = jnp.asarray(rng.normal(size=(rows, c.hidden_size)), dtype)
    w = jnp.asarray(rng.normal(size=(c.n_routed_experts, c.hidden_size, 2 * c.moe_intermediate_size)) * 0.02, dtype)
    q = quant.quantize(w, fmt) if fmt else None
    gs = jnp.asarray(sizes)

    def timed(f, *args):
        f(*args).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(20):
            out = f(*args)
        out.block_until_ready()
        return (time.perf_counter() - t0) / 20 * 1e6

    out = {}
    try:
        out["tokamax_us"] = timed(jax.jit(lambda x, w, gs: tokamax.ragged_dot(x, w, gs)), x,
                                  w if q is None else quant.dequantize(q, dtype), gs)
    except Exception as e:  # noqa: BLE001 - the peer's API moves; report, do not fail the benchmark
        out["tokamax"] = f"{type(e).__name__}: {str(e)[:120]}"
    ours = (lambda x, gs: gmm(x, q, gs, backend="pallas")) if q is not None else (
        lambda x, gs: gmm(x, w, gs, backend="pallas"))
    out["ours_us"] = timed(jax.jit(ours), x, gs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny dimensions (configs/tiny.yaml): a CPU smoke test")
    p.add_argument("--layers", type=int, default=8, help="proxy depth (full width, all experts)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=None, help="tokens per row in the cache (default 1024; --small 64)")
    p.add_argument("--formats", default="none,fp8,int8,int4", help="comma-separated; none = bf16")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20; --small 3)")
    a = p.parse_args(argv)
    config = proxy_config(a.small, a.layers)
    dtype = jnp.dtype("float32" if a.small else "bfloat16")
    context = a.context or (64 if a.small else 1024)
    iters = a.iters or (3 if a.small else 20)
    page_size = 16
    bandwidth = copy_bandwidth(1 << 26 if a.small else 1 << 30)
    device = jax.devices()[0].device_kind
    for fmt in a.formats.split(","):
        fmt = quant.check_format(fmt)
        model = init_model(config, seed=0, dtype=dtype, quantize=fmt)
        graphdef, state = nnx.split(model)
        for batch in (int(b) for b in a.batches.split(",")):
            t = time_decode(graphdef, state, config, dtype, batch, context, page_size, iters)
            floor = floor_bytes(model, dtype, batch, context) / bandwidth
            row = dict(device=device, layers=config.num_hidden_layers, format=fmt or str(dtype), batch=batch,
                       context=context, step_ms=t * 1e3, tokens_per_s=batch / t, floor_ms=floor * 1e3,
                       fraction_of_floor=floor / t, copy_bandwidth_gbs=bandwidth / 1e9,
                       weight_gib=quant.weight_bytes(model) / 2**30)
            row.update(tokamax_peer(config, batch, fmt, dtype) if not a.small else {})
            print(json.dumps(row), flush=True)
        del model, state
    return 0


if __name__ == "__main__":
    sys.exit(main())
