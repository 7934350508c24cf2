"""`from_pretrained`: a checkpoint directory into a model, one tensor at a time.

The model is first built abstractly (shapes only). For each parameter we know the canonical checkpoint name and the
HF shape it must have; the whole checkpoint is checked against that plan before anything is read, so missing,
unexpected and mis-shaped tensors come back as one error listing all of them. Then each tensor is read (dequantised
if FP8), transposed to our [in, out] layout and put straight onto its device and sharding, so peak host memory stays
near the largest single tensor.

Reading the files (HF or Mistral-native safetensors, prefixes, FP8 scales) is `safetensors_io.CheckpointReader`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from small4_jax.quant import formats as quant
from small4_jax.config import Small4Config, load_config
from small4_jax.errors import CheckpointError
from small4_jax.nn.model import Small4ForCausalLM, abstract_model
from small4_jax.parallel.sharding import sharding_for

log = logging.getLogger("small4_jax")


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str, dtype=np.float32) -> np.ndarray: ...


Transform = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _t2(x: np.ndarray) -> np.ndarray:
    return x.T


def _t3(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 1)


def is_stacked(path) -> bool:
    """Whether the parameter at `path` belongs to a layer stack (leading layer axis; model.layer_groups)."""
    return len(path) > 2 and str(path[0]) == "layer_stacks"


def _stack_starts(model_state) -> dict[str, int]:
    """Stack index -> its first layer, from the stacks' leading dims (stacks hold consecutive layers in order)."""
    counts: dict[int, int] = {}
    for path, value in nnx.to_flat_state(model_state):
        if is_stacked(path):
            counts.setdefault(int(str(path[1])), value.shape[0])
    starts, start = {}, 0
    for g in sorted(counts):
        starts[str(g)], start = start, start + counts[g]
    return starts


def checkpoint_plan(model_state) -> dict[tuple, tuple[str | tuple[str, ...], tuple[int, ...], Transform]]:
    """Our parameter path -> (canonical checkpoint name, shape it has in the checkpoint, transform to our layout).

    A layer stack's parameter [n, ...] (model.py) maps to the n per-layer tensors `layers.{start + j}.<name>`: its
    entry holds the tuple of their names and the shape and transform of one layer (slice j <-> layer start + j)."""
    plan = {}
    starts = _stack_starts(model_state)
    for path, value in nnx.to_flat_state(model_state):
        shape = tuple(value.shape)
        names = [str(p) for p in path]
        stacked = is_stacked(path)
        if stacked:
            shape, names = shape[1:], names[2:]
        leaf, parent = names[-1], names[-2]
        if parent == "embed_tokens":
            entry = ("embed_tokens.weight", shape, _identity)
        elif parent == "experts":
            hf = {"gate_up": "gate_up_proj", "down": "down_proj"}[leaf]
            entry = (".".join(names[:-1] + [hf]), (shape[0], shape[2], shape[1]), _t3)
        elif leaf == "kernel":
            entry = (".".join(names[:-1] + ["weight"]), shape[::-1], _t2)
        elif parent == "gate" and leaf == "weight":  # router [H, E] here, [E, H] in the checkpoint
            entry = (".".join(names), shape[::-1], _t2)
        else:  # norms and biases
            entry = (".".join(names), shape, _identity)
        if stacked:
            start, n = starts[str(path[1])], value.shape[0]
            entry = (tuple(f"layers.{start + j}.{entry[0]}" for j in range(n)), entry[1], entry[2])
        plan[path] = entry
    return plan


def plan_names(entry) -> tuple[str, ...]:
    """The checkpoint names of a plan entry: one, or a stack's per-layer names."""
    return entry[0] if isinstance(entry[0], tuple) else (entry[0],)


