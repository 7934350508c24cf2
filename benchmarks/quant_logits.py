"""Where the quantised formats' logit error comes from, on random models of several sizes (CPU, float32).

    python benchmarks/quant_logits.py [--sizes tiny,wide,deep] [--seeds 2]

For each model (configs/tiny.yaml's architecture with random weights, `init_model`; SIZES change the init std and
the dimensions: `wide` 4x the width, `deep` 8 layers) and each format: the weights' relative rms error
sqrt(sum (w_q - w)^2 / sum w^2) over every quantised weight, the logits' relative error ||l_q - l|| / ||l|| (Frobenius over [B, T, V], float32 compute: the format
alone differs), and the logits' error when the same weights get Gaussian noise of the format's relative rms instead
(`noise`): the model's amplification of weight noise, which no choice of format changes. Formats: fp8 per tensor
(ours: amax/448), fp8 per output column (amax/448 per column: e4m3's relative error hardly depends on the scale,
so it should not matter), int8 per channel, int4 as first written (round to nearest in [-7, 7], absmax, everywhere),
int4-all (int4 everywhere: levels [-8, 7], MSE-optimal clipping, bf16 scales) and int4 (`quant.policy`: the routed
experts so, the dense linears int8 per channel).

Output: JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_WIDE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, q_lora_rank=256, kv_lora_rank=128,
             num_attention_heads=8, num_key_value_heads=8)
SIZES = {  # overrides of configs/tiny.yaml (initializer_range 0.1); "-02": transformers' default init std 0.02
    "tiny": {},
    "tiny-02": dict(initializer_range=0.02),
    "wide-02": dict(initializer_range=0.02, **_WIDE),
    "deep-02": dict(initializer_range=0.02, num_hidden_layers=8),
    "wide-deep-02": dict(initializer_range=0.02, num_hidden_layers=8, **_WIDE),
}


def fp8_columns(w):
    """fp8 e4m3 with one amax/448 scale per output column (the comparison; not a format of quant.py)."""
    from small4_jax.quant import formats as quant

    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / quant.FP8_MAX, 1.0)
    return quant.QArray(jnp.clip(w / scale, -quant.FP8_MAX, quant.FP8_MAX).astype(jnp.float8_e4m3fn), scale)


def int4_rtn7(w):
    """int4 as first written: absmax scale per group column, round to nearest in [-7, 7] (float32 scales)."""
    from small4_jax.quant import formats as quant

    w = jnp.asarray(w, jnp.float32)
    *lead, k, n = w.shape
    g = quant.int4_group(k)
    s = jnp.max(jnp.abs(w.reshape(*lead, k // g, g, n)), axis=-2) / 7.0
    return quant.quantize_int4(w, scale=jnp.where(s > 0, s, 1.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--formats", default=None, help="comma-separated subset of the formats (default: all)")
    a = p.parse_args(argv)

    from flax import nnx

    from small4_jax import load_config
    from small4_jax.quant import formats as quant
    from small4_jax.nn.model import init_model
    from small4_jax.nn.moe import Experts

    def spelled(fmt):  # a `quantize=` spelling: each part in its policy's format
        pol = quant.policy(fmt)
        return lambda w, experts: quant.quantize(w, pol.experts if experts else pol.dense)

    formats = {"fp8": spelled("fp8"), "fp8-columns": lambda w, _: fp8_columns(w), "int8": spelled("int8"),
               "int4-rtn7": lambda w, _: int4_rtn7(w), "int4-all": spelled("int4-all"), "int4": spelled("int4")}
    if a.formats:
        formats = {f: formats[f] for f in a.formats.split(",")}

    def weights(model):  # (module, attribute, is a routed-expert stack)
        for path, m in nnx.iter_graph(model):
            if isinstance(m, Experts):
                yield m, "gate_up", True
                yield m, "down", True
            elif isinstance(m, nnx.Module) and not (path and str(path[0]) == "vision_tower"):
                for name in quant.QUANTISED_LINEARS:
                    child = getattr(m, name, None)
                    if type(child) is nnx.Linear:
                        yield child, "kernel", False

    for size in a.sizes.split(","):
        config = load_config(ROOT / "configs" / "tiny.yaml").replace(vision=None, **SIZES[size])
        for seed in range(a.seeds):
            ids = jnp.asarray(np.random.default_rng(100 + seed).integers(3, config.vocab_size, (4, 32)), jnp.int32)
            ref = np.asarray(init_model(config, seed=seed, dtype="float32")(ids))
            for fmt, fn in formats.items():
                model = init_model(config, seed=seed, dtype="float32")
                noisy = init_model(config, seed=seed, dtype="float32")
                num = den = 0.0
                key = jax.random.key(seed)
                for (mod, name, experts), (nmod, *_) in zip(weights(model), weights(noisy)):
                    w = getattr(mod, name)[...]
                    back = quant.dequantize(fn(w, experts))
                    num += float(jnp.sum((back - w) ** 2))
                    den += float(jnp.sum(w * w))
                    getattr(mod, name).value = back  # the dequantised weight: the format's error alone
                    rel_w = float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w))
                    key, sub = jax.random.split(key)
                    noise = jax.random.normal(sub, w.shape) * jnp.sqrt(jnp.mean(w * w)) * rel_w
                    getattr(nmod, name).value = w + noise
                rel = lambda m: float(np.linalg.norm(np.asarray(m(ids)) - ref) / np.linalg.norm(ref))  # noqa: E731
                print(json.dumps(dict(size=size, seed=seed, format=fmt, weights_rel=float(np.sqrt(num / den)),
                                      logits_rel=rel(model), noise_logits_rel=rel(noisy),
                                      layers=config.num_hidden_layers, hidden=config.hidden_size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
