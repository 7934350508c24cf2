"""Convert an HF or Mistral-native safetensors checkpoint into a sharded Orbax checkpoint, streaming.

    python -m small4_jax.convert --from /models/Mistral-Small-4-119B-2603 --to /ckpt/small4-bf16 [--dtype bf16|fp8]

Tensors are read one at a time (FP8 sources dequantised), put in the layout the model uses ([in, out] kernels,
stacked experts [E, H, 2F] / [E, F, H]) and written into a TensorStore/OCDBT store in Orbax's format, so host memory
stays near the largest tensor plus a constant. The output is built in `OUT.partial` and renamed to `OUT` when
complete; a killed conversion (plain or `--quantize`) resumes where it stopped when run again: finished tensors
are listed in `OUT.partial/_progress.json` after each one is written (atomically), and skipped; a tensor cut off
mid-write is written again whole. `small4_jax.from_pretrained(OUT, mesh=...)` then loads it onto any
mesh, including one with a different device count.

`--dtype fp8` stores projection and expert weights as float8_e4m3fn with an amax/448 scale per tensor (per expert
for stacked experts) and dequantises on load; embeddings, head, norms and the router stay bf16.

    python -m small4_jax.convert --migrate --from /ckpt/old --to /ckpt/old-stacked

`--migrate` rewrites a sharded checkpoint converted, or a LoRA run directory trained, before the decoder layers
were stacked (per-layer arrays `layers.N`) into the stacked layout (`layer_stacks.G`, one leading layer axis), one
layer's array at a time (`small4_jax.ckpt.sharded.migrate_per_layer`); loading or resuming an old one names this
command.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from small4_jax.console import cli_main, on_interrupt
from small4_jax.errors import CheckpointError, Small4Error, TokenizerError
from small4_jax.inputs.tokenizer import find_tokenizer_file

def copy_tokenizer(src: Path, out: Path) -> Path | None:
    """The source checkpoint's tokenizer file (tekken.json or a sentencepiece model) copied beside the converted
    weights, so `--checkpoint OUT` finds it as it would in the source; None when the source has none."""
    try:
        found = find_tokenizer_file(src)
    except TokenizerError:
        return None
    shutil.copyfile(found, out / found.name)
    return out / found.name


DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8", "f32": "float32", "float32": "float32"}


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bf16", progress=sys.stderr,
            quantize: str | None = None, calibration=None, act_order: bool = False) -> Path:
    """Convert `src` into the sharded checkpoint `out`; returns `out`. Resumes an interrupted run of the same job.

    With `quantize` (a `small4_jax.quant.formats.SPELLINGS` spelling: "int4" is int4 experts and int8 dense linears) the
    linears and experts are written in the format of their part,
    values and scale grids as the quantised model holds them (an FP8 source's own bytes and scales for "fp8"), so
    `from_pretrained` restores them without requantising; the other parameters are stored in `dtype`. With
    `calibration` (the int4 parts; a JSONL file or token-id lists, `small4_jax.quant.calibration`) they are quantised by GPTQ, one
    layer at a time (`_write_calibrated`: host memory holds one float layer and the calibration hidden states);
    `act_order` visits each weight's inputs by decreasing Hessian diagonal (`quant.gptq_int4`)."""
    if calibration is not None and quantize is None:
        raise CheckpointError("--calibration goes with --quantize int4")
    if quantize is not None:
        return _convert_quantized(src, out, dtype=dtype, progress=progress, fmt=quantize, calibration=calibration,
                                  act_order=act_order)
    import ml_dtypes
    from flax import nnx

    from small4_jax.ckpt import sharded as sc
    from small4_jax.ckpt.plan import checkpoint_plan, plan_names, verify_source
    from small4_jax.config import load_config
    from small4_jax.nn.model import abstract_model
    from small4_jax.ckpt.safetensors_io import CheckpointReader

    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of bf16, fp8, f32")
    storage = DTYPES[dtype]
    src, out = _check_paths(src, out)
    config = load_config(src)
    reader = CheckpointReader(src, vision=config.vision is not None)
    _, state = nnx.split(abstract_model(config, dtype="float32"))
    plan = checkpoint_plan(state)
    our_shapes = {path: tuple(v.shape) for path, v in nnx.to_flat_state(state)}
    verify_source(config, plan, reader, str(src))

    job = {"source": str(src.resolve()), "dtype": storage, "config": config.to_dict()}
    partial, progress_file, saved = _partial(out, job)
    done: set[str] = set(saved.get("done", []))
    sc.atomic_write(partial / sc.CONFIG_FILE, json.dumps(config.to_dict(), indent=1))

    quantised = sc.quantised_paths(plan) if storage == "fp8" else set()
    out_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "fp8": ml_dtypes.bfloat16}[storage]
    writer = sc.Writer(partial)
    tree_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    total_bytes = sum(int(np.prod(s)) for s in our_shapes.values()) * np.dtype(out_dtype).itemsize
    written, t0, n = 0, time.perf_counter(), len(plan)
    skipped = 0  # bytes a resumed conversion had already written: in the percentage, not in the rate
    for i, (path, entry) in enumerate(plan.items()):
        names, transform = plan_names(entry), entry[2]
        name = names[-1]
        key = sc.param_key(path)
        our_shape = our_shapes[path]
        tree_shapes[("params",) + key] = our_shape
        if path in quantised:
            tree_shapes[("fp8_scales",) + key] = sc.fp8_scale_shape(path, our_shape)
        nbytes = int(np.prod(our_shape)) * np.dtype(out_dtype).itemsize
        if ".".join(key) in done:
            skipped += nbytes
        else:
            _write_float(reader, writer, path, names, transform, our_shape, out_dtype, fp8=path in quantised)
            done.add(".".join(key))
            sc.atomic_write(progress_file, json.dumps({"job": job, "done": sorted(done)}))
        written += nbytes
        if progress is not None:
            rate = (written - skipped) / max(time.perf_counter() - t0, 1e-9) / 2**20
            print(f"\r[{i + 1}/{n}] {100 * written / total_bytes:5.1f}%  {rate:8.1f} MiB/s  {name:<60}", end="",
                  file=progress, flush=True)
    reader.close()
    return _finish(src, partial, out, progress_file, tree_shapes, {"dtype": storage, "source": str(src.resolve())},
                   progress)


