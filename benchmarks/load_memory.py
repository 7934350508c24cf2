"""Peak host memory of `from_pretrained` against the largest tensor and the total checkpoint size.

    python benchmarks/load_memory.py                      # ~1 GB synthetic bf16 checkpoint in 4 files
    python benchmarks/load_memory.py --layers 2 --hidden 256 --experts 8 --moe-intermediate 128 --vocab 4096

It writes a synthetic multi-file HF checkpoint (random bf16 tensors, Mistral Small 4 layout), then loads it with
`small4_jax.from_pretrained` in a fresh process and reports that process's RSS before the load, its peak during the
load (VmHWM) and after it. On a CPU backend the loaded parameters themselves live in host memory, so what the
loader costs on top of the model is `peak - after` (the transient), which should stay near one tensor (the largest
one, plus its transposed copy); on a GPU the parameters leave host memory as they are placed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_ckpt import add_shape_args, peak_rss_bytes, write_checkpoint

MB = 1 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: str) -> None:
    """Child process: load `path` and print the memory figures as JSON."""
    import jax

    import small4_jax

    jax.devices()
    before = _rss_bytes()
    t = time.perf_counter()
    model = small4_jax.from_pretrained(path, dtype="bfloat16")
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    seconds = time.perf_counter() - t
    print(json.dumps({"before": before, "peak": peak_rss_bytes(), "after": _rss_bytes(), "seconds": seconds,
                      "backend": jax.default_backend()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, layers=4, hidden=1024, experts=64, moe_intermediate=512, vocab=32768, shards=4)
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory, removed after)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure:
        measure(a.measure)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.dir or tmp) / "ckpt"
        info = write_checkpoint(a, out)
        proc = subprocess.run([sys.executable, __file__, "--measure", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        m = json.loads(proc.stdout.strip().splitlines()[-1])
    transient = max(m["peak"] - m["after"], 0)  # statm and ru_maxrss differ by a few pages
    rows = [
        ("checkpoint total", info["total"]),
        (f"largest tensor ({info['largest_name']})", info["largest"]),
        ("RSS before load", m["before"]),
        ("RSS peak during load", m["peak"]),
        ("RSS after load (model resident on the CPU backend)", m["after"]),
        ("loader transient = peak - after", transient),
    ]
    print(f"from_pretrained memory, {info['tensors']} tensors in {a.shards} files, backend {m['backend']}, "
          f"{m['seconds']:.1f} s")
    print(f"{'quantity':<58} {'MiB':>10}")
    for name, v in rows:
        print(f"{name:<58} {v / MB:>10.1f}")
    print(f"{'transient / largest tensor':<58} {transient / info['largest']:>10.2f}")
    print(f"{'transient / checkpoint total':<58} {transient / info['total']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
