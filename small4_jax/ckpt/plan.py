"""The checkpoint plan: each parameter of a model <-> its tensor(s) in a checkpoint (canonical name, checkpoint shape,
transform to our layout), checked against a source before anything is read; and reading one planned tensor, float
or quantised, and putting it on its devices (a layer stack built one layer at a time)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from small4_jax.config import Small4Config
from small4_jax.errors import CheckpointError
from small4_jax.parallel.sharding import sharding_for
from small4_jax.quant import formats as quant


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
            sharding = sharding_for(path, shape, mesh, host.dtype)
            stack = _zeros_fn(shape, jnp.dtype(host.dtype), sharding)()
        layer = jax.device_put(np.ascontiguousarray(host), _slice_sharding(stack.sharding))
        del host
        stack = _set_layer(stack, layer, np.int32(j))
    return stack


_EXPERT_BLOCK = 8  # experts quantised per host step (bounds host memory to a block in float32)


def read_quantized(source: TensorSource, name: str, fmt: str, transform: Transform,
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


def read_act_scale(source: TensorSource, name: str, where: str) -> np.ndarray:
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


def numpy_dtype(dtype) -> np.dtype:
    d = jnp.dtype(dtype)
    if d == jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(d)


def load_state(graphdef, state, plan: dict, source: TensorSource, *, dtype, mesh: Mesh | None = None,
               where: str = "checkpoint", quantised: dict | None = None, prefix: str = "",
               committed: bool = True) -> nnx.Module:
    """The one loop over a checkpoint plan (`from_pretrained`, a decoder layer for GPTQ, an EAGLE draft): each
    parameter of the abstract `state` read from `source` under its plan names (each after `prefix`), transformed to
    our layout and put on its devices (`sharding_for` on `mesh`, the default device without one; a layer stack one
    layer at a time, `put_stacked`); returns the module merged from `graphdef`. The caller checks the source first
    (`verify_source`). `committed=False` (float parameters, no mesh: a GPTQ layer, an EAGLE draft) leaves them
    uncommitted on the default device, usable under any mesh the caller later runs them in.

    `quantised` (the flat state of the quantised abstract model, or None): a parameter whose `<name>_scale` it holds is
    read quantised in the format of its values' dtype (`read_quantized`: FP8 bytes and scales kept for fp8, else
    quantised on the host), with its W8A8 activation scale when it has one (`read_act_scale`)."""
    quantised = quantised or {}
    np_dtype = numpy_dtype(dtype)
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
                        q = read_quantized(source, prefix + name, part, transform)
                        scales.append(q.scale)
                        yield q.values

                arrs = (put_stacked(path, values(), len(names), mesh),)
                arrs += (put_stacked(scale_path, scales, len(names), mesh),)
            else:
                q = read_quantized(source, prefix + names[0], part, transform)
                arrs = tuple(jax.device_put(np.ascontiguousarray(h), sharding_for(p, h.shape, mesh, h.dtype))
                             for p, h in ((path, q.values), (scale_path, q.scale)))
                del q
            paths = (path, scale_path)
            act_path = path[:-1] + (f"{path[-1]}_act_scale",)
            if act_path in quantised:  # W8A8: the static activation scale(s) [(E,) 1, 1], per layer of a stack
                acts = (read_act_scale(source, prefix + name, where) for name in names)
                arrs += (put_stacked(act_path, acts, len(names), mesh) if is_stacked(path) else
                         jax.device_put(next(acts), sharding_for(act_path, (1, 1), mesh)),)
                paths += (act_path,)
            for p, arr in zip(paths, arrs):
                flat.append((p, quantised[p].replace(arr)))
            continue
        layers = (transform(source.get(prefix + name, dtype=np_dtype)) for name in names)
        if is_stacked(path):
            arr = put_stacked(path, layers, len(names), mesh) if committed else jnp.asarray(np.stack(list(layers)))
        else:
            host = next(layers)
            arr = jax.device_put(np.ascontiguousarray(host),
                                 sharding_for(path, host.shape, mesh, host.dtype) if committed else None)
            del host
        flat.append((path, value.replace(arr) if hasattr(value, "replace") else arr))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