def _check_paths(src, out) -> tuple[Path, Path]:
    """(src, out) as paths: src an existing directory, out not a finished conversion nor anything else."""
    from small4_jax.ckpt import sharded as sc

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src}: checkpoint directory not found")
    if sc.is_sharded_checkpoint(out) and (out / sc.FORMAT_FILE).is_file():
        raise CheckpointError(f"{out}: a converted checkpoint is already there; choose another --to or remove it")
    if out.exists():
        raise CheckpointError(f"{out}: exists and is not a finished conversion; remove it first")
    return src, out


def _finish(src: Path, partial: Path, out: Path, progress_file: Path, tree_shapes: dict, fmt: dict, progress) -> Path:
    """Orbax's metadata, our format file and the source's tokenizer, then OUT.partial renamed to OUT (the conversion
    is complete)."""
    from small4_jax.ckpt import sharded as sc

    if progress is not None:
        print(file=progress)
    sc.write_metadata(partial, tree_shapes)
    sc.atomic_write(partial / sc.FORMAT_FILE, json.dumps(fmt))
    progress_file.unlink()
    copy_tokenizer(src, partial)
    os.replace(partial, out)
    return out


def _write_float(reader, writer, path, names, transform, our_shape, out_dtype, *, fp8: bool) -> None:
    """One parameter in the float storage dtype (`fp8`: float8_e4m3fn with an amax/448 scale per tensor, per
    expert for stacked experts, written beside it); a layer stack layer by layer into its slice j."""
    import ml_dtypes

    from small4_jax.ckpt import sharded as sc
    from small4_jax.ckpt.plan import is_stacked

    key = sc.param_key(path)
    read_dtype = np.float32 if fp8 else out_dtype
    stored_dtype = ml_dtypes.float8_e4m3fn if fp8 else out_dtype
    stacked, per_expert = is_stacked(path), sc.is_experts(path)
    store = writer.create(("params",) + key, our_shape, stored_dtype)
    scales = []
    for j, layer_name in enumerate(names):
        at = (j,) if stacked else ()
        layer_shape = our_shape[1:] if stacked else our_shape
        if per_expert:
            scales.append(_write_experts(reader, writer, store, at, layer_name, transform, layer_shape, read_dtype,
                                         out_dtype, quantise=fp8))
        else:
            arr = transform(reader.get(layer_name, dtype=read_dtype))
            if fp8:
                arr, scale = sc.quantize_fp8(arr, per_expert=False)
                scales.append(scale)
            writer.write_rows(store, arr.astype(stored_dtype, copy=False), 0, at)
            del arr
        _release_freed_memory()
    if fp8:
        writer.write(("fp8_scales",) + key, np.stack(scales).reshape(sc.fp8_scale_shape(path, our_shape)))


