"""Compile time of the model's forward with the layers scanned vs unrolled, deviceless for 8 x H200 (`small4_jax/tools/aot.py`).

    JAX_PLATFORMS=cpu python benchmarks/compile_time.py --layers 2 4 8        # a few depths (minutes)
    JAX_PLATFORMS=cpu python benchmarks/compile_time.py --layers 36           # the model (the unrolled one: 13+ min)
    JAX_PLATFORMS=cpu python benchmarks/compile_time.py --layers 36 --scanned-only

The program is `aot_programs.model_forward` (logits of one 4096-token sequence, the prefill / scoring forward) at the
released dimensions (`configs/small4-119b.yaml`, bf16, the README's mesh data=1, expert=8, tensor=1), compiled for
sm_90a on compile-only devices. Both variants are the same model and the same parameters (stacked per layer group,
`model.run_layers`): "scanned" runs the layer function under `jax.lax.scan` (the default), "unrolled" in a Python loop
over slices of the stacked parameters (`model.scan_layers = False`), which is what the model compiled like before
the layers were stacked. Seconds are wall time of lowering + compiling (`aot.Compiled.seconds`), one compile each; on
a shared machine they are noisy, the ratio less so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def compile_seconds(layers: int, scan: bool, tokens: int) -> float:
    from small4_jax.tools import aot
    from small4_jax.tools import aot_programs as ap
    from small4_jax.config import Small4Config

    config = Small4Config.from_yaml(ROOT / "configs" / "small4-119b.yaml").replace(num_hidden_layers=layers,
                                                                                  vision=None)
    mesh = aot.gpu_mesh("h200", {"data": 1, "expert": 8, "tensor": 1})
    t0 = time.perf_counter()
    program = ap.model_forward(config, mesh, tokens, scan_layers=scan)
    program.compile()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="depths to compile (default 2 4 8)")
    p.add_argument("--tokens", type=int, default=4096, help="sequence length of the forward (default 4096)")
    p.add_argument("--scanned-only", action="store_true", help="skip the unrolled compiles")
    a = p.parse_args(argv)
    from small4_jax.tools import aot

    ok, why = aot.available()
    if not ok:
        print(f"error: deviceless GPU compiles are unavailable here: {why}", file=sys.stderr)
        return 2
    import jax

    print(f"forward 1x{a.tokens}, configs/small4-119b.yaml dims, bf16, 8 x H200 (deviceless sm_90a), "
          f"mesh data=1,expert=8,tensor=1, jax {jax.__version__}")
    print("| layers | unrolled s | scanned s | unrolled / scanned |")
    print("|---|---|---|---|")
    for n in a.layers:
        scanned = compile_seconds(n, True, a.tokens)
        unrolled = None if a.scanned_only else compile_seconds(n, False, a.tokens)
        ratio = "-" if unrolled is None else f"{unrolled / scanned:.1f}x"
        u = "-" if unrolled is None else f"{unrolled:.1f}"
        print(f"| {n} | {u} | {scanned:.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