def verify_source(config: Small4Config, plan: dict, source: TensorSource, where: str) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped tensor (nothing is read)."""
    available = set(source.names())
    expected = {name: entry[1] for entry in plan.values() for name in plan_names(entry)}
    missing = sorted(n for n in expected if n not in available)
    # transformers builds zero-sized shared experts when n_shared_experts = 0; empty tensors carry nothing
    unexpected = sorted(n for n in available if n not in expected and math.prod(source.shape(n)) > 0)
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a tied checkpoint may still store the head
    misshaped = sorted(
        (n, tuple(source.shape(n)), shape) for n, shape in expected.items() if n in available
        if tuple(source.shape(n)) != tuple(shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"{where}: the tensors do not match the model config"]
        lines += [f"  missing: {n} (expected shape {list(expected[n])})" for n in missing]
        lines += [f"  unexpected: {n} (shape {list(source.shape(n))})" for n in unexpected]
        lines += [f"  wrong shape: {n} is {list(got)}, expected {list(want)}" for n, got, want in misshaped]
        raise CheckpointError("\n".join(lines))


def _slice_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of an array placed with `sharding` (its leading layer axis is never sharded)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, j) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), j, 0)


def put_stacked(path, layers: Iterable[np.ndarray], n: int, mesh: Mesh | None) -> jax.Array:
    """A layer stack's parameter [n, ...] built on its devices one layer at a time: `layers` yields the n host
    arrays in order; each is placed at its sharding and written into its slice of the (donated) stack, so the host
    holds one layer and the devices the stack plus one layer, never two copies of a stack."""
    stack = None
    for j, host in enumerate(layers):
        if stack is None:
            shape = (n,) + tuple(host.shape)
            sharding = sharding_for(path, shape, mesh)
            stack = _zeros_fn(shape, jnp.dtype(host.dtype), sharding)()
        layer = jax.device_put(np.ascontiguousarray(host), _slice_sharding(stack.sharding))
        del host
        stack = _set_layer(stack, layer, np.int32(j))
    return stack


class FiniteCheck:
    """A TensorSource whose float tensors are checked as they are read: a NaN or an infinity in a weight (a damaged
    file, a diverged run) is a CheckpointError naming the tensor, not a model that silently outputs garbage. One
    `np.isfinite` pass over each tensor on the host, beside reading it."""

    def __init__(self, source: TensorSource, where: str):
        self.source, self.where = source, where

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __contains__(self, name) -> bool:
        return name in self.source

    def get(self, name: str, *args, **kwargs) -> np.ndarray:
        x = self.source.get(name, *args, **kwargs)
        if np.issubdtype(x.dtype, np.floating) or x.dtype == _numpy_dtype("bfloat16"):
            bad = x.size - int(np.count_nonzero(np.isfinite(x)))
            if bad:
                raise CheckpointError(f"{self.where}: tensor {name} holds {bad} non-finite values (NaN or inf) of "
                                      f"{x.size}; the file is damaged or the weights diverged (check_finite=False, "
                                      "--no-finite-check, loads it anyway)")
        return x


def load_weights(
    config: Small4Config,
    source: TensorSource,
    *,
    dtype="bfloat16",
    mesh: Mesh | None = None,
    where: str = "checkpoint",
    quantize: str | None = None,
    activations: str | None = None,
    check_finite: bool = True,
) -> Small4ForCausalLM:
    """Fill an abstract model from `source`, checking every name and shape first.

    With `quantize` (a `quant.SPELLINGS` spelling) the linears and experts are loaded quantised (`quant.py`), each in
    the format its part gets (`quant.policy`: "int4" is int4 experts and int8 dense linears), read off the abstract
    quantised model's values dtype: FP8 tensors stored with scales are kept as they are (bytes and scale grid,
    transposed to our layout) when that format is fp8; anything else is read as float32 on the host and quantised
    there, one tensor (experts: a block of experts) at a time, so no float copy of a quantised weight ever reaches
    a device. activations="fp8" (W8A8) also keeps each FP8 weight's static activation scale
    (`source.get_act_scale`), required for every one. `check_finite`: every float tensor read is checked for NaN
    and inf (`FiniteCheck`)."""
    fmt = quant.check_format(quantize)
    act = quant.check_activations(activations, fmt)
    if check_finite:
        source = FiniteCheck(source, where)
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype))
    plan = checkpoint_plan(state)
    verify_source(config, plan, source, where)
    quantised = {}
    if fmt is not None:
        graphdef, qstate = nnx.split(abstract_model(config, dtype=dtype, quantize=fmt, activations=act))
        quantised = dict(nnx.to_flat_state(qstate))

    np_dtype = _numpy_dtype(dtype)
    flat = []
    for path, value in nnx.to_flat_state(state):
        entry = plan[path]
        names, transform = plan_names(entry), entry[2]
        scale_path = path[:-1] + (f"{path[-1]}_scale",)
        if scale_path in quantised:
            part = quant.format_of(quantised[path].dtype)  # this tensor's format under the policy
            if is_stacked(path):  # values layer by layer; each layer's (small) scale grid waits in a list
                scales: list[np.ndarray] = []

                def values(names=names, transform=transform, scales=scales, part=part):
                    for name in names:
                        q = _read_quantized(source, name, part, transform)
                        scales.append(q.scale)
                        yield q.values

                arrs = (put_stacked(path, values(), len(names), mesh),)
                arrs += (put_stacked(scale_path, scales, len(names), mesh),)
            else:
                q = _read_quantized(source, names[0], part, transform)
                arrs = tuple(jax.device_put(np.ascontiguousarray(h), sharding_for(p, h.shape, mesh))
                             for p, h in ((path, q.values), (scale_path, q.scale)))
                del q
            paths = (path, scale_path)
            act_path = path[:-1] + (f"{path[-1]}_act_scale",)
            if act_path in quantised:  # W8A8: the static activation scale(s) [(E,) 1, 1], per layer of a stack
                acts = (_read_act_scale(source, name, where) for name in names)
                arrs += (put_stacked(act_path, acts, len(names), mesh) if is_stacked(path) else
                         jax.device_put(next(acts), sharding_for(act_path, (1, 1), mesh)),)
                paths += (act_path,)
            for p, arr in zip(paths, arrs):
                flat.append((p, quantised[p].replace(arr)))
            continue
        if is_stacked(path):
            arr = put_stacked(path, (transform(source.get(name, dtype=np_dtype)) for name in names), len(names), mesh)
        else:
            host = transform(source.get(names[0], dtype=np_dtype))
            arr = jax.device_put(np.ascontiguousarray(host), sharding_for(path, host.shape, mesh))
            del host
        flat.append((path, value.replace(arr) if hasattr(value, "replace") else arr))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model


def load_layer(config: Small4Config, source: TensorSource, i: int, *, dtype="float32") -> nnx.Module:
    """Decoder layer i alone, unstacked, in `dtype` on the default device: only its tensors are read from `source`
    (`layers.{i}.*`, mapped as `checkpoint_plan` maps a stack's slice). What the layer-at-a-time GPTQ pipeline
    (`convert --quantize int4 --calibration`) holds of a model at any time."""
    from small4_jax.nn.model import DecoderLayer

    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLayer(config, i, dtype=dtype, rngs=nnx.Rngs(0))))
    np_dtype = _numpy_dtype(dtype)
    flat = []
    for path, entry in checkpoint_plan(state).items():
        host = entry[2](source.get(f"layers.{i}.{entry[0]}", dtype=np_dtype))
        flat.append((path, jax.device_put(np.ascontiguousarray(host))))
    values = dict(flat)
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(values[p])) for p, v in nnx.to_flat_state(state)]))


_EXPERT_BLOCK = 8  # experts quantised per host step (bounds host memory to a block in float32)


def _read_quantized(source: TensorSource, name: str, fmt: str, transform: Transform,
                    rows: tuple[int, int] | None = None) -> quant.QArray:
    """One weight as a host QArray in our layout: the checkpoint's FP8 bytes and scales when it has them and `fmt` is
    "fp8", else read in float32 and quantised (stacked experts in blocks of `_EXPERT_BLOCK`). `rows` (experts only)
    reads that range of experts."""
    stored = source.get_fp8(name, rows) if fmt == "fp8" and hasattr(source, "get_fp8") else None
    if stored is not None:
        values, grid = stored
        values = transform(values)
        grid = grid.reshape((1,) * values.ndim) if grid.ndim == 0 else transform(grid)
        if grid.ndim == 3 and grid.shape[0] == 1 and values.shape[0] > 1:  # one scale for all experts
            grid = np.repeat(grid, values.shape[0], axis=0)
        if len(grid.shape) != values.ndim or any(d % g for d, g in zip(values.shape, grid.shape)):
            raise CheckpointError(f"{name}: scale grid {list(grid.shape)} does not tile the weight {list(values.shape)}")
        n, nb = values.shape[-1], grid.shape[-1]
        if 1 < nb < n:  # column blocks (a native w1 | w3 pair, a block-quantised release): one scale per column, so
            grid = np.repeat(grid, n // nb, axis=-1)  # the scales shard with the columns on any tensor mesh
        return quant.QArray(values, np.ascontiguousarray(grid, np.float32))
    shape = source.shape(name)
    if len(shape) != 3 or not hasattr(source, "get_fp8"):  # dense (or a plain source): one tensor
        return quant.quantize(transform(source.get(name, dtype=np.float32)), fmt)
    start, stop = rows or (0, shape[0])
    parts = []
    for e0 in range(start, stop, _EXPERT_BLOCK):
        block = (e0, min(stop, e0 + _EXPERT_BLOCK))
        parts.append(quant.quantize(transform(source.get(name, dtype=np.float32, rows=block)), fmt))
    return quant.QArray(np.concatenate([p.values for p in parts]), np.concatenate([p.scale for p in parts]))


def _read_act_scale(source: TensorSource, name: str, where: str) -> np.ndarray:
    """The static activation scale of FP8 weight `name` as a parameter: [1, 1], or [E, 1, 1] for stacked experts.
    W8A8 needs the checkpoint's own: a weight without one (or one not stored in FP8) is a CheckpointError."""
    stored_fp8 = getattr(source, "stored_dtype", lambda n: "")(name).startswith("F8")
    s = source.get_act_scale(name) if stored_fp8 and hasattr(source, "get_act_scale") else None
    if s is None:
        why = ("has no static activation scale (HF `activation_scale`, native `qscale_act`)" if stored_fp8 else
               "is not stored in FP8, so it has no static activation scale (weights quantised on load carry none)")
        raise CheckpointError(f"{where}: activations='fp8' (W8A8) needs the checkpoint's activation scales, and "
                              f"{name} {why}")
    if not np.all(np.isfinite(s) & (s > 0)):
        raise CheckpointError(f"{where}: the activation scale of {name} must be positive and finite; got "
                              f"{np.asarray(s).reshape(-1)[:4].tolist()}")
    return np.asarray(s, np.float32).reshape(s.shape + (1, 1) if s.ndim else (1, 1))


def default_quantize(source) -> str | None:
    """"fp8" when the checkpoint stores its projection weights in FP8 (they then stay FP8), else None."""
    if not hasattr(source, "stored_dtype"):
        return None
    for name in source.names():
        if name.endswith("q_a_proj.weight") or name.endswith("o_proj.weight") or name.endswith("experts.down_proj"):
            return "fp8" if source.stored_dtype(name).startswith("F8") else None
    return None


def checkpoint_config(path: str | os.PathLike) -> Small4Config:
    """The config of a checkpoint directory (HF, native or sharded), read without touching a weight: the command-line
    tools check a request against it before spending the minute a model build takes."""
    import json

    from small4_jax.ckpt import sharded as sharded_ckpt

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if sharded_ckpt.is_sharded_checkpoint(path):
        f = path / sharded_ckpt.CONFIG_FILE
        return Small4Config.from_dict(json.loads(f.read_text()), source=str(f))
    return load_config(path)


def from_pretrained(
    path: str | os.PathLike,
    dtype="bfloat16",
    mesh: Mesh | None = None,
    *,
    config: Small4Config | None = None,
    quantize: str | None = None,
    calibration=None,
    activations: str | None = None,
    check_finite: bool = True,
    runtime=None,
) -> Small4ForCausalLM:
    """Load an HF (`config.json` + safetensors) or Mistral-native (`params.json` + consolidated) directory, or a
    sharded Orbax checkpoint written by `python -m small4_jax.convert`.

    dtype is the parameter dtype ("bfloat16", "float32", ...), or "auto": float32 for a float32 checkpoint and
    bfloat16 otherwise (FP8 and bf16 checkpoints). With a mesh, every parameter is placed with its sharding from
    `small4_jax.parallel.sharding` as it is read. `config` replaces the directory's config (e.g. to pick `moe_impl`).

    quantize: the weight format of the linears and routed experts in memory and in compute (`small4_jax.quant.formats`):
    "fp8" (e4m3, per-tensor / per-expert scales: an FP8 checkpoint's own bytes and scales, kept), "int8" (per output
    channel), "int4" (routed experts in groups of 128 along the input, two per byte; the dense linears int8 per
    channel), "int4-all" (int4 everywhere), or "none" (dequantised to `dtype`). None, the
    default, keeps an FP8 checkpoint in FP8 and loads anything else unquantised. Embeddings, lm_head, norms and
    the router are never quantised. `calibration` (with "int4" / "int4-all": a JSONL file or token-id lists)
    quantises the int4 weights by GPTQ against the inputs each sees on that text (`small4_jax.quant.calibration`).
    activations: None (weight-only: activations stay in `dtype`) or "fp8", W8A8 on an FP8 checkpoint: each
    linear's and expert's input is quantised to e4m3 with the checkpoint's static activation scale (HF
    `activation_scale`, native `qscale_act`, kept beside the weights) and multiplied fp8 x fp8 (quant.py,
    kernels/gmm W8A8). Inference only (its experts have no gradient). Models quantised on load have no activation
    scales: W8A8 is then refused, naming the first weight without one.
    check_finite: an HF or native checkpoint's float tensors are checked for NaN / inf as they are read (a
    CheckpointError naming the tensor); False skips the check.
    runtime: a small4_jax.runtime.Runtime (or a mapping of its options) replacing the config's runtime options
    (kernels, expert parallelism, `softmax_scale` override).
    """
    if runtime is not None:
        config = (config or checkpoint_config(path)).with_runtime(runtime)
    if calibration is not None:
        quant.check_activations(activations, quantize)  # GPTQ is int4: no W8A8
        from small4_jax.quant.calibration import load_calibrated

        return load_calibrated(path, calibration, dtype=dtype, mesh=mesh, config=config, quantize=quantize)
    from small4_jax.ckpt import sharded as sharded_ckpt
    from small4_jax.ckpt.safetensors_io import CheckpointReader

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if sharded_ckpt.is_sharded_checkpoint(path):  # written by `python -m small4_jax.convert`
        if quant.check_activations(activations, quantize or "fp8"):
            raise CheckpointError(f"{path}: activations='fp8' (W8A8) loads from the HF or Mistral-native FP8 "
                                  "checkpoint (its activation scales); a converted sharded checkpoint has none")
        return sharded_ckpt.load_model(path, dtype=dtype, mesh=mesh, config=config, quantize=quantize)
    config = config or load_config(path)
    quant.check_format(quantize)
    reader = CheckpointReader(path, vision=config.vision is not None)
    if quantize is None:
        quantize = default_quantize(reader)
    if quant.check_activations(activations, quantize or "fp8") and quantize is None:
        raise CheckpointError(f"{path}: activations='fp8' (W8A8) needs an FP8 checkpoint (its weights and static "
                              "activation scales); this one is not stored in FP8")
    quant.check_activations(activations, quantize)
    if dtype == "auto":
        stored = reader.stored_dtype("embed_tokens.weight") if "embed_tokens.weight" in reader else "BF16"
        dtype = "float32" if stored in ("F32", "F64") else "bfloat16"
    try:
        return load_weights(config, reader, dtype=dtype, mesh=mesh, where=str(path), quantize=quantize,
                            activations=activations, check_finite=check_finite)
    finally:
        reader.close()


def _numpy_dtype(dtype) -> np.dtype:
    d = jnp.dtype(dtype)
    if d == jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(d)