def _write_plain(reader, writer, key, names, transform, out_dtype, tree_shapes: dict, stacked: bool) -> None:
    """One unquantised parameter of a quantised conversion, in the storage dtype (a stack layer by layer)."""
    lead = (len(names),) if stacked else ()
    store = None
    for j, layer_name in enumerate(names):
        arr = transform(reader.get(layer_name, dtype=out_dtype))
        if store is None:
            shape = lead + arr.shape
            store = writer.create(("params",) + key, shape, arr.dtype)
            tree_shapes[("params",) + key] = shape
        writer.write_rows(store, arr, 0, (j,) if stacked else ())


def _write_quantized(reader, writer, path, names, transform, qshapes: dict, tree_shapes: dict, stacked: bool) -> None:
    """One quantised parameter, values and scales, in its part's format (`plan.read_quantized`); stacked experts a
    block of 8 at a time, row by row."""
    from small4_jax.ckpt import sharded as sc
    from small4_jax.ckpt.plan import read_quantized
    from small4_jax.quant import formats as quant

    key, skey = sc.param_key(path), sc.param_key(path[:-1] + (f"{path[-1]}_scale",))
    lead = (len(names),) if stacked else ()
    vstore = sstore = None
    experts = len(qshapes[path][0]) - len(lead) == 3
    for j, layer_name in enumerate(names):
        at = (j,) if stacked else ()
        e = qshapes[path][0][len(lead)] if experts else 1
        for e0 in range(0, e, 8):
            rows = (e0, min(e, e0 + 8)) if experts else None
            q = read_quantized(reader, layer_name, quant.format_of(qshapes[path][1]), transform, rows=rows)
            if vstore is None:
                vshape = lead + ((e,) + q.values.shape[1:] if experts else q.values.shape)
                sshape = lead + ((e,) + q.scale.shape[1:] if experts else q.scale.shape)
                vstore = writer.create(("params",) + key, vshape, q.values.dtype)
                sstore = writer.create(("params",) + skey, sshape, q.scale.dtype)
                tree_shapes[("params",) + key], tree_shapes[("params",) + skey] = vshape, sshape
            writer.write_rows(vstore, q.values, e0 if experts else 0, at)
            writer.write_rows(sstore, np.asarray(q.scale), e0 if experts else 0, at)
            _release_freed_memory()


def _calibration_job(job: dict, src: Path, calibration, act_order: bool, fmt: str, config) -> list[list[int]]:
    """The GPTQ conversion's calibration token sequences; the job records their hash and act_order (a resumed run
    must use the same)."""
    import hashlib

    from small4_jax.quant import formats as quant
    from small4_jax.quant.calibration import check_tokens, read_sequences

    if "int4" not in quant.policy(fmt):
        raise CheckpointError(f"--calibration is for --quantize int4 or int4-all (GPTQ on the int4 weights), not {fmt}")
    text = Path(calibration).read_bytes() if isinstance(calibration, (str, os.PathLike)) else json.dumps(
        [list(map(int, s)) for s in calibration]).encode()
    job["calibration"] = hashlib.sha256(text).hexdigest()
    job["act_order"] = bool(act_order)
    return check_tokens(read_sequences(src, calibration), config.vocab_size, 2048)


def _partial(out: Path, job: dict) -> tuple[Path, Path, dict]:
    """(OUT.partial, its progress file, the saved progress: {} for a fresh start). An interrupted conversion of the
    same job is resumed; one of another job is an error (never silently mixed or deleted)."""
    partial = out.with_name(out.name + ".partial")
    progress_file = partial / "_progress.json"
    if progress_file.is_file():
        saved = json.loads(progress_file.read_text())
        if saved.get("job") != job:
            raise CheckpointError(f"{partial}: an interrupted conversion of a different source or dtype is there; "
                                  "remove it or convert to another --to")
        return partial, progress_file, saved
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial, progress_file, {}


