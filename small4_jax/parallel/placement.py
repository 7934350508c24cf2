"""Put an in-memory model's variables on a device mesh, by the rules `from_pretrained` uses when it loads.

`from_pretrained(path, mesh=...)` places each tensor as it is read; a model built in memory (a random preset, a
test model, a fine-tuning base) and LoRA adapters are placed afterwards with `place_model`, through the same
`small4_jax.parallel.sharding.spec_for` table (adapters: `lora.lora_spec`, beside their base), so the serving engine
and the trainer see one layout whichever way the model was made.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from small4_jax.parallel.sharding import spec_for


def place_model(model: nnx.Module, mesh: Mesh, what=..., spec: Callable | None = None,
                shard_latent_proj: bool = False) -> nnx.Module:
    """Move the variables of `model` that `what` selects (an nnx filter; all of them by default) to their sharding on
    `mesh`, in place; returns the model. `spec(path, shape, mesh)` gives each one's PartitionSpec (default
    `sharding.spec_for`: the base weights' table, with the `shard_latent_proj` layout option)."""
    flat = []
    for path, value in nnx.to_flat_state(nnx.state(model, what)):
        arr = value[...] if hasattr(value, "replace") else value
        pspec = (spec(path, arr.shape, mesh) if spec is not None else
                 spec_for(path, arr.shape, mesh, dtype=arr.dtype, shard_latent_proj=shard_latent_proj))
        placed = jax.device_put(arr, NamedSharding(mesh, pspec))
        flat.append((path, value.replace(placed) if hasattr(value, "replace") else placed))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
