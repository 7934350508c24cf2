"""Time of GPTQ (`quant.gptq_int4`) and of the int4 clipping search (`quant.quantize_int4`) per weight shape, and the
quantisation part of a GPTQ conversion of a whole model estimated from them.

    python benchmarks/gptq_time.py                                   # one 4096x4096 weight
    python benchmarks/gptq_time.py --model configs/small4-119b.yaml  # every weight shape of one layer of that model

On jax's default device (the GPU when there is one; JAX_PLATFORMS=cpu for the host). Each shape is timed warm (its
compile reported apart) as the pipeline runs it: stacked experts a batch at a time (vmapped, `quant.gptq_batch_elements`),
the whole layer's count extrapolated from one batch. The clipping search is timed on the host (numpy in, as
`checkpoint.py` quantises a checkpoint without calibration). The estimate covers quantisation only: reading the
checkpoint, the Hessians (the forward over the calibration tokens) and writing come on top (printed as FLOP counts).

Output: JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def layer_shapes(config) -> dict[tuple[int, int], list[int]]:
    """{(K, N): [how many, how many a token goes through]} of every quantised weight of one decoder layer (the
    last, an MoE one if any): a routed expert stack counts E weights of which a token uses top-k."""
    from flax import nnx

    from small4_jax.nn.model import DecoderLayer
    from small4_jax.quant.formats import QUANTISED_LINEARS

    layer = nnx.eval_shape(lambda: DecoderLayer(config, config.num_hidden_layers - 1, dtype="float32",
                                                rngs=nnx.Rngs(0)))
    out: dict[tuple[int, int], list[int]] = {}
    for path, v in nnx.to_flat_state(nnx.state(layer)):
        names = [str(p) for p in path]
        experts = names[-2] == "experts"
        if experts or (names[-1] == "kernel" and names[-2] in QUANTISED_LINEARS):
            *lead, k, n = v.shape
            c = out.setdefault((k, n), [0, 0])
            c[0] += math.prod(lead)
            c[1] += config.num_experts_per_tok if experts else 1
    return out


def problem(k: int, n: int, b: int, seed: int = 0):
    """b random weights [K, N] and Hessians of correlated inputs (a few dominant directions, like activations)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(b, k, n)).astype(np.float32)
    x = rng.normal(size=(2 * k, k)).astype(np.float32) * np.exp(-np.arange(k) / (k / 8)).astype(np.float32)
    h = (x.T @ x)[None].repeat(b, 0) + np.eye(k, dtype=np.float32)
    return w, h


def timed(fn, repeat: int = 2) -> tuple[float, float]:
    """(first call incl. compile, best warm call) in seconds."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return first, best


def main(argv=None) -> int:
    from small4_jax.quant import formats as quant

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a config YAML: time every weight shape of one layer and estimate the model")
    p.add_argument("--shape", default="4096x4096", help="K x N when no --model")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--max-batch", type=int, default=None, help="cap the stacked problems solved at once")
    p.add_argument("--calibration-tokens", type=int, default=128 * 2048, help="for the forward FLOP count")
    a = p.parse_args(argv)
    device = jax.devices()[0]
    if a.model:
        from small4_jax.config import load_config

        config = load_config(a.model)
        shapes = layer_shapes(config)
    else:
        config, shapes = None, {tuple(int(d) for d in a.shape.split("x")): [1, 1]}
    layer_gptq = layer_clip = 0.0
    for (k, n), (count, _) in sorted(shapes.items()):
        b = max(1, min(count, quant.gptq_batch_elements() // (k * (k + n)), a.max_batch or count))
        w, h = problem(k, n, b)
        wd, hd = jax.device_put(w), jax.device_put(h)
        first, warm = timed(lambda: quant.gptq_int4(wd, hd, act_order=a.act_order).values, repeat=1)
        _, clip = timed(lambda: quant.quantize_int4(w[0]).values, repeat=1)
        per = warm / b
        layer_gptq += per * count
        layer_clip += clip * count
        print(json.dumps(dict(shape=[k, n], count=count, batch=b, gptq_s=per, gptq_compile_s=first - warm,
                              clip_search_host_s=clip, device=device.device_kind, act_order=a.act_order)), flush=True)
    if config is not None:
        layers = config.num_hidden_layers
        tokens = a.calibration_tokens
        forward = 2 * tokens * sum(k * n * used for (k, n), (_, used) in shapes.items())  # weights only
        # H += x^T x for every weight (linears sharing an input each gather their own, as calibration._observed does)
        hessians = 2 * tokens * sum(k * k * used for (k, n), (_, used) in shapes.items())
        print(json.dumps(dict(model=a.model, layers=layers, gptq_per_layer_s=layer_gptq,
                              gptq_model_h=layer_gptq * layers / 3600, clip_search_model_h=layer_clip * layers / 3600,
                              calibration_tokens=tokens, forward_flops_per_pass=forward * layers,
                              hessian_flops=hessians * layers,
                              device=device.device_kind)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
