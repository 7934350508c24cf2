"""Calibrated int4 quantisation (GPTQ): the inputs every quantised weight sees on calibration text, as Hessians.

    model = small4_jax.from_pretrained(DIR, quantize="int4", calibration="calib.jsonl")
    python -m small4_jax.convert --from DIR --to OUT --quantize int4 --calibration calib.jsonl

For each quantised linear, H = sum_t x_t x_t^T over the calibration tokens' inputs x_t to it [K, K]; for the routed
experts one H per expert from the tokens routed to it, each token weighted by its routing weight squared (the
expert's output enters the layer's output times that weight), for gate_up from the token's hidden state and for down
from its activation act(x W_gate) * (x W_up). `quant.gptq_int4` then quantises each weight against its H.

The float model runs eagerly (no jit) over the calibration sequences, one at a time, with the linears and the
routed-expert dispatch observed through temporary wrappers of their classes' calls: nothing in model.py knows about
calibration. A layer's weights are named by their per-layer path ("layers", i, ...) as `nnx.iter_graph` gives it,
with i counted from the decoder layers' calls, so the names do not depend on how the layers are stored.

Calibration file: JSONL, one sequence per line, `{"text": "..."}` (tokenised with the checkpoint's tokenizer, BOS
first) or `{"ids": [1, 2, ...]}`. What the field uses: a few hundred sequences of in-domain text (GPTQ used 128
sequences of 2048 tokens); the sequences must not be the text you then evaluate on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from small4_jax.errors import ConfigError


def read_calibration(path: str | Path, tokenizer=None) -> list[list[int]]:
    """Token-id sequences of a calibration JSONL file (module docstring); errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file not found: {path}")
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("ids"), list) and row["ids"] and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in row["ids"]):
            out.append(list(row["ids"]))
        elif isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"]:
            if tokenizer is None:
                raise ConfigError(f"{where}: a \"text\" row needs a tokenizer (the checkpoint has none); "
                                  "give token ids as {\"ids\": [...]}")
            out.append(list(tokenizer.encode(row["text"], bos=True)))
        else:
            raise ConfigError(f"{where}: expected {{\"text\": non-empty string}} or {{\"ids\": non-empty list of "
                              "token ids}}")
    if not out:
        raise ConfigError(f"{path}: no calibration sequences")
    return out


def hessians(model, sequences: Sequence[Sequence[int]], max_len: int = 2048) -> dict[tuple, np.ndarray]:
    """{weight path: H} for every quantisable weight of the float `model` over `sequences` (module docstring).

    Paths are ("layers", i, ..., linear name, "kernel") [K, K] and ("layers", i, ..., "experts", "gate_up" | "down")
    [E, K, K], float64. Each sequence is cut to `max_len` tokens."""
    from small4_jax import model as m
    from small4_jax.moe import AtLayer
    from small4_jax.quant import QUANTISED_LINEARS

    vocab = model.config.vocab_size
    for s in sequences:
        if any(not 0 <= int(t) < vocab for t in s):
            raise ConfigError(f"calibration: token id out of range for a vocabulary of {vocab}")
    found: dict[tuple, np.ndarray] = {}
    names: dict[int, tuple] = {}  # id(module) -> its path, for the layer being run
    counter = {"layer": 0}
    num_layers = model.config.num_hidden_layers

    def layer_call(self, *args, **kwargs):
        i = counter["layer"] % num_layers
        counter["layer"] += 1
        for path, sub in nnx.iter_graph(self):
            if isinstance(sub, nnx.Module):
                names[id(sub)] = ("layers", i) + tuple(path)
        return layer_orig(self, *args, **kwargs)

    def concrete(x):
        if isinstance(x, jax.core.Tracer):
            raise RuntimeError("calibration.hessians: the model traced a layer (a jit or scan around the layers); "
                               "it needs the layers run one by one")
        return np.asarray(x, np.float64)

    def linear_call(self, x):
        path = names.get(id(self))
        if path is not None and path[-1] in QUANTISED_LINEARS:
            xs = concrete(x).reshape(-1, x.shape[-1])
            key = path + ("kernel",)
            found[key] = found.get(key, 0) + xs.T @ xs
        return linear_orig(self, x)

    current = {}

    def moe_call(self, x):
        current["path"] = names.get(id(self.experts))
        return moe_orig(self, x)

    def experts_call(x, expert_ids, expert_weights, gate_up, down, *, act=jax.nn.silu, **kwargs):
        path = current.get("path")
        if path is not None:
            gu = concrete(gate_up.get() if isinstance(gate_up, AtLayer) else gate_up)  # the layer's stack slice
            e, h, f2 = gu.shape
            f = f2 // 2
            xs, ids, wt = concrete(x), concrete(expert_ids).astype(np.int64), concrete(expert_weights)
            hg = found.setdefault(path + ("gate_up",), np.zeros((e, h, h)))
            hd = found.setdefault(path + ("down",), np.zeros((e, f, f)))
            for j in range(e):
                rows, slot = np.nonzero(ids == j)
                if rows.size == 0:
                    continue
                xe = xs[rows] * wt[rows, slot][:, None]  # weighted by the routing weight (squared in H)
                hg[j] += xe.T @ xe
                y = xs[rows] @ gu[j]
                a = np.asarray(act(jnp.asarray(y[:, :f], jnp.float32)), np.float64) * y[:, f:]
                a *= wt[rows, slot][:, None]
                hd[j] += a.T @ a
        return experts_orig(x, expert_ids, expert_weights, gate_up, down, act=act, **kwargs)

    layer_orig, linear_orig, moe_orig, experts_orig = (m.DecoderLayer.__call__, nnx.Linear.__call__,
                                                       m.MoE.__call__, m.routed_experts)
    scan = getattr(model, "scan_layers", None)
    m.DecoderLayer.__call__, nnx.Linear.__call__, m.MoE.__call__, m.routed_experts = (layer_call, linear_call,
                                                                                      moe_call, experts_call)
    try:
        if scan is not None:
            model.scan_layers = False  # a Python loop over the layers: concrete inputs, one layer at a time
        for s in sequences:
            model(jnp.asarray([list(s)[:max_len]], jnp.int32))
    finally:
        m.DecoderLayer.__call__, nnx.Linear.__call__, m.MoE.__call__, m.routed_experts = (layer_orig, linear_orig,
                                                                                          moe_orig, experts_orig)
        if scan is not None:
            model.scan_layers = scan
    return found


def load_calibrated(path, calibration, *, dtype="bfloat16", mesh=None, config=None, quantize: str | None = "int4"):
    """`from_pretrained(path, quantize="int4", calibration=...)`: the float model is loaded (in `dtype`, on `mesh`),
    run over the calibration sequences (a JSONL file, module docstring, or a list of token-id lists), and its
    linears and experts are quantised by GPTQ against the Hessians. The float model must fit where it is loaded
    (the layer-at-a-time pipeline that would not need that is not written)."""
    from small4_jax import quant
    from small4_jax.checkpoint import from_pretrained

    if quant.check_format(quantize) != "int4":
        raise ConfigError(f"calibration is for quantize='int4' (GPTQ); got quantize={quantize!r}")
    if isinstance(calibration, (str, Path)):
        from small4_jax.errors import TokenizerError
        from small4_jax.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(path)
        except TokenizerError:  # a checkpoint without a tokenizer: only {"ids"} rows can be read
            tok = None
        calibration = read_calibration(calibration, tok)
    model = from_pretrained(path, dtype=dtype, mesh=mesh, config=config, quantize="none")
    h = hessians(model, calibration)
    return quant.quantize_model(model, "int4", hessians=h)
