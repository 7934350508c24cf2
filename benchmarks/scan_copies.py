"""Which layer weights a compiled GPU serving step copies every layer, under XLA options or with the layers unrolled.

    JAX_PLATFORMS=cpu python benchmarks/scan_copies.py                # decode 16x1, 2 layers, 8 x H200, all variants
    JAX_PLATFORMS=cpu python benchmarks/scan_copies.py --layers 36 --variants default

The decoder layers are stacked and run under `lax.scan` (model.run_layers). The routed experts' stacks are read in
place by the grouped-matmul kernel (`moe.AtLayer`); every other stacked weight reaches XLA's GEMMs and elementwise
fusions through a dynamic-slice of the stack in the loop body. This compiles the engine's step
(`aot_programs.serve_step`, deviceless) once per variant and lists the arrays the compiled program writes
(`aot.Compiled.written_arrays`) that have the shape of one layer's per-device slice of a stacked weight: a copy of
that layer's weight, made each layer of each step. Per step = the copied bytes of one layer x the config's depth.

Variants: "default" (what our programs compile with), XLA options that could remove the copies ("ds-fusion":
dynamic-slice fusion, which lets a cuBLAS GEMM read its operand at an offset; "cublas": XLA's GEMMs on cuBLAS instead
of Triton; "cublas+ds-fusion"; "xla-unroll": XLA unrolls the while loop; "double-buffer": XLA's loop double
buffering), "unrolled" (`scan_layers=False`: a Python loop over static slices, the compile time the scan saves), and
"dense-gmm" (`dense_impl: gmm`: the dense projections read their stacks in place through the grouped-matmul kernel,
model.run_layers; what remains is absorbed MLA's kv_b, which it folds into the query as a per-head weight).
Results and the compiled-HLO evidence: benchmarks/RESULTS.md, "Dense weights under the layer scan".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from small4_jax.tools import aot  # noqa: E402
from small4_jax.tools import aot_programs as ap  # noqa: E402
from small4_jax.quant.formats import SPELLINGS  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "configs" / "small4-119b.yaml"
VARIANTS = {  # name -> (XLA options, scan the layers, config.dense_impl)
    "default": ({}, True, "xla"),
    "ds-fusion": ({"xla_gpu_enable_dynamic_slice_fusion": True}, True, "xla"),
    "cublas": ({"xla_gpu_enable_triton_gemm": False}, True, "xla"),
    "cublas+ds-fusion": ({"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dynamic_slice_fusion": True}, True,
                         "xla"),
    "xla-unroll": ({"xla_gpu_enable_while_loop_unrolling": "WHILE_LOOP_UNROLLING_FULL_UNROLL"}, True, "xla"),
    "double-buffer": ({"xla_gpu_enable_while_loop_double_buffering": True}, True, "xla"),
    "unrolled": ({}, False, "xla"),
    "dense-gmm": ({}, True, "gmm"),
}
MIN_BYTES = 64 * 1024  # smaller layer slices (norm weights, 8 KiB) are left out: too small to matter, too easy to alias


def layer_slices(state) -> dict[tuple[int, ...], list[str]]:
    """Per-device shape of one layer of each stacked weight (with and without the leading 1; for a quantised weight
    also the shapes of its dequantised copy) -> the weights' names."""
    from flax import nnx

    from small4_jax.quant.formats import int4_group, is_quantised_dtype, logical_shape

    shapes = defaultdict(list)
    for path, var in nnx.to_flat_state(state):
        names = [str(p) for p in path]
        if names[0] != "layer_stacks":
            continue
        x = var.get_raw_value() if hasattr(var, "get_raw_value") else var
        shard = tuple(x.sharding.shard_shape(x.shape))
        name = ".".join(n for n in names[2:] if n not in ("kernel", "weight"))
        layer = {shard[1:]}
        if is_quantised_dtype(x.dtype):  # + the dequantised [K, N] (int4: [K / group, group, N], as qdot makes it)
            *lead, k, n = logical_shape(shard, x.dtype)[1:]
            layer |= {(*lead, k, n)} | ({(*lead, k // int4_group(k), int4_group(k), n)} if k != shard[-2] else set())
        for shape in layer | {(1, *s) for s in layer}:
            if name not in shapes[shape]:
                shapes[shape].append(name)
    return shapes


def measure(program: ap.Program, options: dict, depth: int, layers: int) -> dict:
    """Compile `program` (`layers` layers) with XLA `options`; the layer-weight copies it makes per layer."""
    slices = layer_slices(program.args[0])
    t0 = time.perf_counter()
    try:
        c = program.compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", seconds=time.perf_counter() - t0)
    copies = [a for a in c.written_arrays(MIN_BYTES) if a.shape in slices]
    if any(a.writes is None for a in copies):
        return dict(error="a copy sits in a loop of unknown trip count", seconds=c.seconds)
    per_layer = sum(a.bytes * a.writes for a in copies) / layers
    names = sorted({"/".join(slices[a.shape]) for a in copies})
    return dict(temp=c.memory.temp, copies=sum(a.writes for a in copies) / layers, per_layer=per_layer,
                per_step=per_layer * depth, names=names, seconds=c.seconds)


def main(argv=None) -> int:
    from small4_jax.config import Small4Config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="layers to compile (the copies are per layer)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--target", choices=aot.TARGETS, default="h200")
    p.add_argument("--rows", type=int, default=16, help="decode batch (the serve default max_batch)")
    p.add_argument("--tokens", type=int, default=1, help="tokens per row: 1 = a decode step, more = a prefill chunk")
    p.add_argument("--quantize", choices=SPELLINGS, help="weights in this format (small4_jax.quant.formats policies)")
    p.add_argument("--activations", choices=("fp8",), help="W8A8: fp8 activations (with --quantize fp8)")
    a = p.parse_args(argv)
    ok, why = aot.available()
    if not ok:
        print(f"deviceless GPU compile unavailable: {why}", file=sys.stderr)
        return 2
    full = Small4Config.from_yaml(MODEL)
    config = full.replace(num_hidden_layers=a.layers)
    mesh = aot.gpu_mesh(a.target, {"data": 1, "expert": 8, "tensor": 1})
    weights = (a.quantize or "bf16") + (" W8A8" if a.activations else "")
    print(f"# serve step {a.rows}x{a.tokens} (absorbed MLA, {weights}), {a.layers} layers compiled, "
          f"8 x {a.target.upper()} (expert=8), jax {jax.__version__}; per step = per layer x {full.num_hidden_layers} "
          "layers")
    print("| variant | compiles | temp MiB | layer-weight copies / layer | MiB / layer | GiB / step | copied | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.variants:
        options, scanned, dense = VARIANTS[name]
        program = ap.serve_step(config.replace(dense_impl=dense), mesh, absorbed=True, rows=a.rows, tokens=a.tokens,
                                table_pages=64, num_pages=1024, quantize=a.quantize, scan_layers=scanned,
                                activations=a.activations)
        r = measure(program, options, full.num_hidden_layers, a.layers)
        if "error" in r:
            print(f"| {name} | no: {r['error']} | | | | | | {r['seconds']:.0f} |", flush=True)
            continue
        print(f"| {name} | yes | {r['temp'] / 2**20:.1f} | {r['copies']:g} | {r['per_layer'] / 2**20:.1f} | "
              f"{r['per_step'] / 2**30:.2f} | {', '.join(r['names'])} | {r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