def _convert_quantized(src, out, *, dtype: str, progress, fmt: str, calibration=None, act_order: bool = False) -> Path:
    import ml_dtypes
    from flax import nnx

    from small4_jax.quant import formats as quant
    from small4_jax.ckpt import sharded as sc
    from small4_jax.ckpt.plan import checkpoint_plan, is_stacked, plan_names, verify_source
    from small4_jax.config import load_config
    from small4_jax.nn.model import abstract_model
    from small4_jax.ckpt.safetensors_io import CheckpointReader

    fmt = quant.check_format(fmt, "--quantize")
    if fmt is None or DTYPES.get(dtype) not in ("bfloat16", "float32"):
        raise CheckpointError(f"--quantize {fmt} stores the unquantised parameters in bf16 or f32, not {dtype!r}")
    storage = DTYPES[dtype]
    src, out = _check_paths(src, out)
    if sc.is_sharded_checkpoint(src):  # a converted float checkpoint, read a tensor (a layer) at a time
        reader = sc.TensorReader(src)
        config = reader.config
    else:
        config = load_config(src)
        reader = CheckpointReader(src)
    _, state = nnx.split(abstract_model(config, dtype="float32"))
    plan = checkpoint_plan(state)
    verify_source(config, plan, reader, str(src))
    _, qstate = nnx.split(abstract_model(config, dtype=storage, quantize=fmt))
    qshapes = {p: (tuple(v.shape), v.dtype) for p, v in nnx.to_flat_state(qstate)}
    job = {"source": str(src.resolve()), "dtype": storage, "quantize": fmt, "config": config.to_dict()}
    if calibration is not None:  # GPTQ: the layers are quantised and written one at a time (_write_calibrated)
        sequences = _calibration_job(job, src, calibration, act_order, fmt, config)
    partial, progress_file, saved = _partial(out, job)
    done: set[str] = set(saved.get("done", []))
    # the stored shapes of what is done (an FP8 source's scale grid is the checkpoint's, known only once read)
    tree_shapes = {("params",) + tuple(k.split(".")): tuple(v) for k, v in saved.get("shapes", {}).items()}
    sc.atomic_write(partial / sc.CONFIG_FILE, json.dumps(config.to_dict(), indent=1))
    writer = sc.Writer(partial)
    out_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[storage]
    for i, (path, entry) in enumerate(plan.items()):
        names, transform = plan_names(entry), entry[2]
        name = names[-1]
        key = sc.param_key(path)
        if ".".join(key) in done:  # written, with its scales, before an interruption
            continue
        scale_path = path[:-1] + (f"{path[-1]}_scale",)
        stacked = is_stacked(path)
        if stacked and calibration is not None:
            continue  # written layer by layer below
        if scale_path not in qshapes:
            _write_plain(reader, writer, key, names, transform, out_dtype, tree_shapes, stacked)
            _mark_done(progress_file, job, done, key, tree_shapes)
            continue
        _write_quantized(reader, writer, path, names, transform, qshapes, tree_shapes, stacked)
        _mark_done(progress_file, job, done, key, tree_shapes)
        if progress is not None:
            print(f"\r[{i + 1}/{len(plan)}] {name:<60}", end="", file=progress, flush=True)
    if calibration is not None:
        _write_calibrated(reader, writer, partial, progress_file, job, done, tree_shapes, config, qshapes, sequences,
                          out_dtype, act_order, progress)
    reader.close()
    scale_shapes = {".".join(k[1:]): list(v) for k, v in tree_shapes.items() if k[-1].endswith("_scale")}
    return _finish(src, partial, out, progress_file, tree_shapes, {"dtype": storage, "quantize": fmt, "scale_shapes":
                                                                   scale_shapes, "source": str(src.resolve())}, progress)


