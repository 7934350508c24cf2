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

W8A8 (`fp8-w8a8`): the fp8 model with fp8 activations (`from_pretrained(..., activations="fp8")`: each linear's and
expert's input quantised with a static scale, fp8 x fp8 products). A random model has no calibrated activation
scales, so this row uses placeholder scales of 1: right for timing (the work does not depend on the values), not
for accuracy. Whether W8A8 beats weight-only fp8 is what this row on a GPU decides: on sm_90a the Pallas Triton
kernel's fp8 dot is lowered as f16 mma.sync after widening (kernels/gmm/quant_triton.py), and XLA's dense fp8 GEMM
is its Triton emitter or cuBLASLt (which transposes our [in, out] weight first).

Peer (on a GPU; import-guarded): tokamax's `ragged_dot` at the same decode shapes (one MoE layer's gate_up, B x top-k
rows) on the same weights, passed in tokamax's own quantised operand (`qwix.QArray`: int4 / int8 / fp8 values with
the per-column scale grid), beside our grouped matmul on our QArray: microseconds each, their ratio, and the largest
difference of the outputs. tokamax is not a dependency: `bash benchmarks/fetch_gpu_wheels.sh` downloads it and its
dependencies (Python 3.12 wheels) into .wheels/, which benchmarks/gpu_suite.sh installs offline (carry ".wheels").
`--peer-on-cpu` calls it on the CPU (tokamax's XLA fallback) to check the call.

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

from small4_jax.quant import formats as quant  # noqa: E402
from small4_jax.nn.model import init_model  # noqa: E402
from small4_jax.nn.qlinear import quantize_model, weight_bytes  # noqa: E402
from small4_jax.nn.paged import cache_bytes_per_token_per_layer  # noqa: E402


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


def tokamax_weights(q: "quant.QArray | None", w):
    """Our weight in tokamax's operand format: the float array, or a `qwix.QArray` (values unpacked to [G, K, N] in
    their own dtype: int4 as jnp.int4, int8, fp8; scales as the per-column grid [G, K / group, N] tokamax reads,
    which is our `column_scale`)."""
    if q is None:
        return w
    import qwix

    values = quant.int_values(q)
    if q.format == "int4":
        values = values.astype(jnp.int4)
    return qwix.QArray(qvalue=values, scale=quant.column_scale(q))


def tokamax_peer(config, batch: int, fmt: str | None, dtype, on_cpu: bool = False, w8a8: bool = False) -> dict:
    """tokamax.ragged_dot on one layer's gate_up at B x top-k rows, on the same (quantised) weights as our grouped
    matmul: microseconds each, and the largest difference of tokamax's output from ours relative to our largest
    output (both dequantise the same values; tokamax's quantised path is its own kernel). On a GPU only unless
    `on_cpu` (its XLA fallback there: a check that the call is right, not a timing)."""
    if jax.devices()[0].platform != "gpu" and not on_cpu:
        return {"peer": "tokamax: GPU only"}
    try:
        import tokamax
    except ImportError as e:
        return {"peer": f"tokamax not installed ({e}); benchmarks/fetch_gpu_wheels.sh"}
    from absl import flags as absl_flags

    if not absl_flags.FLAGS.is_parsed():  # tokamax reads absl flags, which would parse our argv and reject it
        absl_flags.FLAGS.mark_as_parsed()
    from small4_jax.kernels import gmm

    c = config
    rows = batch * c.num_experts_per_tok
    rng = np.random.default_rng(0)
    sizes = np.bincount(rng.integers(0, c.n_routed_experts, rows), minlength=c.n_routed_experts).astype(np.int32)
    x = jnp.asarray(rng.normal(size=(rows, c.hidden_size)), dtype)
    w = jnp.asarray(rng.normal(size=(c.n_routed_experts, c.hidden_size, 2 * c.moe_intermediate_size)) * 0.02, dtype)
    q = quant.quantize(w, fmt) if fmt else None
    if q is not None and w8a8:  # ours: fp8 x fp8 with a static scale per expert; tokamax gets the weight-only QArray
        q = q._replace(act_scale=jnp.full((c.n_routed_experts, 1, 1), float(jnp.max(jnp.abs(x))) / quant.FP8_MAX,
                                          jnp.float32))
    gs = jnp.asarray(sizes)

    def timed(f, *args):
        out = f(*args).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(20):
            f(*args).block_until_ready()
        return (time.perf_counter() - t0) / 20 * 1e6, out

    out = {"peer": f"tokamax {tokamax.__version__}"}
    ours_us, ours = timed(jax.jit(lambda x, w, gs: gmm(x, w, gs, backend="pallas" if not on_cpu else "reference")),
                          x, w if q is None else q, gs)
    out["ours_us"] = ours_us
    try:
        peer_us, peer = timed(jax.jit(lambda x, w, gs: tokamax.ragged_dot(x, w, gs, preferred_element_type=dtype)),
                              x, tokamax_weights(q and q._replace(act_scale=None), w), gs)
        out["tokamax_us"] = peer_us
        out["tokamax_vs_ours"] = ours_us / peer_us
        ref = jnp.max(jnp.abs(ours.astype(jnp.float32)))
        out["tokamax_max_rel_diff"] = float(jnp.max(jnp.abs(peer.astype(jnp.float32) - ours.astype(jnp.float32))) / ref)
    except Exception as e:  # noqa: BLE001 - the peer's API moves; report, do not fail the benchmark
        out["tokamax"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny dimensions (configs/tiny.yaml): a CPU smoke test")
    p.add_argument("--layers", type=int, default=8, help="proxy depth (full width, all experts)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=None, help="tokens per row in the cache (default 1024; --small 64)")
    p.add_argument("--formats", default="none,fp8,fp8-w8a8,int8,int4",
                   help="comma-separated; none = bf16, fp8-w8a8 = fp8 weights and activations")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20; --small 3)")
    p.add_argument("--peer-on-cpu", action="store_true", help="call tokamax on the CPU too (a check, not a timing)")
    a = p.parse_args(argv)
    config = proxy_config(a.small, a.layers)
    dtype = jnp.dtype("float32" if a.small else "bfloat16")
    context = a.context or (64 if a.small else 1024)
    iters = a.iters or (3 if a.small else 20)
    page_size = 16
    bandwidth = copy_bandwidth(1 << 26 if a.small else 1 << 30)
    device = jax.devices()[0].device_kind
    for name in a.formats.split(","):
        w8a8 = name == "fp8-w8a8"
        fmt = "fp8" if w8a8 else quant.check_format(name)
        if w8a8:  # placeholder activation scales (1): module docstring
            model = quantize_model(init_model(config, seed=0, dtype=dtype), fmt, activations="fp8")
        else:
            model = init_model(config, seed=0, dtype=dtype, quantize=fmt)
        graphdef, state = nnx.split(model)
        for batch in (int(b) for b in a.batches.split(",")):
            t = time_decode(graphdef, state, config, dtype, batch, context, page_size, iters)
            floor = floor_bytes(model, dtype, batch, context) / bandwidth
            row = dict(device=device, layers=config.num_hidden_layers, format=name if w8a8 else fmt or str(dtype),
                       batch=batch,
                       context=context, step_ms=t * 1e3, tokens_per_s=batch / t, floor_ms=floor * 1e3,
                       fraction_of_floor=floor / t, copy_bandwidth_gbs=bandwidth / 1e9,
                       weight_gib=weight_bytes(model) / 2**30)
            if not a.small or a.peer_on_cpu:
                row.update(tokamax_peer(config, batch, fmt, dtype, on_cpu=a.peer_on_cpu, w8a8=w8a8))
            print(json.dumps(row), flush=True)
        del model, state
    return 0


if __name__ == "__main__":
    sys.exit(main())
