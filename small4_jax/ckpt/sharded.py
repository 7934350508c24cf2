"""Sharded model checkpoints in Orbax's layout (TensorStore zarr arrays in one OCDBT database), written tensor by tensor.

Orbax's own `save` wants the whole pytree in memory at once; a 119B model does not fit in one host's memory. This
module writes each parameter as its own zarr array inside the OCDBT key-value store, exactly where Orbax puts it
(key = the parameter path joined by dots), and writes Orbax's `_METADATA` at the end. The result is an ordinary
Orbax checkpoint: `orbax.checkpoint.StandardCheckpointer().restore(dir, abstract_tree)` restores it onto any mesh,
each device reading only its shard. `load_model` does that for a `Small4ForCausalLM`.

Directory contents: the Orbax files (`_METADATA`, `manifest.ocdbt`, `d/`, ...), `small4_config.json` (our config,
written first so a resumed conversion can check it is the same model) and `small4_format.json` (storage dtype;
written last: a directory without it is incomplete).

Tree: {"params": {path...: array}} and, for FP8 storage, {"fp8_scales": {path...: float32 scale}} where the scale is
a scalar, or [E, 1, 1] for stacked experts; the weight is `q.astype(f32) * scale`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from small4_jax.ckpt.plan import checkpoint_plan, plan_names
from small4_jax.config import Small4Config
from small4_jax.errors import CheckpointError, ConfigError
from small4_jax.nn.model import Small4ForCausalLM, abstract_model, layer_groups
from small4_jax.parallel.sharding import sharding_for
from small4_jax.quant import formats as quant

CONFIG_FILE = "small4_config.json"
FORMAT_FILE = "small4_format.json"
FP8_MAX = 448.0
CHUNK_BYTES = 32 << 20


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / "_METADATA").is_file()


def param_key(path: Sequence) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def _zarr_dtype(dtype: np.dtype) -> str:
    if dtype == ml_dtypes.bfloat16:
        return "bfloat16"
    if dtype == ml_dtypes.float8_e4m3fn:
        return "float8_e4m3fn"
    return np.dtype(dtype).str


def storage_chunks(shape: Sequence[int], itemsize: int) -> list[int]:
    """Storage chunks under CHUNK_BYTES as float32 (whatever the storage dtype, so a writer that quantises one chunk
    at a time holds one CHUNK_BYTES float32 buffer at most): the leading axes are split to 1 (a layer stack's
    layers) until the rest is small enough, then the next axis into blocks (stacked experts: a few per chunk)."""
    shape = list(shape)
    if not shape:
        return []
    chunks = list(shape)
    size = max(itemsize, 4)
    for a in range(len(shape)):
        row = int(np.prod(shape[a + 1:], dtype=np.int64)) * size
        if a + 1 < len(shape) and row * shape[a] > CHUNK_BYTES and row >= CHUNK_BYTES and shape[a] > 1:
            chunks[a] = 1
            continue
        chunks[a] = max(1, min(shape[a], CHUNK_BYTES // max(row, 1)))
        break
    return chunks


class Writer:
    """Writes arrays into the OCDBT store of `directory`, one at a time (a single writer process)."""

    def __init__(self, directory: str | os.PathLike):
        import tensorstore as ts

        self._ts = ts
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._context = ts.Context()

    def write(self, key: tuple[str, ...], array: np.ndarray) -> None:
        """Write `array` (any strides: it is copied one chunk at a time) under `key`."""
        store = self.create(key, array.shape, array.dtype)
        self.write_rows(store, array, 0)

    def create(self, key: tuple[str, ...], shape: Sequence[int], dtype, keep: bool = False) -> object:
        """Create (or replace) the array `key`; fill it with `write_rows`. `keep`: open it with what it holds when
        it exists (a layer stack written one layer at a time, resumed)."""
        chunks = storage_chunks(shape, np.dtype(dtype).itemsize)
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": f"file://{self.directory.resolve()}", "path": ".".join(key)},
            "metadata": {
                "shape": list(shape),
                "chunks": chunks,
                "dtype": _zarr_dtype(np.dtype(dtype)),
                "compressor": None,
            },
        }
        mode = {"open": True} if keep else {"delete_existing": True}
        return self._ts.open(spec, create=True, context=self._context, **mode).result()

    @staticmethod
    def write_rows(store, array: np.ndarray, row0: int, at: tuple[int, ...] = ()) -> None:
        """Write `array` into rows [row0, row0 + len(array)) of `store` (of `store[at]`: e.g. one layer of a
        stack), one chunk-sized contiguous copy at a time."""
        if not array.shape:
            store[at].write(np.array(array, order="C")).result() if at else store.write(np.array(array)).result()
            return
        step = storage_chunks(array.shape, array.dtype.itemsize)[0]
        for start in range(0, array.shape[0], step):
            stop = min(start + step, array.shape[0])
            store[at + (slice(row0 + start, row0 + stop),)].write(np.ascontiguousarray(array[start:stop])).result()


def write_metadata(directory: Path, tree_shapes: dict[tuple[str, ...], Sequence[int]]) -> None:
    """Orbax's `_METADATA` for a tree of jax.Array leaves (keys are tuples of dict keys)."""
    tree = {
        str(keys): {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
        }
        for keys, shape in tree_shapes.items()
    }
    meta = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    atomic_write(directory / "_METADATA", json.dumps(meta))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def quantize_fp8(w: np.ndarray, per_expert: bool) -> tuple[np.ndarray, np.ndarray]:
    """float8_e4m3fn with scale = amax / 448 per tensor (or per expert, axis 0); w = q * scale."""
    w = np.asarray(w, np.float32)
    axes = tuple(range(1, w.ndim)) if per_expert else None
    amax = np.abs(w).max(axis=axes, keepdims=per_expert) if w.size else np.float32(0)
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = np.clip(w / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, np.asarray(scale, np.float32)


def save_model(model: Small4ForCausalLM, path: str | os.PathLike) -> Path:
    """Save a (possibly sharded, possibly multi-process) model in this format with Orbax; every process calls it.

    Each process writes its own shards; `from_pretrained(path, mesh=...)` restores onto any other mesh.
    """
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    path = Path(path).resolve()
    if path.exists():
        raise CheckpointError(f"{path}: already exists")
    params: dict = {}
    for p, v in nnx.to_flat_state(nnx.state(model)):
        _nest(params, param_key(p), v[...])
    dtypes = {str(jnp.dtype(x.dtype)) for x in jax.tree.leaves(params)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"params": params})
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        atomic_write(path / CONFIG_FILE, json.dumps(model.config.to_dict(), indent=1))
        atomic_write(path / FORMAT_FILE, json.dumps({"dtype": "float32" if dtypes == {"float32"} else "bfloat16"}))
    multihost_utils.sync_global_devices(f"small4 save_model {path}")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Loading.
