"""Calibrated int4 quantisation (GPTQ), one decoder layer at a time.

    model = small4_jax.from_pretrained(DIR, quantize="int4", calibration="calib.jsonl")
    python -m small4_jax.convert --from DIR --to OUT --quantize int4 --calibration calib.jsonl [--gptq-act-order]

The sequential pipeline of the GPTQ paper: the calibration tokens are embedded once (`embed`: hidden states [N, H]
of every token), then for each layer in order (`calibrate_layer`): the layer's float weights alone are held (read
from the checkpoint by `checkpoint.load_layer`, or copied out of an in-memory model by `layer_copy`), the hidden
states run through it while the inputs of every quantisable weight are gathered as Hessians, each weight is
quantised by `quant.gptq_int4` against its own, and the hidden states run through the QUANTISED layer to become
the next layer's inputs, so later layers are calibrated on what the quantised model will feed them. The converter
writes each layer as it is done and saves the hidden states between layers (resumable, `convert._write_calibrated`):
memory holds one float layer, its Hessians and the hidden states, never the model.

Hessians: for each quantised linear, H = sum_t x_t x_t^T over its calibration inputs x_t [K, K]; for the routed
experts one H per expert from the tokens routed to it, each token weighted by its routing weight squared (the
expert's output enters the layer's output times that weight), for gate_up from the token's hidden state and for down
from its activation act(x W_gate) * (x W_up) (the per-expert sums by `kernels.tgmm` over the tokens sorted by expert).
They are gathered by running the model's own layer code (jit-compiled, float32) with the linears and the routed
experts observed through temporary wrappers of their calls (`_observed`): nothing in model.py knows about
calibration. Weights are named by their path in the layer, as `nnx.iter_graph` gives it.

Calibration file: JSONL, one sequence per line, `{"text": "..."}` (tokenised with the checkpoint's tokenizer, BOS
first) or `{"ids": [1, 2, ...]}`. What the field uses: a few hundred sequences of in-domain text (GPTQ used 128
sequences of 2048 tokens); the sequences must not be the text you then evaluate on.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from small4_jax.errors import ConfigError, TokenizerError
from small4_jax.inputs.tokenizer import load_tokenizer
from small4_jax.kernels import gmm, tgmm
from small4_jax.nn import moe
from small4_jax.nn.layers import tapping
from small4_jax.nn.model import Shared, layer_groups, rope_cos_sin, stack_modules
from small4_jax.nn.qlinear import quantize_model
from small4_jax.quant import formats as quant
from small4_jax.quant.formats import QUANTISED_LINEARS


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


def check_tokens(sequences: Sequence[Sequence[int]], vocab: int, max_len: int) -> list[list[int]]:
    """The sequences cut to `max_len` tokens; a token id outside the vocabulary is a ConfigError."""
    out = [list(map(int, s))[:max_len] for s in sequences]
    if not out or any(not s for s in out):
        raise ConfigError("calibration: no tokens (every sequence needs at least one)")
    for s in out:
        if any(not 0 <= t < vocab for t in s):
            raise ConfigError(f"calibration: token id out of range for a vocabulary of {vocab}")
    return out


def embed(table, sequences: list[list[int]]) -> jax.Array:
    """The calibration hidden states entering layer 0: rows of the embedding `table` [V, H] for every token of
    every sequence, concatenated [N, H] in float32 (sequence s is rows sum(len[:s]) ... + len(s))."""
    ids = np.concatenate([np.asarray(s, np.int64) for s in sequences])
    return jnp.asarray(np.asarray(table)[ids], jnp.float32)


_BATCH_TOKENS = 8192  # calibration tokens per layer call (equal-length sequences batched together)


def _batches(sequences: list[list[int]]) -> list[tuple[int, int, int]]:
    """(first row of h, sequences, tokens each): runs of consecutive equal-length sequences, up to _BATCH_TOKENS."""
    out, row = [], 0
    for s in sequences:
        t = len(s)
        if out and out[-1][2] == t and (out[-1][1] + 1) * t <= _BATCH_TOKENS:
            out[-1] = (out[-1][0], out[-1][1] + 1, t)
        else:
            out.append((row, 1, t))
        row += t
    return out


@contextlib.contextmanager
def _observed(layer, acc: dict, dense: bool = True):
    """Within the block, calls of `layer`'s quantisable linears add x^T x of their inputs to acc[path + ("kernel",)]
    (only with `dense`: GPTQ needs them where the policy puts the dense linears in int4) and its routed experts add
    one H per expert (module docstring) to acc[path + ("gate_up" | "down",)]; paths are relative to the layer. It
    listens at the model's interception points (`nn.layers.tapping`); works traced (inside jit) and eagerly."""
    names = {id(sub): tuple(map(str, path)) for path, sub in nnx.iter_graph(layer) if isinstance(sub, nnx.Module)}

    def add(key, value):
        acc[key] = value if acc.get(key) is None else acc[key] + value

    def linear_input(path, x):
        if dense and path[-1] in QUANTISED_LINEARS:
            xs = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            add(path + ("kernel",), xs.T @ xs)

    def experts_input(path, x, expert_ids, expert_weights, gate_up, down, act):
        e, _, f2 = gate_up.shape
        f, k = f2 // 2, expert_ids.shape[-1]
        backend = {"pallas": "pallas"}.get(moe.resolve_impl("auto", x), "ragged_dot")
        d = moe.sort_by_expert(expert_ids, e)
        xs = x.astype(jnp.float32)[d.order // k]  # token rows in expert order
        wt = expert_weights.reshape(-1)[d.order].astype(jnp.float32)[:, None]
        xw = xs * wt  # weighted by the routing weight (squared in H)
        add(path + ("gate_up",), tgmm(xw, xw, d.group_sizes, backend=backend))
        y = gmm(xs, gate_up.astype(jnp.float32), d.group_sizes, backend=backend)
        a = act(y[:, :f]) * y[:, f:] * wt
        add(path + ("down",), tgmm(a, a, d.group_sizes, backend=backend))

    def observe(point, module, *arrays):
        path = names.get(id(module))
        if path is not None:
            (linear_input if point == "linear" else experts_input)(path, *arrays)

    with tapping(observe):
        yield


def _rope(config, b: int, t: int):
    """(positions [b, t], (cos, sin)) of b sequences of t tokens from position 0."""
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    return positions, rope_cos_sin(config, positions)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=5)
def _collect(graphdef, state, h, positions, rope, acc, dense: bool = True):
    """acc + the Hessians of one batch of calibration inputs h [B, T, H] to the float layer (graphdef, state); the
    dense linears' only with `dense` (`_observed`)."""
    layer = nnx.merge(graphdef, state)
    acc = dict(acc)
    with _observed(layer, acc, dense), jax.default_matmul_precision("float32"):
        layer(h, positions, *rope)
    return acc


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, h, positions, rope):
    with jax.default_matmul_precision("float32"):
        return nnx.merge(graphdef, state)(h, positions, *rope)[0]


