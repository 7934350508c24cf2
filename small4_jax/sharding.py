"""Logical axes of every parameter and the one table that maps them to mesh axes.

A parameter's logical axes come from its path in the model (`param_axes`); `RULES` maps logical names to mesh axis
names. A logical axis is sharded only when its mesh axis exists in the mesh and divides the dimension; otherwise it
stays replicated, so any mesh shape loads any checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis
RULES: dict[str, str] = {
    "experts": "expert",
    "expert_mlp": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
}

_COLUMN = ("q_b_proj", "kv_b_proj", "q_proj", "gate_proj", "up_proj")  # [in, out]: shard the output dim
_ROW = ("o_proj", "down_proj")  # [in, out]: shard the input dim


def param_axes(path: Sequence, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (a tuple of module names / indices ending in the parameter name)."""
    names = [str(p) for p in path]
    leaf = names[-1]
    parent = names[-2] if len(names) > 1 else ""
    if parent == "experts" and leaf == "gate_up":
        return ("experts", None, "expert_mlp")
    if parent == "experts" and leaf == "down":
        return ("experts", "expert_mlp", None)
    if parent == "embed_tokens":
        return ("vocab", None)
    if parent == "lm_head" and leaf == "kernel":
        return (None, "vocab")
    if leaf == "kernel" and parent in _COLUMN:
        return (None, "heads" if parent.endswith("_b_proj") or parent == "q_proj" else "mlp")
    if leaf == "kernel" and parent in _ROW:
        return ("heads" if parent == "o_proj" else "mlp", None)
    return (None,) * ndim


def spec_for(path: Sequence, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    axes = param_axes(path, len(shape))
    out = []
    for dim, logical in zip(shape, axes):
        mesh_axis = RULES.get(logical) if logical else None
        if mesh_axis in mesh.shape and mesh.shape[mesh_axis] > 1 and dim % mesh.shape[mesh_axis] == 0:
            out.append(mesh_axis)
        else:
            out.append(None)
    return PartitionSpec(*out)


def sharding_for(path: Sequence, shape: Sequence[int], mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, spec_for(path, shape, mesh))


def make_mesh(shape: dict[str, int]) -> Mesh:
    """A mesh from {'data': 1, 'expert': 8, 'tensor': 1}; the product must equal the number of devices used."""
    names = tuple(shape)
    # Auto axes: XLA propagates shardings through the model; the expert-parallel shard_map comes on top of this.
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(shape[n] for n in names), names, axis_types=auto)
