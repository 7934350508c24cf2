"""Peak host memory of `python -m small4_jax.convert` on a synthetic multi-file checkpoint.

    python benchmarks/convert_memory.py                # ~2 GB bf16 checkpoint in 8 files (the acceptance case)
    python benchmarks/convert_memory.py --layers 2 --hidden 256 --experts 8 --moe-intermediate 128 --vocab 4096

The conversion runs in a fresh process (`small4_jax.tools.convert.main`), whose peak RSS (VmHWM) is
compared with the largest tensor and the checkpoint total. The goal: peak under 600 MB for the 2 GB checkpoint,
i.e. about one tensor plus the interpreter, JAX and TensorStore.

    python benchmarks/convert_memory.py --gptq 8x128 --layers 2 ...   # --quantize int4 --calibration (8 x 128 ids)

With `--gptq SxT` the conversion is the layer-at-a-time GPTQ pipeline on S random sequences of T tokens; its peak
should follow one layer in float32 (+ its Hessians and the hidden states), not the model: compare runs that differ
only in --layers.
"""

from __future__ import annotations

import argparse
import math
import os
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_ckpt import add_shape_args, tensor_shapes, write_checkpoint

MB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, layers=6, hidden=1024, experts=64, moe_intermediate=768, vocab=32768, shards=8)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "f32"])
    p.add_argument("--dir", help="where to write (default: a temporary directory, removed after)")
    p.add_argument("--gptq", metavar="SxT", help="--quantize int4 --calibration: S random sequences of T tokens")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        src, out = Path(tmp) / "hf", Path(tmp) / "converted"
        info = write_checkpoint(a, src)
        extra = ["--dtype", a.dtype]
        if a.gptq:
            seqs, tokens = (int(x) for x in a.gptq.split("x"))
            cal = Path(tmp) / "calib.jsonl"
            rng = __import__("numpy").random.default_rng(0)
            cal.write_text("".join(json.dumps({"ids": rng.integers(0, a.vocab, tokens).tolist()}) + "\n"
                                   for _ in range(seqs)))
            extra = ["--dtype", "f32" if a.dtype == "f32" else "bf16", "--quantize", "int4", "--calibration", str(cal)]
        t = time.perf_counter()
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from synthetic_ckpt import peak_rss_bytes; "
                "from small4_jax.tools.convert import main; rc = main(sys.argv[2:]); "
                "print(json.dumps({'rc': rc, 'peak': peak_rss_bytes()}))")
        proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), "--from", str(src), "--to",
                               str(out), *extra, "--quiet"], cwd=REPO, env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - t
        if proc.returncode != 0 or not proc.stdout.strip():
            print(proc.stderr, file=sys.stderr)
            return proc.returncode or 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["rc"] != 0:
            print(proc.stderr, file=sys.stderr)
            return result["rc"]
        peak = result["peak"]
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    layer = sum(4 * math.prod(shape) for name, shape in tensor_shapes(a).items() if ".layers.0." in name)
    how = " ".join(extra[:-1] + [a.gptq] if a.gptq else extra)
    print(f"convert {how}: {info['tensors']} tensors in {a.shards} files, {seconds:.1f} s "
          f"({info['total'] / MB / seconds:.0f} MiB/s)")
    print(f"{'quantity':<52} {'MiB':>10}")
    for name, v in (("checkpoint total", info["total"]), (f"largest tensor ({info['largest_name']})", info["largest"]),
                    ("converted checkpoint on disk", written), ("peak RSS of the conversion process", peak),
                    ("one layer in float32", layer)):
        print(f"{name:<52} {v / MB:>10.1f}")
    print(f"{'peak / largest tensor':<52} {peak / info['largest']:>10.2f}")
    print(f"{'peak / checkpoint total':<52} {peak / info['total']:>10.2f}")
    print(f"{'under 600 MB':<52} {'yes' if peak < 600 * 1e6 else 'NO':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
