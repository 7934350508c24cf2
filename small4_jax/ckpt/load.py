"""`from_pretrained`: a checkpoint directory into a model, one tensor at a time.

The model is first built abstractly (shapes only). For each parameter we know the canonical checkpoint name and the
HF shape it must have; the whole checkpoint is checked against that plan before anything is read, so missing,
unexpected and mis-shaped tensors come back as one error listing all of them. Then each tensor is read (dequantised
if FP8), transposed to our [in, out] layout and put straight onto its device and sharding, so peak host memory stays
near the largest single tensor.

Reading the files (HF or Mistral-native safetensors, prefixes, FP8 scales) is `safetensors_io.CheckpointReader`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from small4_jax.ckpt import sharded as sharded_ckpt
from small4_jax.ckpt.plan import TensorSource, checkpoint_plan, load_state, numpy_dtype, verify_source
from small4_jax.ckpt.safetensors_io import CheckpointReader
from small4_jax.config import Small4Config, load_config
from small4_jax.errors import CheckpointError, ConfigError
from small4_jax.nn.model import DecoderLayer, Small4ForCausalLM, abstract_model
from small4_jax.quant import formats as quant
from small4_jax.quant.calibration import quantize_in_memory, read_sequences

log = logging.getLogger("small4_jax")


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
        if np.issubdtype(x.dtype, np.floating) or x.dtype == numpy_dtype("bfloat16"):
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

    return load_state(graphdef, state, plan, source, dtype=dtype, mesh=mesh, where=where, quantised=quantised)


def load_layer(config: Small4Config, source: TensorSource, i: int, *, dtype="float32") -> nnx.Module:
    """Decoder layer i alone, unstacked, in `dtype` on the default device: only its tensors are read from `source`
    (`layers.{i}.*`, mapped as `checkpoint_plan` maps a stack's slice). What the layer-at-a-time GPTQ pipeline
    (`convert --quantize int4 --calibration`) holds of a model at any time."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLayer(config, i, dtype=dtype, rngs=nnx.Rngs(0))))
    return load_state(graphdef, state, checkpoint_plan(state), source, dtype=dtype, prefix=f"layers.{i}.",
                      committed=False)


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
        return load_calibrated(path, calibration, dtype=dtype, mesh=mesh, config=config, quantize=quantize)
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


def load_calibrated(path, calibration, *, dtype="bfloat16", mesh=None, config=None, quantize: str | None = "int4",
                    act_order: bool = False):
    """`from_pretrained(path, quantize="int4", calibration=...)`: the float model is loaded (in `dtype`, on `mesh`)
    and quantised by GPTQ layer by layer (`quantize_in_memory`) on the calibration sequences (a JSONL file, module
    docstring, or a list of token-id lists). The float model must fit where it is loaded; for models that do not,
    `python -m small4_jax.convert --quantize int4 --calibration FILE` holds one layer at a time."""
    if "int4" not in (quant.policy(quantize) or ()):
        raise ConfigError(f"calibration is for quantize='int4' or 'int4-all' (GPTQ on the int4 weights); got "
                          f"quantize={quantize!r}")
    model = from_pretrained(path, dtype=dtype, mesh=mesh, config=config, quantize="none")
    return quantize_in_memory(model, read_sequences(path, calibration), quantize=quantize, act_order=act_order)
