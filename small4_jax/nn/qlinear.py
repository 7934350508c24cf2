"""Linear layers with quantised kernels (`QLinear`), the quantised dense product (`qdot`), and `quantize_model`: a
model's linears and routed experts quantised in place by the formats of `small4_jax.quant.formats`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from small4_jax.errors import ConfigError
from small4_jax.nn.moe import AtLayer, Experts, at_layer
from small4_jax.quant.formats import (QUANTISED_LINEARS, QArray, check_activations, column_scale, dequantize,
                                      gptq_int4, policy, quantize, scale_dtype, stored_shapes, w8a8_dot)


def qdot(x: jax.Array, q: QArray, dtype) -> jax.Array:
    """x [..., K] @ W [K, N] for a dense quantised kernel, accumulated in float32, returned in `dtype` (W8A8 when
    `q.act_scale` is set: `w8a8_dot`; an `moe.AtLayer` of a stacked QArray: `AtLayer.matmul`, the stack read and
    dequantised tile by tile in the grouped-matmul kernel)."""
    dtype = jnp.dtype(dtype)
    if isinstance(q, AtLayer):  # the weight's stack, read at the layer in place (model.run_layers, dense_impl)
        return q.matmul(x.astype(dtype), dtype)
    if q.act_scale is not None:
        return w8a8_dot(x, q, dtype)
    x = x.astype(dtype)
    if q.scale.shape[-2] == 1 and jnp.dtype(q.values.dtype) != jnp.uint8:
        y = jnp.dot(x, q.values.astype(dtype), preferred_element_type=jnp.float32)
        return (y * column_scale(q)[0].astype(jnp.float32)).astype(dtype)
    return jnp.dot(x, dequantize(q, dtype), preferred_element_type=jnp.float32).astype(dtype)


class QLinear(nnx.Module):
    """A linear layer y = x W + b with a quantised kernel: `kernel` (QArray values, [in, out] or packed) and
    `kernel_scale` beside it, both plain (frozen) parameters. Same attribute names as `nnx.Linear`, so the checkpoint
    map, the sharding rules and LoRA see the same paths."""

    def __init__(self, in_features: int, out_features: int, fmt: str, *, dtype, use_bias: bool = False,
                 activations: str | None = None):
        vshape, sshape, vdtype = stored_shapes((in_features, out_features), fmt)
        self.in_features, self.out_features = in_features, out_features
        self.dtype = jnp.dtype(dtype)
        self.precision = None
        self.kernel = nnx.Param(jnp.zeros(vshape, vdtype))
        self.kernel_scale = nnx.Param(jnp.ones(sshape, scale_dtype(fmt)))
        # W8A8 (activations="fp8"): the checkpoint's static input scale [1, 1], filled by the loader
        act = check_activations(activations, fmt)
        self.kernel_act_scale = nnx.Param(jnp.ones((1, 1), jnp.float32)) if act else None
        self.bias = nnx.Param(jnp.zeros((out_features,), self.dtype)) if use_bias else None

    @classmethod
    def from_linear(cls, linear: nnx.Linear, fmt: str, q: QArray | None = None,
                    activations: str | None = None) -> QLinear:
        """`linear` quantised to `fmt` (or holding the given quantised kernel `q`, e.g. from `gptq_int4`); with
        activations="fp8" a placeholder activation scale (1) for a loader to fill."""
        q = quantize(linear.kernel[...], fmt) if q is None else q
        dtype = linear.dtype or linear.kernel[...].dtype
        out = cls(linear.in_features, linear.out_features, fmt, dtype=dtype, use_bias=linear.bias is not None,
                  activations=activations)
        out.kernel = nnx.Param(q.values)
        out.kernel_scale = nnx.Param(q.scale)
        if out.kernel_act_scale is not None:  # one per layer of a stacked linear
            out.kernel_act_scale = nnx.Param(jnp.ones(q.scale.shape[:-2] + (1, 1), jnp.float32))
        if linear.bias is not None:
            out.bias = nnx.Param(linear.bias[...])
        return out

    def qarray(self) -> QArray:
        """The QArray, or one `moe.AtLayer` of the stacks' QArray where `run_layers` passed them whole."""
        return at_layer(QArray, self.kernel[...], self.kernel_scale[...], act_scale_of(self))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = qdot(x, self.qarray(), self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def effective_kernel(self) -> jax.Array:
        """The dequantised [in, out] matrix (absorbed MLA decode folds kv_b_proj into the query with it)."""
        q = self.qarray()
        return dequantize(q.get() if isinstance(q, AtLayer) else q, self.dtype)


def act_scale_of(layer):
    """A (Q)Linear's static activation scale array (W8A8), or None (weight-only, or a float layer)."""
    a = getattr(layer, "kernel_act_scale", None)
    return None if a is None else a[...]


def quantize_model(model, fmt: str | None, hessians: dict | None = None, activations: str | None = None,
                   act_order: bool = False):
    """Replace, in place, every quantisable linear by a `QLinear` and quantise the routed experts, each part in the
    format `policy(fmt)` gives it; returns model.

    Used on freshly initialised (random) models and inside `nnx.eval_shape` for the abstract model a checkpoint is
    loaded into (whose values dtypes then say what each tensor's format is); checkpoints themselves are quantised
    tensor by tensor on the host (checkpoint.py). With `hessians` (a policy with int4 parts) `model` is one
    unstacked decoder layer and every int4 weight is quantised by `gptq_int4` against its H, keyed by its path in
    the layer (`calibration.calibrate_layer`, which runs GPTQ one layer at a time); int8 / fp8 parts round to
    nearest.

    activations="fp8" (W8A8, fp8 only) adds the static activation scales as parameters (`kernel_act_scale`,
    experts' `gate_up_act_scale` / `down_act_scale`), set to 1: only a loader that fills them from an FP8
    checkpoint's `activation_scale` / `qscale_act` (checkpoint.py) makes a usable model."""
    pol = policy(fmt)
    activations = check_activations(activations, fmt)
    if pol is None:
        return model
    if hessians is not None and "int4" not in pol:
        raise ConfigError(f"calibrated quantisation (GPTQ) is for int4; quantize = {fmt!r}")
    def calibrated(path, w) -> QArray:
        key = tuple(map(str, path))
        if key not in hessians:
            raise ConfigError(f"calibration: no Hessian for {'.'.join(key)} (no calibration input reached it)")
        return gptq_int4(w, hessians[key], act_order=act_order)

    gptq = {part: hessians is not None and f == "int4" for part, f in pol._asdict().items()}
    for path, module in list(nnx.iter_graph(model)):
        if path and str(path[0]) in ("vision_tower", "multi_modal_projector"):
            continue  # the vision encoder and projector stay in the model dtype
        if isinstance(module, Experts):
            if not gptq["experts"]:
                module.quantize(pol.experts, activations)
                continue
            for name in ("gate_up", "down"):  # as Experts.quantize, with the calibrated values
                q = calibrated(tuple(path) + (name,), getattr(module, name)[...])
                setattr(module, name, nnx.Param(q.values))
                setattr(module, name + "_scale", nnx.Param(q.scale))
            continue
        if not isinstance(module, nnx.Module):
            continue
        for name in QUANTISED_LINEARS:
            child = getattr(module, name, None)
            if type(child) is nnx.Linear:
                q = calibrated(tuple(path) + (name, "kernel"), child.kernel[...]) if gptq["dense"] else None
                setattr(module, name, QLinear.from_linear(child, pol.dense, q, activations))
    return model


def weight_bytes(model) -> int:
    """Bytes of every parameter of `model` (quantised values and scales at their stored widths)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model))))
