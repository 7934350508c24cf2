"""Temporaries of the engine's prefill step against the page-table width, from compiled GPU programs (deviceless).

    JAX_PLATFORMS=cpu python benchmarks/prefill_memory.py                   # widths 1024, 4096, 16384 pages
    JAX_PLATFORMS=cpu python benchmarks/prefill_memory.py --widths 256,16384 --target h200

One layer of Small 4 (configs/small4-119b.yaml), bf16, on 8 GPUs with the serve mesh (data=1, expert=8), the step
[prefill_batch, prefill_chunk] (default 4 x 256, the serve defaults) over a table of W pages of 16 tokens:
"expanded" is the previous engine prefill (`paged.forward(absorbed=False)`: the whole prefix gathered and expanded
through kv_b_proj, every score materialised), "absorbed" the engine's path now (latent attention over the pages in
place, `kernels/mla_decode`). A table of XLA's per-device temporaries; the absorbed column should not grow with W.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from small4_jax.tools import aot  # noqa: E402
from small4_jax.tools import aot_programs as ap  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="1024,4096,16384", help="page-table widths (pages of 16 tokens)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--target", choices=aot.TARGETS, default="h100")
    a = p.parse_args(argv)
    ok, why = aot.available()
    if not ok:
        print(f"deviceless GPU compile unavailable: {why}", file=sys.stderr)
        return 2
    from small4_jax.config import Small4Config

    config = Small4Config.from_yaml(ROOT / "configs" / "small4-119b.yaml").replace(num_hidden_layers=1)
    mesh = aot.gpu_mesh(a.target, {"data": 1, "expert": 8, "tensor": 1})
    print(f"| pages (tokens) | expanded temp GiB | absorbed temp GiB |  ({a.rows} x {a.chunk} prefill, one layer, "
          f"8 x {a.target.upper()})")
    print("|---|---|---|")
    for width in (int(w) for w in a.widths.split(",")):
        temp = []
        for absorbed in (False, True):
            program = ap.serve_step(config, mesh, absorbed=absorbed, rows=a.rows, tokens=a.chunk, table_pages=width,
                                    num_pages=width + 1)
            temp.append(program.compile().memory.temp / 2**30)
        print(f"| {width} ({width * 16}) | {temp[0]:.3f} | {temp[1]:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
