"""Put an in-memory model's parameters on a device mesh, by the rules `from_pretrained` uses when it loads.

`from_pretrained(path, mesh=...)` places each tensor as it is read; a model built in memory (a random preset, a
test model) is placed afterwards with `place_model`, through the same `small4_jax.parallel.sharding.sharding_for`, so the
serving engine sees one layout whichever way the model was made.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from small4_jax.parallel.sharding import sharding_for


def place_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move every parameter of `model` to its sharding on `mesh` (in place); returns the model."""
    _, state = nnx.split(model)
    flat = []
    for path, value in nnx.to_flat_state(state):
        arr = value[...] if hasattr(value, "replace") else value
        placed = jax.device_put(arr, sharding_for(path, arr.shape, mesh))
        flat.append((path, value.replace(placed) if hasattr(value, "replace") else placed))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
