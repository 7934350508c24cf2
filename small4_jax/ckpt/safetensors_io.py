"""Read Mistral Small 4 text-model tensors, one at a time, from a checkpoint directory.

`CheckpointReader` gives a uniform view of two on-disk layouts (ARCHITECTURE.md §4):

* HF: `model.safetensors`, or `model-0000k-of-0000N.safetensors` shards with `model.safetensors.index.json`. Key
  prefixes `model.`, `model.language_model.` and `language_model.model.` are stripped; `lm_head.weight` and
  `language_model.lm_head.weight` both become `lm_head.weight`.
* Mistral-native: `params.json` with `consolidated.safetensors` or `consolidated-0000k-of-0000N.safetensors` (and an
  optional `consolidated.safetensors.index.json`). Native names are renamed to the HF names, and the per-expert
  `layers.i.experts.e.w1/w2/w3` tensors are presented as the fused HF `mlp.experts.gate_up_proj` [E, 2F, H] and
  `mlp.experts.down_proj` [E, H, F].

Every tensor is reported under its canonical name: the HF `Mistral4ForCausalLM` text name without the leading `model.`
(`embed_tokens.weight`, `layers.3.self_attn.q_a_proj.weight`, `layers.3.mlp.experts.gate_up_proj`, ...), in HF's torch
[out, in] orientation. FP8 tensors are dequantised on read: `W = W_fp8.astype(float32) * scale`, with the scale taken
from `<name>_scale_inv` (HF) or `<name>.qscale_weight` (native). Static activation scales (HF `activation_scale`,
native `qscale_act`) are not listed by `names()`: `get_act_scale` reads them for W8A8 (small4_jax.quant.formats). Vision-tower
and projector tensors are skipped and listed in `CheckpointReader.skipped`, unless the reader is opened with
`vision=True`: then they are read too, under the HF `Mistral3` names without the leading `model.`
(`vision_tower.transformer.layers.0.attention.q_proj.weight`, `multi_modal_projector.linear_1.weight`, ...); native
`vision_encoder.*`, `pre_mm_projector_norm`, `patch_merger` and `vision_language_adapter.w_in/w_out` are renamed to
them (their q/k rows stay in the native interleaved RoPE layout: `VisionConfig.rope_interleave`).

The safetensors header is parsed and validated here (not by the `safetensors` package), and tensor data is read with
seek + read in chunks of the leading axis, so the peak host memory of `get()` is the output array plus one chunk.

Not done here: reading `config.json` / `params.json` (the config module does that), checking that the tensors match a
config, tying `lm_head` to the embeddings, transposing to the model's layout, or placing arrays on devices.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Self

import ml_dtypes
import numpy as np
import numpy.typing as npt

from small4_jax.errors import CheckpointError

__all__ = ["CheckpointReader", "StoredTensor", "read_safetensors_header", "save_safetensors"]

logger = logging.getLogger("small4_jax")


def save_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.numpy.save_file`, with the file's mode what any other file written here gets (the package
    creates its files 0600, whatever the umask)."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

# safetensors dtype string -> numpy dtype (safetensors data is little-endian).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format itself sets
_CHUNK_BYTES = 64 * 1024 * 1024  # float32-equivalent size of one read chunk in get()

_SHARD_RE = re.compile(r"^(model|consolidated)-(\d+)-of-(\d+)\.safetensors$")

# HF layout: vision/projector prefixes (skipped), then text prefixes in the order they must be tried.
_HF_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_HF_TEXT_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.language_model.", ""),
    ("language_model.model.", ""),
    ("model.", ""),
)
_HF_ACT_SUFFIXES = (".activation_scale", "_activation_scale")  # X.weight's / mlp.experts.X's static input scale
# `X.weight_scale_inv` scales `X.weight`; `mlp.experts.down_proj_scale_inv` scales `mlp.experts.down_proj`.
_HF_SCALE_SUFFIX = "_scale_inv"

# Mistral-native layout.
_NATIVE_VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")
_NATIVE_GLOBAL = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "eagle_linear.weight": "fc.weight",  # an EAGLE draft's fusion linear (small4_jax/nn/eagle.py)
    "eagle_linear.bias": "fc.bias",
}
_NATIVE_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv_a_with_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "gate.weight": "mlp.gate.weight",
    "shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_NATIVE_VISION_GLOBAL = {
    "vision_encoder.patch_conv.weight": "vision_tower.patch_conv.weight",
    "vision_encoder.ln_pre.weight": "vision_tower.ln_pre.weight",
    "pre_mm_projector_norm.weight": "multi_modal_projector.norm.weight",
    "patch_merger.merging_layer.weight": "multi_modal_projector.patch_merger.merging_layer.weight",
    "vision_language_adapter.w_in.weight": "multi_modal_projector.linear_1.weight",
    "vision_language_adapter.w_in.bias": "multi_modal_projector.linear_1.bias",
    "vision_language_adapter.w_out.weight": "multi_modal_projector.linear_2.weight",
    "vision_language_adapter.w_out.bias": "multi_modal_projector.linear_2.bias",
}
_NATIVE_VISION_LAYER = {
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attention.wq.weight": "attention.q_proj.weight",
    "attention.wk.weight": "attention.k_proj.weight",
    "attention.wv.weight": "attention.v_proj.weight",
    "attention.wo.weight": "attention.o_proj.weight",
    "feed_forward.w1.weight": "feed_forward.gate_proj.weight",
    "feed_forward.w2.weight": "feed_forward.down_proj.weight",
    "feed_forward.w3.weight": "feed_forward.up_proj.weight",
}
_NATIVE_VISION_LAYER_RE = re.compile(r"^vision_encoder\.transformer\.layers\.(\d+)\.(.+)$")
_NATIVE_EXPERT_RE = re.compile(r"^layers\.(\d+)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


# ----------------------------------------------------------------------------------------------------------------------
# One safetensors file: header parsing, validation, and reading rows of one tensor.


@dataclass(frozen=True)
class StoredTensor:
    """Where one stored tensor lives: file, key, dtype string, shape, and absolute byte range [begin, end)."""

    path: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return _ST_DTYPES[self.dtype]


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or corrupt safetensors file ({what})")


def read_safetensors_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse and validate the header of one safetensors file; return ({key: StoredTensor}, __metadata__). Reads no data."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"file has {file_size} bytes, fewer than the 8-byte header length")
            header_len = int.from_bytes(head, "little")
            if header_len == 0 or header_len > _MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {header_len} is not in [1, {_MAX_HEADER_BYTES}]")
            if 8 + header_len > file_size:
                raise _corrupt(path, f"header needs bytes [8, {8 + header_len}), file has {file_size}")
            raw_header = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e.strerror or e})") from e
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not a JSON object")
    data_start = 8 + header_len
    tensors = {key: _parse_entry(path, key, entry, data_start, file_size) for key, entry in header.items()}
    return tensors, metadata


def _parse_entry(path: Path, key: str, entry: object, data_start: int, file_size: int) -> StoredTensor:
    """Validate one header entry {dtype, shape, data_offsets} against the file size."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _corrupt(path, f"header entry for tensor {key!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ST_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {key!r} has unsupported dtype {dtype!r} (supported: {', '.join(sorted(_ST_DTYPES))})"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {key!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {key!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(
            path, f"tensor {key!r} of dtype {dtype} and shape {shape} needs {nbytes} bytes, data_offsets {offsets} "
            f"give {offsets[1] - offsets[0]}"
        )
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > file_size:
        raise _corrupt(path, f"tensor {key!r} needs bytes [{begin}, {end}), file has {file_size}")
    return StoredTensor(path, key, dtype, tuple(shape), begin, end)