def _write_calibrated(reader, writer, partial: Path, progress_file: Path, job: dict, done: set[str], tree_shapes: dict,
                      config, qshapes: dict, sequences: list[list[int]], out_dtype, act_order: bool, progress) -> None:
    """The layer stacks of a GPTQ conversion, layer by layer (`calibration.calibrate_layer`): layer i's float
    weights are read alone (`checkpoint.load_layer`), calibrated on the hidden states of the sequences, quantised,
    written into slice i of its stacks, and dropped; the hidden states its quantised version produces go to the
    next layer. So the host holds one float layer and the hidden states, never the model.

    Resuming: after layer i is written, the hidden states entering layer i + 1 are saved (`_hidden.{i+1}.npy`,
    atomically, float32 [tokens, H]) and then "layers.i" is marked done; a resumed run starts at the first layer not
    done, from its saved inputs (the embeddings for layer 0), and rewrites that layer whole. The same inputs give
    the same bytes, so a resumed conversion is identical to an uninterrupted one."""
    import jax
    from flax import nnx

    from small4_jax.quant import formats as quant
    from small4_jax.ckpt import sharded as sc
    from small4_jax.quant.calibration import calibrate_layer, embed
    from small4_jax.ckpt.load import load_layer
    from small4_jax.nn.model import layer_groups

    stacked = {sc.param_key(p): v for p, v in qshapes.items() if len(p) > 2 and str(p[0]) == "layer_stacks"}
    for key, (shape, _) in stacked.items():
        tree_shapes[("params",) + key] = shape
    stores: dict[tuple[str, ...], object] = {}
    n = config.num_hidden_layers
    first = next((i for i in range(n) if f"layers.{i}" not in done), n)
    if first == n:
        return
    h = np.load(partial / f"_hidden.{first}.npy") if first else embed(reader.get("embed_tokens.weight"), sequences)
    groups = layer_groups(config)
    for i in range(first, n):
        g, (start, _) = next((g, s) for g, s in enumerate(groups) if s[0] <= i < s[0] + s[1])
        layer, h = calibrate_layer(load_layer(config, reader, i), jax.numpy.asarray(h), sequences,
                                   quantize=job["quantize"], act_order=act_order)
        written = set()
        for rel, var in nnx.to_flat_state(nnx.state(layer)):
            key = ("layer_stacks", str(g)) + sc.param_key(rel)
            shape, dtype = stacked[key]
            arr = np.asarray(var[...])
            if not quant.is_quantised_dtype(arr.dtype):
                arr = arr.astype(out_dtype)
            if key not in stores:
                stores[key] = writer.create(("params",) + key, shape, arr.dtype, keep=True)
            writer.write_rows(stores[key], arr, 0, (i - start,))
            written.add(key)
        missing = {k for k in stacked if k[1] == str(g)} - written
        if missing:
            raise CheckpointError(f"layer {i}: the quantised layer has no {sorted(missing)[0]}")
        del layer
        hidden = np.asarray(h)
        tmp = partial / f"_hidden.{i + 1}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, hidden)
        os.replace(tmp, partial / f"_hidden.{i + 1}.npy")
        _mark_done(progress_file, job, done, ("layers", str(i)), tree_shapes)
        (partial / f"_hidden.{i}.npy").unlink(missing_ok=True)
        _release_freed_memory()
        if progress is not None:
            print(f"\r[layer {i + 1}/{n}] GPTQ", end="", file=progress, flush=True)
    (partial / f"_hidden.{n}.npy").unlink(missing_ok=True)


def _mark_done(progress_file: Path, job: dict, done: set[str], key: tuple[str, ...], tree_shapes: dict) -> None:
    """Record tensor `key` (values and scales) as written: atomically, after its last byte is in the store."""
    from small4_jax.ckpt import sharded as sc

    done.add(".".join(key))
    shapes = {".".join(k[1:]): list(v) for k, v in tree_shapes.items()}
    sc.atomic_write(progress_file, json.dumps({"job": job, "done": sorted(done), "shapes": shapes}))


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them, and TensorStore's threads fragment the heap: without
    this, resident memory grows by a fraction of every tensor written)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _write_experts(reader, writer, store, at, name, transform, shape, read_dtype, out_dtype, *, quantise: bool):
    """One stacked expert tensor [E, ...] into `store[at]`, a few experts at a time: memory stays at one block, not
    the whole tensor. Returns its per-expert FP8 scales [E, 1, 1] when `quantise`."""
    import ml_dtypes

    from small4_jax.ckpt import sharded as sc

    stored_dtype = ml_dtypes.float8_e4m3fn if quantise else out_dtype
    block = sc.storage_chunks(shape, np.dtype(stored_dtype).itemsize)[0]  # whole storage chunks: each written once
    # FP8 quantisation works on a float32 copy: read at most one chunk's worth of float32 at a time
    scales = []
    for e in range(0, shape[0], block):
        part = transform(reader.get(name, dtype=read_dtype, rows=(e, min(e + block, shape[0]))))
        if quantise:
            part, scale = sc.quantize_fp8(part, per_expert=True)
            scales.append(scale)
        writer.write_rows(store, part.astype(part.dtype if quantise else out_dtype, copy=False), e, at)
        del part
        _release_freed_memory()
    return np.concatenate(scales) if quantise else None