def load_model(path: str | os.PathLike, *, dtype="bfloat16", mesh: Mesh | None = None,
               config: Small4Config | None = None, quantize: str | None = None) -> Small4ForCausalLM:
    """Restore a sharded checkpoint onto `mesh` (any shape: each device reads only its shard).

    A checkpoint converted with `--quantize F` (format file {"quantize": F}) restores its quantised values and scales
    as they are (no requantisation); `quantize` must then be None or F. FP8 storage (`--dtype fp8`) stays FP8 by
    default (its per-tensor / per-expert scales become the model's scale grids) or is dequantised with
    quantize="none". A float checkpoint cannot be quantised here: convert it with `--quantize`.
    """
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    if not (path / FORMAT_FILE).is_file():
        raise CheckpointError(f"{path}: incomplete sharded checkpoint (no {FORMAT_FILE}); resume the conversion")
    if is_per_layer(path):
        raise CheckpointError(f"{path}: saved before the layers were stacked (per-layer 'layers.N' arrays); turn it "
                              f"into the stacked layout once with `python -m small4_jax.convert --migrate --from "
                              f"{path} --to {path}-stacked`")
    fmt = json.loads((path / FORMAT_FILE).read_text())
    stored_config = Small4Config.from_dict(json.loads((path / CONFIG_FILE).read_text()), source=str(path / CONFIG_FILE))
    config = config or stored_config
    if dtype == "auto":
        dtype = "float32" if fmt.get("dtype") == "float32" else "bfloat16"
    asked = quant.check_format(quantize)
    stored = fmt.get("quantize")
    if stored is not None:
        stored = _stored_format(path, config, stored)
        if quantize is not None and asked != stored:
            raise CheckpointError(f"{path}: holds {stored} weights; it loads as {stored} (quantize=None), not as "
                                  f"{quantize!r}: convert the original checkpoint again for another format")
        return _load_quantized(path, config, dtype, mesh, stored, fmt.get("scale_shapes", {}))
    if fmt.get("dtype") == "fp8" and quantize is None:
        return _load_fp8_kept(path, config, dtype, mesh)
    if asked is not None and not (asked == "fp8" and fmt.get("dtype") == "fp8"):
        raise CheckpointError(f"{path}: stores {fmt.get('dtype')} weights; to serve them as {asked}, convert the "
                              f"original checkpoint with `python -m small4_jax.convert --quantize {asked}`")
    if asked == "fp8":
        return _load_fp8_kept(path, config, dtype, mesh)
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype))
    flat = list(nnx.to_flat_state(state))
    fp8 = fmt.get("dtype") == "fp8"
    quantised = quantised_paths(p for p, _ in flat) if fp8 else set()
    params, scales = {}, {}
    for p, v in flat:
        sharding = sharding_for(p, v.shape, mesh)
        restore_dtype = jnp.float8_e4m3fn if p in quantised else v.dtype  # Orbax casts bf16/f32 to the dtype asked
        _nest(params, param_key(p), jax.ShapeDtypeStruct(v.shape, restore_dtype, sharding=sharding))
        if p in quantised:
            shape = fp8_scale_shape(p, v.shape)
            scale_sharding = _replicated(mesh)
            _nest(scales, param_key(p), jax.ShapeDtypeStruct(shape, jnp.float32, sharding=scale_sharding))
    abstract = {"params": params, **({"fp8_scales": scales} if fp8 else {})}
    try:
        restored = ocp.StandardCheckpointer().restore(path, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: cannot restore the sharded checkpoint ({e})") from None
    new_flat = []
    for p, v in flat:
        arr = _get(restored["params"], param_key(p))
        if p in quantised:
            arr = _dequantize(arr, _get(restored["fp8_scales"], param_key(p)), jnp.dtype(v.dtype))
        new_flat.append((p, v.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _restore(path: Path, abstract: dict) -> dict:
    import orbax.checkpoint as ocp

    try:
        return ocp.StandardCheckpointer().restore(path, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: cannot restore the sharded checkpoint ({e})") from None


def _stored_format(path: Path, config: Small4Config, written: str) -> str:
    """The `quantize` spelling that the stored values dtypes of a converted checkpoint make up (each part, routed
    experts and dense linears, in one format; `quant.policy`): what the checkpoint holds, whatever the spelling it
    was converted with meant then (before int4 became experts-only, "int4" had int4 dense linears)."""
    import tensorstore as ts

    flat = dict(nnx.to_flat_state(nnx.split(abstract_model(config, quantize=written))[1]))
    parts: dict[str, set] = {"experts": set(), "dense": set()}
    for p in flat:
        if p[:-1] + (f"{p[-1]}_scale",) not in flat:
            continue
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{path}",
                                              "path": ".".join(("params",) + param_key(p))}}
        try:
            dtype = ts.open(spec, open=True, read=True).result().dtype.numpy_dtype
        except ValueError as e:
            raise CheckpointError(f"{path}: cannot read {'.'.join(param_key(p))} ({e})") from None
        parts["experts" if is_experts(p) else "dense"].add(quant.format_of(dtype))
    if not parts["experts"]:  # no routed experts in the model: the dense format names it
        parts["experts"] = set(parts["dense"])
    if any(len(v) != 1 for v in parts.values()):
        raise CheckpointError(f"{path}: quantised tensors in mixed formats within a part: "
                              f"{ {k: sorted(v) for k, v in parts.items()} }")
    try:
        return quant.spelling(quant.Policy(experts=parts["experts"].pop(), dense=parts["dense"].pop()))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load_quantized(path: Path, config: Small4Config, dtype, mesh: Mesh | None, fmt: str,
                    scale_shapes: dict) -> Small4ForCausalLM:
    """The model's own quantised state (values and `*_scale` grids, whose stored shapes the format file lists: an
    FP8 source's grid may be finer than the default one), each array restored onto its sharding."""
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, quantize=fmt))
    flat = list(nnx.to_flat_state(state))
    params: dict = {}
    for p, v in flat:
        shape = tuple(scale_shapes.get(".".join(param_key(p)), v.shape))
        _nest(params, param_key(p), jax.ShapeDtypeStruct(shape, v.dtype, sharding=sharding_for(p, shape, mesh, v.dtype)))
    restored = _restore(path, {"params": params})
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(_get(restored["params"], param_key(p))))
                                                    for p, v in flat]))