class _FilePool:
    """Open file handles, one per shard, opened on first read."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}

    def read(self, t: StoredTensor, offset: int, nbytes: int) -> np.ndarray:
        """Return `nbytes` bytes of tensor `t` starting `offset` bytes into its data, as a uint8 array."""
        f = self._files.get(t.path)
        if f is None:
            try:
                f = self._files[t.path] = open(t.path, "rb")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise CheckpointError(f"{t.path}: cannot open safetensors file ({e.strerror or e})") from e
        buf = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(buf)
        f.seek(t.begin + offset)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                size = os.fstat(f.fileno()).st_size
                raise _corrupt(t.path, f"tensor {t.key!r} needs bytes [{t.begin}, {t.end}), file has {size}")
            got += n
        return buf

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ----------------------------------------------------------------------------------------------------------------------
# Canonical entries: a plain (possibly FP8-scaled) tensor, or native per-expert tensors fused on read.


@dataclass
class _Source:
    """One stored tensor plus its optional dequantisation scale (also a stored tensor)."""

    tensor: StoredTensor
    scale: StoredTensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape


@dataclass
class _Entry:
    """A canonical tensor: `parts[e]` are concatenated along axis 0 (then stacked over e) when `fused`."""

    shape: tuple[int, ...]
    parts: list[list[_Source]] = field(default_factory=list)
    fused: bool = False


def _scale_grid(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """How a scale tiles a tensor: () for one scale; else a grid with one scale per block (each grid dim divides the
    tensor dim). One scale per expert ([E], [E, 1] or [E, 1, 1]) becomes (E, 1, 1). None if the scale does not fit."""
    n = math.prod(scale_shape)
    if n == 1:
        return ()
    if len(shape) == 3 and scale_shape and scale_shape[0] == shape[0] == n:
        return (n, 1, 1)
    if len(scale_shape) == len(shape) and all(g > 0 and d % g == 0 for d, g in zip(shape, scale_shape, strict=True)):
        return scale_shape
    return None


def _check_scale(src: _Source) -> None:
    """FP8 tensors need a scale; a scale must tile its tensor (see `_scale_grid`)."""
    t, s = src.tensor, src.scale
    if s is None:
        if t.dtype in _FP8_DTYPES:
            raise CheckpointError(f"{t.path}: FP8 tensor {t.key!r} has no scale tensor (expected `{t.key}_scale_inv` "
                                  "or `.qscale_weight`)")
        return
    if _scale_grid(t.shape, s.shape) is None:
        raise CheckpointError(
            f"{s.path}: scale {s.key!r} has shape {list(s.shape)}, which does not fit tensor {t.key!r} of shape "
            f"{list(t.shape)} (expected [] or [1] per tensor, [E, 1, 1] per expert, or a block grid whose sizes "
            "divide the tensor's)"
        )


def _fp8_table(dtype: np.dtype) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of an FP8 dtype (NaN patterns stay NaN)."""
    return np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)