def migrate(src: str | os.PathLike, out: str | os.PathLike, progress=sys.stderr) -> Path:
    """A sharded checkpoint or a LoRA run directory saved before the layers were stacked (per-layer `layers.N`
    arrays) rewritten in the stacked layout as `out` (`--migrate`)."""
    import shutil

    from small4_jax.ckpt import sharded as sc
    from small4_jax.config import Small4Config, read_yaml

    src, out = Path(src), Path(out)
    if sc.is_sharded_checkpoint(src):
        f = src / sc.CONFIG_FILE
        config = Small4Config.from_dict(json.loads(f.read_text()), source=str(f))
        return sc.migrate_per_layer(src, out, config, progress=progress)
    if not ((src / "config.yaml").is_file() and (src / "checkpoints").is_dir()):
        raise CheckpointError(f"{src}: neither a sharded checkpoint ({sc.CONFIG_FILE} and _METADATA) nor a training "
                              "run directory (config.yaml and checkpoints/): --migrate rewrites one saved before the "
                              "layers were stacked")
    if out.exists():
        raise CheckpointError(f"{out}: exists; choose another --to or remove it")
    model = read_yaml(src / "config.yaml").get("model")
    config = Small4Config.from_dict(model if isinstance(model, dict) else {}, source=f"{src / 'config.yaml'}: model")
    items = [d for d in sorted((src / "checkpoints").glob("*/*")) if sc.is_per_layer(d)]
    if not items:
        raise CheckpointError(f"{src}: no per-layer checkpoint in {src / 'checkpoints'} (nothing to migrate)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(src, partial, ignore=lambda d, names: [n for n in names if Path(d, n) in items])
    for item in items:  # each saved step's state: LoRA parameters, the optimizer's moments over them
        sc.migrate_per_layer(item, partial / item.relative_to(src), config, progress=progress, fill_missing=True)
    os.replace(partial, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m small4_jax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="src", required=True, help="HF or Mistral-native checkpoint directory")
    p.add_argument("--to", dest="out", required=True, help="output directory (built in OUT.partial, then renamed)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "f32"], help="storage dtype (default bf16)")
    p.add_argument("--quantize", metavar="FORMAT", default=None,
                   help="store linears and experts quantised: fp8, int8, int4 (routed experts int4, dense linears "
                   "int8) or int4-all (int4 everywhere) (small4_jax.quant.formats.SPELLINGS; loads without requantising)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="with --quantize int4 / int4-all: GPTQ on the int4 weights against the activations of this JSONL text "
                        "(small4_jax.quant.calibration; one float layer at a time)")
    p.add_argument("--gptq-act-order", action="store_true",
                   help="with --calibration: quantise each weight's inputs by decreasing Hessian diagonal")
    p.add_argument("--migrate", action="store_true",
                   help="--from is a sharded checkpoint or a LoRA run directory saved before the layers were stacked: "
                   "rewrite it in the stacked layout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    on_interrupt(lambda: f"{a.out} is not written yet; the same command again resumes the conversion "
                         f"({a.out}.partial)")
    try:
        if a.migrate:
            out = migrate(a.src, a.out, progress=None if a.quiet else sys.stderr)
            print(f"wrote {out}", file=sys.stderr)
            return 0
        out = convert(a.src, a.out, dtype=a.dtype, progress=None if a.quiet else sys.stderr, quantize=a.quantize,
                      calibration=a.calibration, act_order=a.gptq_act_order)
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
