"""Weight initialisers of the model's layers (a leaf: the building blocks, experts, decoder and vision encoder use it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def normal_init(stddev: float):
    """`nnx.initializers.normal(stddev)`, drawn on the host when the key is concrete: a random model is made of
    many differently shaped weights, and each shape drawn eagerly by jax costs an XLA compile (51 compiles, 5-20 s
    for the tiny model on a 2-core CPU); numpy's generator, seeded by the key's bits, costs none. Under tracing
    (`nnx.eval_shape`, jit) it is jax's own normal initializer."""
    traced = nnx.initializers.normal(stddev)

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):
            return traced(key, shape, dtype)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
        return jax.device_put((rng.standard_normal(shape, dtype=np.float32) * np.float32(stddev)).astype(dtype))

    return init