def _load_fp8_kept(path: Path, config: Small4Config, dtype, mesh: Mesh | None) -> Small4ForCausalLM:
    """FP8 storage into an fp8 model: the stored bytes, and the stored scale as the [1, 1] / [E, 1, 1] grid."""
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, quantize="fp8"))
    flat = list(nnx.to_flat_state(state))
    by_path = dict(flat)
    params, scales = {}, {}
    for p, v in flat:
        leaf = str(p[-1])
        if leaf.endswith("_scale"):
            weight = p[:-1] + (leaf[: -len("_scale")],)
            shape = fp8_scale_shape(weight, by_path[weight].shape)
            _nest(scales, param_key(weight), jax.ShapeDtypeStruct(shape, jnp.float32, sharding=_replicated(mesh)))
            continue
        _nest(params, param_key(p), jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_for(p, v.shape, mesh)))
    restored = _restore(path, {"params": params, "fp8_scales": scales})
    new_flat = []
    for p, v in flat:
        leaf = str(p[-1])
        if leaf.endswith("_scale"):
            weight = p[:-1] + (leaf[: -len("_scale")],)
            arr = _get(restored["fp8_scales"], param_key(weight)).reshape(by_path[p].shape)
        else:
            arr = _get(restored["params"], param_key(p))
        new_flat.append((p, v.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _dequantize(q, scale, dtype):
    return jax.jit(lambda q, s: (q.astype(jnp.float32) * s).astype(dtype), out_shardings=q.sharding)(q, scale)


def _replicated(mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def is_experts(path) -> bool:
    return len(path) >= 2 and str(path[-2]) == "experts"


def _is_stacked(path) -> bool:
    return len(path) > 2 and str(path[0]) == "layer_stacks"


def fp8_scale_shape(path, shape: Sequence[int]) -> tuple[int, ...]:
    """The stored scale of an FP8-stored weight: one per tensor, i.e. per layer of a layer stack ([n, 1, 1]) and per
    expert of stacked experts ([n, E, 1, 1]); () for an unstacked dense weight."""
    lead = int(_is_stacked(path)) + int(is_experts(path))
    return tuple(shape[:lead]) + (1, 1) if lead else ()


def quantised_paths(paths) -> set:
    """FP8 storage covers the projection and expert weights (never embeddings, head, norms, the router, or the vision
    tower and projector, which stay in the model dtype)."""
    out = set()
    for p in paths:
        names = [str(x) for x in p]
        if names[0] in ("vision_tower", "multi_modal_projector"):
            continue
        if is_experts(p) or (names[-1] == "kernel" and names[-2] != "lm_head"):
            out.add(p)
    return out


def _nest(tree: dict, keys: tuple[str, ...], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, keys: tuple[str, ...]):
    for k in keys:
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------------------------------------------------
# Reading one tensor (one layer of a stack) at a time.
class TensorReader:
    """A float sharded checkpoint (bf16 / f32, or `--dtype fp8` storage, dequantised) as a `ckpt.plan.TensorSource`:
    canonical checkpoint names and shapes (`ckpt.plan.checkpoint_plan`, inverted), each `get` reading that tensor
    alone from TensorStore (layer j of a stack: its slice j), so `checkpoint.load_layer` and the converter read it
    as they read a safetensors directory (e.g. `convert --quantize int4 --calibration` from a converted checkpoint)."""

    def __init__(self, path: str | os.PathLike):
        import tensorstore as ts

        self.directory = Path(path).resolve()
        if not (self.directory / FORMAT_FILE).is_file():
            raise CheckpointError(f"{self.directory}: incomplete sharded checkpoint (no {FORMAT_FILE})")
        fmt = json.loads((self.directory / FORMAT_FILE).read_text())
        if fmt.get("quantize"):
            raise CheckpointError(f"{self.directory}: holds {fmt['quantize']} weights; convert from the float "
                                  "checkpoint it came from")
        self._fp8 = fmt.get("dtype") == "fp8"
        self.config = Small4Config.from_dict(json.loads((self.directory / CONFIG_FILE).read_text()),
                                             source=str(self.directory / CONFIG_FILE))
        _, state = nnx.split(abstract_model(self.config, dtype="float32"))
        self._ts, self._context = ts, ts.Context()
        self._where = {}  # name -> (our path, slice j of a stack or None, transform, checkpoint shape)
        for path, entry in checkpoint_plan(state).items():
            stacked = _is_stacked(path)
            for j, name in enumerate(plan_names(entry)):
                self._where[name] = (path, j if stacked else None, entry[2], tuple(entry[1]))

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][3]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _open(self, key: str):
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{self.directory}", "path": key}}
        return self._ts.open(spec, open=True, context=self._context).result()

    def get(self, name: str, dtype=np.float32, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name` in the checkpoint's layout (our transposes are their own inverses), as `dtype`; `rows` reads
        that range of experts."""
        path, j, transform, _ = self._where[name]
        key = ".".join(param_key(path))
        at = (() if j is None else (j,)) + (() if rows is None else (slice(*rows),))  # experts: the leading axis
        stored = np.asarray(self._open(f"params.{key}")[at].read().result())
        if self._fp8 and path in quantised_paths([path]):
            scale = np.asarray(self._open(f"fp8_scales.{key}")[at].read().result(), np.float32)
            stored = stored.astype(np.float32) * scale
        return np.ascontiguousarray(transform(stored).astype(dtype, copy=False))

    def get_fp8(self, name: str, rows=None):
        """None: the FP8 bytes are not kept through this reader (they are dequantised by `get`)."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints saved before the layers were stacked.
def _tree_keys(path: Path) -> list[tuple[str, ...]]:
    """The array keys of an Orbax checkpoint, from its `_METADATA` (e.g. ("params", "layers", "0", ...))."""
    meta = json.loads((path / "_METADATA").read_text())
    return [tuple(k["key"] for k in entry["key_metadata"]) for entry in meta["tree_metadata"].values()]


def _b64(key: tuple[str, ...]) -> str:
    import base64

    return base64.b64encode(".".join(key).encode()).decode()


def _layer_at(key: tuple[str, ...]) -> int | None:
    """Where `layers`, N sits in a per-layer key (`params.layers.3.…`, `opt_state.0.mu.layers.3.…`), else None.
    The vision tower's own layers (`vision_tower.transformer.layers.N`) are never stacked: not a decoder layer."""
    if "vision_tower" in key:
        return None
    for i in range(len(key) - 1):
        if key[i] == "layers" and key[i + 1].isdigit():
            return i
    return None


def is_per_layer(path: str | os.PathLike) -> bool:
    """An Orbax checkpoint (a converted model, or one step of a LoRA run) with per-layer arrays `...layers.N...`:
    the layout before the decoder layers were stacked (`layer_stacks.G`, leading layer axis)."""
    path = Path(path)
    if not (path / "_METADATA").is_file():
        return False
    return any(_layer_at(k) is not None for k in _tree_keys(path))


def migrate_per_layer(src: str | os.PathLike, out: str | os.PathLike, config: Small4Config,
                      progress=None, fill_missing: bool = False) -> Path:
    """Rewrite the Orbax checkpoint `src` (per-layer arrays `….layers.N.REST`) as `out` in the stacked layout:
    `….layer_stacks.G.REST` with a leading axis over the layers of stack G (`layer_groups(config)`), every other
    array copied unchanged, one layer's array in memory at a time. A per-tensor FP8 scale of a stacked weight gets
    the stacked scale shape (`fp8_scale_shape`). `fill_missing` (LoRA runs, whose old adapters sat only on the
    layers their targets picked): a layer without the array gets zeros (a stacked adapter there is inactive).
    Our config and format files are copied. Built in `out.partial`, renamed when complete."""
    import shutil

    import tensorstore as ts

    src, out = Path(src).resolve(), Path(out).resolve()
    if not is_per_layer(src):
        raise CheckpointError(f"{src}: not a per-layer checkpoint (nothing to migrate)")
    if out.exists():
        raise CheckpointError(f"{out}: exists; choose another --to or remove it")
    where = {}  # layer index -> (stack, row)
    groups = layer_groups(config)
    for g, (start, n) in enumerate(groups):
        for j in range(n):
            where[start + j] = (g, j)
    context = ts.Context()

    def read(key: tuple[str, ...]) -> np.ndarray:
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{src}", "path": ".".join(key)}}
        return np.asarray(ts.open(spec, context=context).result().read().result())

    meta = json.loads((src / "_METADATA").read_text())
    entries = {tuple(k["key"] for k in e["key_metadata"]): e for e in meta["tree_metadata"].values()}
    stacked: dict[tuple[str, ...], dict[int, tuple[str, ...]]] = {}
    plain = []
    for k in entries:
        at = _layer_at(k)
        if at is None or entries[k]["value_metadata"].get("skip_deserialize"):  # no array behind it (None, {})
            plain.append(k)
            continue
        layer = int(k[at + 1])
        if layer not in where:
            raise CheckpointError(f"{src}: array {'.'.join(k)} is beyond the config's {config.num_hidden_layers} "
                                  "layers")
        g, j = where[layer]
        stacked.setdefault(k[:at] + ("layer_stacks", str(g)) + k[at + 2:], {})[j] = k
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    writer = Writer(partial)
    tree: dict[str, dict] = {}  # Orbax's _METADATA entries: the old ones' key types, the new keys and shapes
    # Orbax's `_sharding` (base64 of the dotted key -> the saved sharding), which a restore without a target reads
    old_sharding = json.loads((src / "_sharding").read_text()) if (src / "_sharding").is_file() else None
    new_sharding = {}

    def entry(old: tuple[str, ...], new: tuple[str, ...], shape) -> None:
        if old_sharding is not None and _b64(old) in old_sharding:
            new_sharding[_b64(new)] = old_sharding[_b64(old)]
        e = json.loads(json.dumps(entries[old]))
        e["key_metadata"] = [dict(m, key=k) for m, k in zip(e["key_metadata"], new)]
        if isinstance(e.get("value_metadata"), dict) and "write_shape" in e["value_metadata"]:
            e["value_metadata"]["write_shape"] = list(shape)
        tree[str(new)] = e

    for k in plain:
        if entries[k]["value_metadata"].get("skip_deserialize"):
            tree[str(k)] = entries[k]
            continue
        arr = read(k)
        writer.write(k, arr)
        entry(k, k, arr.shape)
    for i, (new, rows) in enumerate(sorted(stacked.items())):
        at = new.index("layer_stacks")
        start, n = groups[int(new[at + 1])]
        missing = sorted(set(range(n)) - set(rows))
        if missing and not fill_missing:
            raise CheckpointError(f"{src}: {'.'.join(new[:at] + ('layers', str(start + missing[0])) + new[at + 2:])}"
                                  " is missing (a stack needs every layer)")
        first = read(rows[min(rows)])
        row_shape = first.shape
        if new[0] == "fp8_scales":  # () per dense tensor, [E, 1, 1] per expert stack -> [n, 1, 1] / [n, E, 1, 1]
            row_shape = fp8_scale_shape(new[1:], (n,) + first.shape)[1:]
        store = writer.create(new, (n,) + tuple(row_shape), first.dtype)
        for j in range(n):
            arr = read(rows[j]) if j in rows else np.zeros(first.shape, first.dtype)
            writer.write_rows(store, arr.reshape(row_shape), 0, (j,))
        entry(rows[min(rows)], new, (n,) + tuple(row_shape))
        if progress is not None:
            print(f"\r[{i + 1}/{len(stacked)}] {'.'.join(new):<70}", end="", file=progress, flush=True)
    if progress is not None:
        print(file=progress)
    atomic_write(partial / "_METADATA", json.dumps(dict(meta, tree_metadata=tree)))
    if old_sharding is not None:
        atomic_write(partial / "_sharding", json.dumps(new_sharding))
    for name in (CONFIG_FILE, FORMAT_FILE):  # a converted model's own files (a LoRA step has none)
        if (src / name).is_file():
            shutil.copy2(src / name, partial / name)
    os.replace(partial, out)
    return out