def _apply_scale(x: np.ndarray, grid: np.ndarray) -> None:
    """Multiply float32 `x` in place by `grid`, one value per block; every `grid` dim divides the matching `x` dim."""
    blocks = [d // g for d, g in zip(x.shape, grid.shape, strict=True)]
    xv = x.reshape([v for g, b in zip(grid.shape, blocks, strict=True) for v in (g, b)])
    xv *= grid.reshape([v for g in grid.shape for v in (g, 1)])


# ----------------------------------------------------------------------------------------------------------------------
# Directory discovery.


def _load_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: cannot read safetensors index ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: expected a JSON object with a 'weight_map' of tensor name -> file name")
    return weight_map


def _check_shard_set(directory: Path, files: list[Path]) -> None:
    """For `x-0000k-of-0000N.safetensors` names, every k in 1..N must be present."""
    groups: dict[tuple[str, str], set[int]] = {}
    for p in files:
        m = _SHARD_RE.match(p.name)
        if m:
            groups.setdefault((m[1], m[3]), set()).add(int(m[2]))
    for (stem, total), present in groups.items():
        width = len(total)
        for k in range(1, int(total) + 1):
            if k not in present:
                missing = f"{stem}-{k:0{width}d}-of-{total}.safetensors"
                raise CheckpointError(
                    f"{directory}: shard {missing} is missing ({len(present)} of {int(total)} shards present)"
                )


def _discover(directory: Path, fmt: str | None) -> tuple[str, list[Path], Path | None, dict[str, str] | None]:
    """Pick the layout and return (format, safetensors files, index path or None, index weight_map or None)."""
    if not directory.exists():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint path is not a directory")
    all_st = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    native_files = [p for p in all_st if p.name.startswith("consolidated")]
    layouts = {
        "hf": (directory / "model.safetensors.index.json", [p for p in all_st if p not in native_files]),
        "native": (directory / "consolidated.safetensors.index.json", native_files),
    }
    present = [name for name, (index, files) in layouts.items() if index.is_file() or files]
    if fmt is not None:
        if fmt not in layouts:
            raise CheckpointError(f"{directory}: unknown checkpoint format {fmt!r} (expected 'hf' or 'native')")
        if fmt not in present:
            raise CheckpointError(f"{directory}: no {fmt} checkpoint files found")
        chosen = fmt
    elif present:
        chosen = present[0]  # a directory holding both (as Mistral's hub repos do) is read as HF
    else:
        raise CheckpointError(
            f"{directory}: no checkpoint found (expected model.safetensors, or model-*-of-*.safetensors with "
            "model.safetensors.index.json, or params.json with consolidated*.safetensors)"
        )
    index_path, files = layouts[chosen]
    if not index_path.is_file():
        _check_shard_set(directory, files)
        return chosen, files, None, None
    weight_map = _load_index(index_path)
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (directory / name).is_file():
            raise CheckpointError(f"{index_path}: references shard {name}, which does not exist in {directory}")
    return chosen, [directory / n for n in names], index_path, weight_map


# ----------------------------------------------------------------------------------------------------------------------
# Name mapping.


def _hf_name(key: str) -> str | None:
    """Strip an HF text prefix; None if `key` has none of them."""
    for prefix, replacement in _HF_TEXT_PREFIXES:
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return None


def _native_name(key: str) -> str | None:
    """Native name (non-expert, without FP8 suffix) -> canonical name; None if not a known native tensor."""
    if key in _NATIVE_GLOBAL:
        return _NATIVE_GLOBAL[key]
    if key in _NATIVE_VISION_GLOBAL:
        return _NATIVE_VISION_GLOBAL[key]
    m = _NATIVE_VISION_LAYER_RE.match(key)
    if m and m[2] in _NATIVE_VISION_LAYER:
        return f"vision_tower.transformer.layers.{m[1]}.{_NATIVE_VISION_LAYER[m[2]]}"
    m = _NATIVE_LAYER_RE.match(key)
    if m and m[2] in _NATIVE_LAYER:
        return f"layers.{m[1]}.{_NATIVE_LAYER[m[2]]}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The reader.


class CheckpointReader:
    """Read-only view of a checkpoint directory's text-model tensors under canonical HF names.

    `names()` and `shape()` use the headers only; `get()` reads and dequantises one tensor. Use as a context manager
    or call `close()` to release the file handles.
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None, *, vision: bool = False):
        """Open `path`. `fmt` ("hf" or "native") forces a layout when a directory holds both; default prefers HF.
        `vision`: also read the vision-tower and projector tensors (else they are skipped)."""
        self.directory = Path(path)
        self.vision = vision
        self.format, files, index_path, weight_map = _discover(self.directory, fmt)
        self.skipped: list[str] = []
        self._act: dict[str, list[list[StoredTensor]]] = {}  # weight name -> activation scale(s), per expert part
        self._pool = _FilePool()
        stored = self._read_headers(files, index_path, weight_map)
        if self.format == "hf":
            self._entries = self._build_hf(stored)
        else:
            self._entries = self._build_native(stored)
        for entry in self._entries.values():
            for parts in entry.parts:
                for src in parts:
                    _check_scale(src)
        if self.skipped:
            logger.info("skipped %d vision/projector tensors in %s", len(self.skipped), self.directory)

    # -- public API --------------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Canonical names of all text-model tensors present, sorted."""
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Canonical shape of `name`, from the headers (no data read)."""
        return self._entry(name).shape

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype string `name` is stored in (for fused experts: that of the first part)."""
        return self._entry(name).parts[0][0].tensor.dtype

    def get(self, name: str, dtype: npt.DTypeLike = np.float32, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Read tensor `name`, dequantise FP8 with its scale, and return it as a new array of `dtype`.

        rows=(start, stop) reads only that range of the first axis (experts, for stacked expert tensors), so a caller
        can stream a large tensor in pieces.
        """
        entry = self._entry(name)
        start, stop = (0, entry.shape[0] if entry.shape else 0) if rows is None else rows
        if rows is not None and not (entry.shape and 0 <= start < stop <= entry.shape[0]):
            raise ValueError(f"rows {rows} out of range for {name!r} of shape {entry.shape}")
        shape = entry.shape if rows is None else (stop - start,) + entry.shape[1:]
        out = np.empty(shape, dtype=np.dtype(dtype))
        if not entry.fused:
            self._fill(entry.parts[0][0], out, start)
            return out
        for e in range(start, stop):
            row = 0
            for src in entry.parts[e]:
                self._fill(src, out[e - start, row:row + src.shape[0]])
                row += src.shape[0]
        return out

    def get_fp8(self, name: str, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(the stored FP8 values of `name`, unconverted, and its float32 scale grid), or None when `name` is not
        stored in FP8 with scales. The grid is in the canonical orientation: shape () for one scale, (E, 1, 1) per
        expert, (E, parts, 1) for native experts fused from parts with a scale each (w1 | w3), or a block grid. No
        float copy of the weight is made (quantised compute, small4_jax.quant.formats)."""
        entry = self._entry(name)
        srcs = [src for parts in entry.parts for src in parts]
        if not all(src.tensor.dtype in _FP8_DTYPES and src.scale is not None for src in srcs):
            return None
        if len({src.tensor.dtype for src in srcs}) != 1:
            return None
        start, stop = (0, entry.shape[0]) if rows is None else rows
        shape = entry.shape if rows is None else (stop - start,) + entry.shape[1:]
        out = np.empty(shape, dtype=srcs[0].tensor.np_dtype)
        if not entry.fused:
            self._fill(_Source(srcs[0].tensor), out, start)
            grid = self._read_scale(srcs[0])
            if rows is not None and grid.ndim == 3:  # per expert (or per expert block): this range's scales
                grid = grid[start:stop]
            return out, grid
        grid = np.empty((stop - start, len(entry.parts[0]), 1), np.float32)
        for e in range(start, stop):
            row = 0
            for p, src in enumerate(entry.parts[e]):
                scale = self._read_scale(src)
                if scale.ndim:  # block scales inside a fused part: not representable as one grid here
                    return None
                self._fill(_Source(src.tensor), out[e - start, row:row + src.shape[0]])
                grid[e - start, p, 0] = scale
                row += src.shape[0]
        if len({src.shape[0] for src in entry.parts[0]}) != 1:
            return None  # parts of unequal height do not form a grid
        return out, grid

    def get_act_scale(self, name: str) -> np.ndarray | None:
        """The static activation scale of weight `name` (what W8A8 divides its input by), float32: shape () for a
        dense weight, [E] for stacked experts (an HF [E] tensor, or a scalar for all experts; native: per expert,
        the max of w1's and w3's for the fused gate_up, whose halves share their input). None when the checkpoint
        has none."""
        parts = self._act.get(name)
        if parts is None:
            return None
        vals = [[self._pool.read(t, 0, t.end - t.begin).view(t.np_dtype).astype(np.float32) for t in p] for p in parts]
        if len(vals) > 1:  # native experts: one scalar (per part) per expert
            return np.asarray([max(float(v.reshape(-1)[0]) for v in p) for p in vals], np.float32)
        v = vals[0][0]
        shape = self._entry(name).shape
        if len(shape) == 3:  # stacked experts
            if v.size == 1:
                return np.full((shape[0],), v.reshape(-1)[0], np.float32)
            if v.size != shape[0]:
                raise CheckpointError(f"{parts[0][0].path}: activation scale {parts[0][0].key!r} has shape "
                                      f"{list(parts[0][0].shape)}; expected [{shape[0]}] (one per expert) or one")
            return v.reshape(shape[0])
        if v.size != 1:
            raise CheckpointError(f"{parts[0][0].path}: activation scale {parts[0][0].key!r} has shape "
                                  f"{list(parts[0][0].shape)}; expected one value (static per-tensor)")
        return v.reshape(())

    def close(self) -> None:
        self._pool.close()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.directory)!r}, format={self.format!r}, tensors={len(self._entries)})"

    # -- opening -----------------------------------------------------------------------------------------------------

    def _read_headers(self, files: list[Path], index_path: Path | None, weight_map: dict[str, str] | None
                      ) -> dict[str, StoredTensor]:
        """All stored tensors by on-disk key, checked against the index and for duplicates across files."""
        stored: dict[str, StoredTensor] = {}
        for path in files:
            tensors, _ = read_safetensors_header(path)
            for key, t in tensors.items():
                if key in stored:
                    raise CheckpointError(f"{path}: tensor {key!r} is also stored in {stored[key].path}")
                stored[key] = t
        for key, file_name in (weight_map or {}).items():
            t = stored.get(key)
            if t is None or t.path.name != file_name:
                where = f"it is in {t.path.name}" if t is not None else "no shard holds it"
                raise CheckpointError(f"{index_path}: says tensor {key!r} is in {file_name}, but {where}")
        return stored

    def _build_hf(self, stored: dict[str, StoredTensor]) -> dict[str, _Entry]:
        tensors: dict[str, StoredTensor] = {}
        scales: dict[str, StoredTensor] = {}
        for key, t in stored.items():
            if key.startswith(_HF_VISION_PREFIXES):
                if not self.vision:
                    self.skipped.append(key)
                    continue
                name = key.removeprefix("model.")
            else:
                name = _hf_name(key)
            if name is None:
                raise CheckpointError(f"{t.path}: unrecognised tensor {key!r} in an HF checkpoint (expected a "
                                      "model., model.language_model., language_model.model. or lm_head. prefix)")
            if name.endswith(_HF_ACT_SUFFIXES):
                dot = name.endswith(_HF_ACT_SUFFIXES[0])
                target = name[: -len(_HF_ACT_SUFFIXES[0])] + ".weight" if dot else name[: -len(_HF_ACT_SUFFIXES[1])]
                self._act[target] = [[t]]
                continue
            is_scale = name.endswith(_HF_SCALE_SUFFIX)
            target, bucket = (name[: -len(_HF_SCALE_SUFFIX)], scales) if is_scale else (name, tensors)
            if target in bucket:
                raise CheckpointError(f"{t.path}: tensors {bucket[target].key!r} and {key!r} both map to {target!r}")
            bucket[target] = t
        return self._pair_scales(tensors, scales)

    def _build_native(self, stored: dict[str, StoredTensor]) -> dict[str, _Entry]:
        tensors: dict[str, StoredTensor] = {}  # native key -> tensor (experts included)
        scales: dict[str, StoredTensor] = {}  # native weight key -> its qscale_weight
        acts: dict[str, StoredTensor] = {}  # native weight key -> its qscale_act
        for key, t in stored.items():
            if key.startswith(_NATIVE_VISION_PREFIXES) and not self.vision:
                self.skipped.append(key)
            elif key.endswith(".qscale_act"):
                acts[key[: -len(".qscale_act")] + ".weight"] = t
            elif key.endswith(".qscale_weight"):
                scales[key[: -len(".qscale_weight")] + ".weight"] = t
            else:
                tensors[key] = t
        entries: dict[str, _Entry] = {}
        experts: dict[int, dict[int, dict[str, _Source]]] = {}  # layer -> expert -> w1/w2/w3
        for key, t in tensors.items():
            src = _Source(t, scales.pop(key, None))
            m = _NATIVE_EXPERT_RE.match(key)
            if m:
                experts.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = src
                continue
            name = _native_name(key)
            if name is None:
                raise CheckpointError(f"{t.path}: unrecognised tensor {key!r} in a Mistral-native checkpoint")
            if name in entries:
                raise CheckpointError(f"{t.path}: tensors {entries[name].parts[0][0].tensor.key!r} and {key!r} both "
                                      f"map to {name!r}")
            entries[name] = _Entry(src.shape, [[src]])
        self._check_orphan_scales(scales)
        for layer, per_expert in experts.items():
            entries.update(_fuse_native_experts(layer, per_expert))
        expert_acts: dict[str, dict[int, dict[str, StoredTensor]]] = {}
        for key, t in acts.items():
            m = _NATIVE_EXPERT_RE.match(key)
            if m:
                base = f"layers.{m[1]}.mlp.experts."
                for fused in (("gate_up_proj",) if m[3] in ("w1", "w3") else ("down_proj",)):
                    expert_acts.setdefault(base + fused, {}).setdefault(int(m[2]), {})[m[3]] = t
            elif (name := _native_name(key)) is not None:
                self._act[name] = [[t]]
        for name, per_expert in expert_acts.items():  # the fused gate_up's scale: max of w1's and w3's (one input)
            order = ("w1", "w3") if name.endswith("gate_up_proj") else ("w2",)
            if all(all(w in per_expert.get(e, {}) for w in order) for e in range(len(per_expert))):
                self._act[name] = [[per_expert[e][w] for w in order] for e in range(len(per_expert))]
        return entries

    def _pair_scales(self, tensors: dict[str, StoredTensor], scales: dict[str, StoredTensor]) -> dict[str, _Entry]:
        entries = {name: _Entry(t.shape, [[_Source(t, scales.pop(name, None))]]) for name, t in tensors.items()}
        self._check_orphan_scales(scales)
        return entries

    @staticmethod
    def _check_orphan_scales(scales: dict[str, StoredTensor]) -> None:
        for s in scales.values():
            raise CheckpointError(f"{s.path}: scale tensor {s.key!r} has no matching weight tensor")

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.directory}: no tensor {name!r} in this {self.format} checkpoint")
        return entry

    # -- reading -----------------------------------------------------------------------------------------------------

    def _fill(self, src: _Source, out: np.ndarray, row0: int = 0) -> None:
        """Read rows [row0, row0 + len(out)) of `src` into `out`, dequantising and converting chunk by chunk."""
        t = src.tensor
        scale = self._read_scale(src)
        if not t.shape:
            raw = self._pool.read(t, 0, t.end - t.begin).view(t.np_dtype).reshape(())
            out[...] = raw if scale is None else raw.astype(np.float32) * scale
            return
        rows, row_elems = t.shape[0], math.prod(t.shape[1:])
        stop = row0 + out.shape[0]
        row_bytes = row_elems * t.np_dtype.itemsize
        rows_per_block = rows // scale.shape[0] if scale is not None and scale.ndim else rows
        if scale is not None and scale.ndim and (row0 % rows_per_block or stop % rows_per_block and stop != rows):
            raise ValueError(f"{t.key!r}: rows [{row0}, {stop}) cut through a block of {rows_per_block} rows that "
                             "share one scale")
        chunk = max(1, _CHUNK_BYTES // max(1, row_elems * 4))
        if scale is not None and scale.ndim:
            chunk = max(1, chunk // rows_per_block) * rows_per_block  # whole scale blocks per chunk
        lut = _fp8_table(t.np_dtype) if scale is not None and t.dtype in _FP8_DTYPES else None
        for i in range(row0, stop, chunk):
            j = min(stop, i + chunk)
            o = out[i - row0:j - row0]
            raw = self._pool.read(t, i * row_bytes, (j - i) * row_bytes)  # uint8
            raw = (raw if lut is not None else raw.view(t.np_dtype)).reshape((j - i,) + t.shape[1:])
            if scale is None:
                o[...] = raw  # numpy casts on assignment
            elif lut is not None and all(g == 1 for g in scale.shape[1:]):
                # One scale per tensor or per leading-axis block: look up the scaled 256-entry table directly in the
                # output dtype. Bit-identical to (W.astype(f32) * scale).astype(dtype), and much faster.
                step = min(rows_per_block, j - i)
                for b in range(i, j, step):
                    s_b = scale if scale.ndim == 0 else scale[b // rows_per_block]
                    table = (lut * s_b).astype(out.dtype)
                    n = min(step, j - b)
                    np.take(table, raw[b - i:b - i + n], out=o[b - i:b - i + n], mode="wrap")
            else:
                x = lut[raw] if lut is not None else raw.astype(np.float32)
                del raw
                if scale.ndim == 0:
                    x *= scale
                else:
                    _apply_scale(x, scale[i // rows_per_block:j // rows_per_block])
                o[...] = x

    def _read_scale(self, src: _Source) -> np.ndarray | None:
        """The scale as float32: shape () for one scale, else the block grid of `_scale_grid`."""
        s = src.scale
        if s is None:
            return None
        values = self._pool.read(s, 0, s.end - s.begin).view(s.np_dtype).astype(np.float32)
        return values.reshape(_scale_grid(src.shape, s.shape))


def _fuse_native_experts(layer: int, per_expert: dict[int, dict[str, _Source]]) -> dict[str, _Entry]:
    """Per-expert native w1/w2/w3 of one layer -> fused canonical gate_up_proj [E, 2F, H] and down_proj [E, H, F]."""
    n = len(per_expert)
    first = next(iter(per_expert.values()))
    path = next(iter(first.values())).tensor.path
    if sorted(per_expert) != list(range(n)):
        raise CheckpointError(f"{path}: layer {layer} has experts {sorted(per_expert)}, expected 0..{n - 1}")
    for e in range(n):
        missing = {"w1", "w2", "w3"} - per_expert[e].keys()
        if missing:
            raise CheckpointError(f"{path}: layer {layer} expert {e} lacks {sorted(missing)} weights")
    w1, w2, w3 = per_expert[0]["w1"].shape, per_expert[0]["w2"].shape, per_expert[0]["w3"].shape
    if len(w1) != 2 or w3 != w1 or w2 != (w1[1], w1[0]):
        raise CheckpointError(f"{path}: layer {layer} expert 0 has w1 {list(w1)}, w2 {list(w2)}, w3 {list(w3)}; "
                              "expected [F, H], [H, F], [F, H]")
    for e in range(1, n):
        got = tuple(per_expert[e][w].shape for w in ("w1", "w2", "w3"))
        if got != (w1, w2, w3):
            t = per_expert[e]["w1"].tensor
            raise CheckpointError(f"{t.path}: layer {layer} expert {e} has w1/w2/w3 shapes {[list(s) for s in got]}, "
                                  f"expert 0 has {[list(w1), list(w2), list(w3)]}")
    f_dim, h_dim = w1
    base = f"layers.{layer}.mlp.experts"
    return {
        f"{base}.gate_up_proj": _Entry((n, 2 * f_dim, h_dim), [[per_expert[e]["w1"], per_expert[e]["w3"]]
                                                               for e in range(n)], fused=True),
        f"{base}.down_proj": _Entry((n, h_dim, f_dim), [[per_expert[e]["w2"]] for e in range(n)], fused=True),
    }
