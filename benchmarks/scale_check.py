"""Teacher-forced negative log-likelihood of a data set under several attention softmax scales, side by side.

The sources disagree on Mistral Small 4's softmax scale (ARCHITECTURE.md §6.1, README "Numerics"): the plain
1/sqrt(qk_head_dim) = 0.0884 (our default, Mistral's native `apply_scale: false`) or transformers' mscale^2 one,
0.195. Whoever has the weights settles it with this: the scale under which the model predicts real text better is
the one it was trained with.

    python benchmarks/scale_check.py --checkpoint /models/Mistral-Small-4-119B-2603 --data held_out.jsonl \\
        --mesh data=1,expert=8,tensor=1
    python benchmarks/scale_check.py --checkpoint DIR --data FILE.jsonl --layers 4 --quantize none --dtype float32
        # CPU, slowly: the first 4 layers only (a truncated model is no language model; its NLL only compares)

--data: JSONL in the fine-tuning formats (train/data.py): {"text": ...} rows score every token, {"messages": ...}
rows the assistant's. The scales: "plain", "mscale2" (exactly transformers' current value) and any --scales given
(numbers or those names). One line per scale: the scale, the mean NLL per scored token, its perplexity, the
difference from the first scale's NLL.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from small4_jax.ckpt.load import checkpoint_config, default_quantize, from_pretrained, load_weights  # noqa: E402
from small4_jax.ckpt.safetensors_io import CheckpointReader  # noqa: E402
from small4_jax.errors import Small4Error  # noqa: E402
from small4_jax.runtime import parse_softmax_scale  # noqa: E402
from small4_jax.inputs.tokenizer import load_tokenizer  # noqa: E402
from train.data import load_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF, Mistral-native or converted checkpoint directory")
    p.add_argument("--data", required=True, action="append", help="JSONL file (repeatable)")
    p.add_argument("--scales", default="", help="more scales, comma-separated: numbers, plain, mscale2")
    p.add_argument("--layers", type=int, default=None, help="use only the first N layers (CPU runs)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--quantize", default=None, help="weight format in memory (small4_jax.quant.formats; default: the "
                   "checkpoint's: FP8 stays FP8)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--max-rows", type=int, default=None, help="score at most this many packed rows")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=1,expert=8,tensor=1 (default: one device)")
    return p.parse_args(argv)


class FirstLayers:
    """A checkpoint reader showing only the text layers below `n` (a truncated model: `--layers`)."""

    def __init__(self, reader, n: int):
        self.reader, self.n = reader, n

    def _kept(self, name: str) -> bool:
        parts = name.split(".")
        return not (parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= self.n)

    def names(self) -> list[str]:
        return [x for x in self.reader.names() if self._kept(x)]

    def __contains__(self, name: str) -> bool:
        return self._kept(name) and name in self.reader

    def __getattr__(self, name):
        return getattr(self.reader, name)


def load(a: argparse.Namespace, config, mesh):
    """The model: `from_pretrained`, or with --layers the first layers of an HF / native directory."""
    if a.layers is None:
        return from_pretrained(a.checkpoint, dtype=a.dtype, mesh=mesh, config=config, quantize=a.quantize)
    if not (Path(a.checkpoint) / "config.json").is_file() and not (Path(a.checkpoint) / "params.json").is_file():
        raise Small4Error(f"{a.checkpoint}: --layers reads an HF or Mistral-native directory (config.json or "
                          "params.json), not a converted one")
    reader = CheckpointReader(a.checkpoint, vision=False)
    try:
        source = FirstLayers(reader, config.num_hidden_layers)
        quantize = a.quantize if a.quantize is not None else default_quantize(source)
        return load_weights(config, source, dtype=a.dtype, mesh=mesh, where=a.checkpoint, quantize=quantize)
    finally:
        reader.close()


def scales_of(text: str) -> list:
    out = ["plain", "mscale2"]
    for s in (t.strip() for t in text.split(",")):
        if s:
            v = parse_softmax_scale(s, "--scales")
            if v not in out:
                out.append(v)
    return out


def set_runtime_scale(model, scale) -> float:
    """Point every module of `model` that holds the text config at one with `softmax_scale = scale`; returns the
    resolved scale. Weights stay where they are (no reload between scales)."""
    old = model.config
    new = old.with_runtime(softmax_scale=scale)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Module) and getattr(m, "config", None) is old:
            m.config = new
    return new.attn_softmax_scale


_row_loss = jax.jit(lambda graphdef, state, *a: nnx.merge(graphdef, state).token_loss(
    a[0], a[1], a[2], positions=a[3], segment_ids=a[4]), static_argnums=0)


def nll(model, data, rows: int) -> tuple[float, float]:
    """(sum of weighted token NLL, sum of weights) over the first `rows` packed rows, one row a forward."""
    graphdef, state = nnx.split(model)
    total = count = 0.0
    for i in range(rows):
        b = data.take(np.array([i]))
        t, c = _row_loss(graphdef, state, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]),
                         jnp.asarray(b["weights"]), jnp.asarray(b["positions"]), jnp.asarray(b["segments"]))
        total, count = total + float(t), count + float(c)
    return total, count


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        scales = scales_of(a.scales)
        config = checkpoint_config(a.checkpoint)
        if a.layers is not None:
            if not 0 < a.layers <= config.num_hidden_layers:
                raise Small4Error(f"--layers {a.layers}: expected 1 to {config.num_hidden_layers}")
            config = config.replace(num_hidden_layers=a.layers,
                                    first_k_dense_replace=min(config.first_k_dense_replace, a.layers))
        config = config.replace(vision=None)  # text only: the data are text
        tokenizer = load_tokenizer(a.tokenizer or a.checkpoint)
        data, stats = load_dataset(a.data, tokenizer, a.seq_len, seed=0)
        rows = len(data) if a.max_rows is None else min(a.max_rows, len(data))
        mesh = None
        if a.mesh:
            from small4_jax.parallel.sharding import make_mesh

            mesh = make_mesh(a.mesh, "--mesh")
        t0 = time.time()
        model = load(a, config, mesh)
        print(f"loaded {a.checkpoint} ({config.num_hidden_layers} layers, {a.dtype}) in {time.time() - t0:.0f} s; "
              f"{rows} rows of {a.seq_len}, {int(data.weights[:rows].sum())} scored tokens", file=sys.stderr)
        results = []
        for scale in scales:
            value = set_runtime_scale(model, scale)
            t0 = time.time()
            total, count = nll(model, data, rows)
            results.append((scale, value, total / max(count, 1.0), count, time.time() - t0))
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n### softmax scale check: {a.checkpoint}, {config.num_hidden_layers} layers, {a.dtype}, "
          f"{int(results[0][3])} scored tokens ({', '.join(a.data)})\n")
    print("| --softmax-scale | scale | NLL / token | perplexity | vs first | seconds |")
    print("|---|---|---|---|---|---|")
    first = results[0][2]
    for scale, value, mean, _, secs in results:
        print(f"| {scale} | {value:.6f} | {mean:.4f} | {math.exp(min(mean, 700)):.3f} | {mean - first:+.4f} | "
              f"{secs:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
