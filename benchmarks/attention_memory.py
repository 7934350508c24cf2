"""Attention temporaries vs sequence length, from XLA's memory analysis of compiled programs (nothing is run).

    JAX_PLATFORMS=cpu python benchmarks/attention_memory.py                       # CPU: reference vs blockwise
    JAX_PLATFORMS=cpu python benchmarks/attention_memory.py --target h100 --impls pallas blockwise   # deviceless GPU

The program is one attention of Small 4's expanded MLA (H=32 heads, 128-d q/k/v) over B packed rows of T tokens
(positions + segment ids), forward and backward (the gradients of q, k and v), as `small4_jax.kernels.attention`
computes it for training and prefill. Temp bytes are per device (one device). O(T) backends double per doubling
of T; the reference (every score materialised) quadruples.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from small4_jax.kernels.attention import attention  # noqa: E402


def program(impl: str, forward_only: bool):
    def grads(q, k, v, pos, seg):
        def loss(q, k, v):
            o = attention(q, k, v, q_positions=pos, k_positions=pos, q_segments=seg, k_segments=seg, impl=impl)
            return jnp.sum(o.astype(jnp.float32))

        return loss(q, k, v) if forward_only else jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return grads


def temp_bytes(impl: str, target: str, b: int, t: int, heads: int, dim: int, dtype, forward_only: bool) -> int:
    if target == "cpu":
        x = jax.ShapeDtypeStruct((b, t, heads, dim), dtype)
        ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
        compiled = jax.jit(program(impl, forward_only)).lower(x, x, x, ids, ids).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)
    from small4_jax.tools import aot

    mesh = aot.gpu_mesh(target, {"data": 1}, topology="1x1x1")
    x = aot.spec((b, t, heads, dim), dtype, mesh)
    ids = aot.spec((b, t), jnp.int32, mesh)
    return aot.compile_for(program(impl, forward_only), x, x, x, ids, ids, mesh=mesh).memory.temp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="cpu", choices=("cpu", "h100", "h200"))
    p.add_argument("--impls", nargs="+", default=["reference", "blockwise"])
    p.add_argument("--seq", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--markdown", help="append the table to this file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    what = "forward" if args.forward_only else "forward + backward"
    lines = [f"# attention temporaries ({args.target}, jax {jax.__version__}): B={args.batch}, H={args.heads}, "
             f"{args.dim}-d, {args.dtype}, {what}",
             "| impl | " + " | ".join(f"T={t}" for t in args.seq) + " |", "|---|" + "---|" * len(args.seq)]
    print("\n".join(lines), flush=True)
    for impl in args.impls:
        cells = []
        for t in args.seq:
            try:
                n = temp_bytes(impl, args.target, args.batch, t, args.heads, args.dim, dtype, args.forward_only)
                cells.append(f"{n / 2**30:.3f} GiB")
            except Exception as e:  # noqa: BLE001 - report it in the table, keep going
                cells.append(f"error: {type(e).__name__}")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.markdown:
        cmd = "JAX_PLATFORMS=cpu python benchmarks/attention_memory.py " + " ".join(argv or sys.argv[1:])
        with open(args.markdown, "a") as f:
            f.write("\n" + "\n".join([f"`{cmd}`", "", *lines]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
