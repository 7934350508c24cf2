"""Building blocks shared by the text decoder, the vision encoder and the EAGLE head: activations, RMSNorm, the
rotary rotation and the linear layer whose kernel may be a whole layer stack read in place (`moe.AtLayer`)."""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from small4_jax.config import Small4Config
from small4_jax.nn.initializers import normal_init
from small4_jax.nn.moe import AtLayer

ACT = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class RMSNorm(nnx.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), statistics in float32, normalised value cast back before the scale."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """Rotate the pairs of x [..., T, (heads,) d]; cos/sin broadcast as [..., T, 1?, d/2].

    interleave=True rotates pairs (2i, 2i+1) and writes the result de-interleaved ([rotated evens, rotated odds]) as
    transformers does; interleave=False rotates pairs (i, i + d/2). Query and keys always go through the same layout,
    so q.k is what the checkpoint expects.
    """
    dt = x.dtype
    x = x.astype(jnp.float32)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dt)


def _promote_dtype(args, *, dtype=None, inexact=True):
    """nnx.Linear's dtype promotion of (x, kernel, bias), leaving a kernel given as `AtLayer` (its whole stack, passed
    by `run_layers`) as it is: `_dot_general` reads it in place."""
    x, kernel, bias = args
    if not isinstance(kernel, AtLayer):
        return nnx_dtypes.promote_dtype(args, dtype=dtype, inexact=inexact)
    x, bias = nnx_dtypes.promote_dtype((x, bias), dtype=dtype, inexact=inexact)
    return x, kernel, bias


def _dot_general(x, kernel, dims, precision=None, preferred_element_type=None, **kwargs):
    """nnx.Linear's product: `jax.lax.dot_general`, or for an `AtLayer` kernel its stack read at the layer in place
    by the grouped-matmul kernel (`AtLayer.matmul`; run_layers, `dense_impl`)."""
    if isinstance(kernel, AtLayer):
        return kernel.matmul(x, preferred_element_type or x.dtype)
    return jax.lax.dot_general(x, kernel, dims, precision=precision, preferred_element_type=preferred_element_type,
                               **kwargs)


def linear(din: int, dout: int, config: Small4Config, dtype, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(dtype),
        kernel_init=normal_init(config.initializer_range),
        dot_general=_dot_general,
        promote_dtype=_promote_dtype,
        rngs=rngs,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Interception points: what a tool sees of the forward pass (GPTQ calibration's Hessians) without patching classes.
_TAP: contextvars.ContextVar = contextvars.ContextVar("small4_jax_tap", default=None)


@contextlib.contextmanager
def tapping(fn):
    """Within the block, `fn(point, module, *arrays)` is called at the model's interception points as the forward
    runs or is traced: ("linear", the linear, its input x) for every linear of an attention block or MLP
    (`project`), and ("experts", the Experts module, x, expert_ids, expert_weights, gate_up, down, act) before the
    routed experts of a MoE layer. With no tap the points cost nothing (one context-variable read while tracing)."""
    token = _TAP.set(fn)
    try:
        yield
    finally:
        _TAP.reset(token)


def tap(point: str, module, *arrays) -> None:
    """An interception point (`tapping`)."""
    fn = _TAP.get()
    if fn is not None:
        fn(point, module, *arrays)


def project(linear, x: jax.Array) -> jax.Array:
    """linear(x), announced to a tap first (`tapping`)."""
    tap("linear", linear, x)
    return linear(x)