def calibrate_layer(layer, h: jax.Array, sequences: list[list[int]], *, quantize: str = "int4",
                    act_order: bool = False):
    """One step of the sequential pipeline: (layer quantised by GPTQ, the next layer's calibration inputs).

    `layer` is one float DecoderLayer (unstacked: `layer_copy(model, i)` or `checkpoint.load_layer`), `h` [N, H]
    its inputs on the calibration `sequences` (`embed`, then this function's output). Its Hessians (module
    docstring) are collected over `h`, and the layer is quantised in place to `quantize` (`quant.policy`: for "int4"
    the experts int4 and the dense linears int8, "int4-all" int4 everywhere), each int4 weight by `quant.gptq_int4`
    against its own H, int8 ones rounded to nearest, and `h` is run through the QUANTISED layer, so the
    next layer is calibrated on the inputs it will see in the quantised model (later layers absorb the error of
    earlier ones, as in the GPTQ paper). Sequences run in batches of equal length, jit-compiled once per layer kind
    and batch shape, on jax's default device (an accelerator when there is one)."""
    config = layer.self_attn.config
    batches = _batches(sequences)
    graphdef, state = nnx.split(layer)
    dtype = jax.tree.leaves(state)[0].dtype

    def rows(row0, b, t):
        return h[row0:row0 + b * t].reshape(b, t, -1).astype(dtype)

    dense = getattr(quant.policy(quantize), "dense", None) == "int4"  # int8 dense linears round to nearest: no Hessian needed
    row0, b, t = batches[0]
    shapes = jax.eval_shape(lambda s, x, p, r: _collect(graphdef, s, x, p, r, {}, dense), state, rows(row0, b, t),
                            *_rope(config, b, t))
    acc = {key: jnp.zeros(v.shape, jnp.float32) for key, v in shapes.items()}
    for row0, b, t in batches:
        acc = _collect(graphdef, state, rows(row0, b, t), *_rope(config, b, t), acc, dense)
    quantize_model(layer, quantize, hessians=acc, act_order=act_order)
    del acc
    graphdef, state = nnx.split(layer)
    out = [_forward(graphdef, state, rows(row0, b, t), *_rope(config, b, t)).reshape(b * t, -1)
           for row0, b, t in batches]
    return layer, jnp.concatenate(out).astype(jnp.float32)


def layer_copy(model, i: int):
    """Layer i of `model` as an ordinary unstacked module (a writable copy of slice i - start of its stack)."""
    for stack, (start, n) in zip(model.layer_stacks, layer_groups(model.config)):
        if start <= i < start + n:
            graphdef, shared, params = nnx.split(stack, Shared, ...)
            return nnx.merge(graphdef, shared, jax.tree.map(lambda x: x[i - start], params))
    raise IndexError(f"layer {i} out of range")


def quantize_in_memory(model, sequences: Sequence[Sequence[int]], *, quantize: str = "int4", act_order: bool = False,
                       max_len: int = 2048):
    """GPTQ of a float model held whole (small models; the converter streams the layers from the checkpoint
    instead, `convert --quantize int4 --calibration`): the same sequential pipeline (`calibrate_layer`) over copies
    of its layers, the quantised layers then stacked back into `model.layer_stacks`. Returns the model, quantised
    in place."""
    config = model.config
    sequences = check_tokens(sequences, config.vocab_size, max_len)
    h = embed(model.embed_tokens.embedding[...], sequences)
    quantised = []
    for i in range(config.num_hidden_layers):
        layer, h = calibrate_layer(layer_copy(model, i), h, sequences, quantize=quantize, act_order=act_order)
        quantised.append(layer)
    model.layer_stacks = nnx.List([stack_modules(quantised[start:start + n]) for start, n in layer_groups(config)])
    return model


def read_sequences(path, calibration) -> list[list[int]]:
    """Calibration token-id sequences from a JSONL file (tokenised with the checkpoint's tokenizer at `path`, if it
    has one) or given as lists of ids."""
    if isinstance(calibration, (str, Path)):
        try:
            tok = load_tokenizer(path)
        except TokenizerError:  # a checkpoint without a tokenizer: only {"ids"} rows can be read
            tok = None
        return read_calibration(calibration, tok)
    return [list(map(int, s)) for s in calibration]
