"""Logical axes of every parameter and the one table that maps them to mesh axes.

A parameter's logical axes come from its path in the model (`param_axes`); `RULES` maps logical names to mesh axis
names. A logical axis is sharded only when its mesh axis exists in the mesh and divides the dimension; otherwise it
stays replicated, so any mesh shape loads any checkpoint.

The expert-parallel MoE (`moe.routed_experts` under a mesh) takes its layout from here too: `moe_layout` gives the
`shard_map` specs of tokens, expert weights and expert adapters, derived from the same rules, so the weights enter
the `shard_map` exactly as they are stored. `mesh_of` finds the mesh a MoE layer runs on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from small4_jax.errors import ConfigError
from small4_jax.quant.formats import int4_group

# logical axis -> mesh axis (or axes, major first)
RULES: dict[str, str | tuple[str, ...]] = {
    # Activations' batch / token axis of all non-routed work (attention, dense and shared-expert MLPs, norms,
    # lm_head, the loss, sampling; and the paged cache's pages): split over `data` AND `expert` together
    # (data-parallel attention). The routed experts split their weights over `expert` and exchange rows with an
    # all-to-all (moe.py), so an expert shard computes attention for its own rows instead of every shard repeating
    # the whole batch's.
    "batch": ("data", "expert"),
    "experts": "expert",
    "expert_mlp": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    # the input (hidden) dim of the latent projections, q_a_proj and kv_a_proj_with_mqa, sharded only with the
    # `shard_latent_proj` layout option (`spec_for`): each device reads 1/tp of them and their outputs are summed
    # over `tensor` (one more all-reduce a layer, XLA's combiner merging the two projections'); replicated otherwise
    "latent_in": "tensor",
    # The vision encoder (nn/vision.py) runs once per image, for one packed sequence (no batch to split): its heads
    # and MLP width are split over every mesh axis, so each device does 1/N of the encoding whatever the layout.
    "vision_heads": ("tensor", "expert", "data"),
    "vision_mlp": ("tensor", "expert", "data"),
}

_COLUMN = ("q_b_proj", "kv_b_proj", "q_proj", "gate_proj", "up_proj")  # [in, out]: shard the output dim
_ROW = ("o_proj", "down_proj")  # [in, out]: shard the input dim
LATENT_PROJ = ("q_a_proj", "kv_a_proj_with_mqa")  # [in, out]: the input dim with `shard_latent_proj`, else whole


def param_axes(path: Sequence, ndim: int, shard_latent_proj: bool = False) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (a tuple of module names / indices ending in the parameter name).

    A layer stack's parameter (`layer_stacks/g/...`, model.py) has the axes of its layer behind a leading layer axis,
    which is never sharded: every device holds its share of every layer, and the scan slices it locally.
    shard_latent_proj: the latent projections' input dim is "latent_in" (`RULES`), else they stay whole."""
    names = [str(p) for p in path]
    if len(names) > 2 and names[0] == "layer_stacks":
        return (None,) + param_axes(names[2:], ndim - 1, shard_latent_proj)
    leaf = names[-1]
    parent = names[-2] if len(names) > 1 else ""
    if names[0] in ("vision_tower", "multi_modal_projector") and leaf == "kernel" and ndim == 2:
        if parent in ("q_proj", "k_proj", "v_proj"):
            return (None, "vision_heads")
        if parent == "o_proj":
            return ("vision_heads", None)
        if parent in ("gate_proj", "up_proj", "linear_1"):
            return (None, "vision_mlp")
        if parent in ("down_proj", "linear_2"):
            return ("vision_mlp", None)
        return (None,) * ndim
    if names[0] in ("vision_tower", "multi_modal_projector"):
        return (None,) * ndim
    if leaf.endswith("_scale"):  # a quantised weight's scale grid (or W8A8 activation scale): its weight's axes
        leaf = leaf[: -len("_act_scale" if leaf.endswith("_act_scale") else "_scale")]
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
    if leaf == "kernel" and parent in LATENT_PROJ and shard_latent_proj and ndim == 2:
        return ("latent_in", None)
    return (None,) * ndim


def scale_spec(values_spec: PartitionSpec, scale_shape: Sequence[int]) -> PartitionSpec:
    """The spec of a quantised weight's scale grid (quant.py): its weight's mesh axes on the dims where the grid has
    more than one block, replicated where it has one (a per-tensor or per-expert scale), so that every shard holds
    the scales of exactly the weight blocks it holds."""
    spec = tuple(values_spec) + (None,) * (len(scale_shape) - len(values_spec))
    return PartitionSpec(*(a if d > 1 else None for a, d in zip(spec, scale_shape)))


def mesh_axes(logical: str | None, mesh, size: int | None = None) -> tuple[str, ...]:
    """The mesh axes `RULES` maps `logical` to that `mesh` has with more than one device, major first; with `size`,
    the longest prefix of them whose product divides it (a dimension the axes do not divide stays replicated on
    the rest)."""
    rule = RULES.get(logical) if logical else None
    names = (rule,) if isinstance(rule, str) else tuple(rule or ())
    shape = dict(mesh.shape) if mesh is not None else {}
    out: list[str] = []
    for name in names:
        n = shape.get(name, 1)
        if n > 1 and (size is None or size % (math.prod(shape[a] for a in out) * n) == 0):
            out.append(name)
        elif n > 1:
            break
    return tuple(out)


def _entry(axes: tuple[str, ...]):
    """A PartitionSpec entry for `axes`: None, one name, or a tuple of names."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def batch_axes(mesh, rows: int | None = None) -> tuple[str, ...]:
    """The mesh axes a batch of `rows` rows (or tokens) of non-routed work is split over (`RULES["batch"]`)."""
    return mesh_axes("batch", mesh, rows)


def batch_spec(mesh, rows: int | None = None, leading: int = 0) -> PartitionSpec:
    """The PartitionSpec of activations [..., rows, ...] with `leading` unsharded axes before the rows axis."""
    return PartitionSpec(*(None,) * leading, _entry(batch_axes(mesh, rows)))


def spec_for(path: Sequence, shape: Sequence[int], mesh: Mesh, *, dtype=None,
             shard_latent_proj: bool = False) -> PartitionSpec:
    """The PartitionSpec of the parameter at `path` of `shape` (and `dtype`, when known) on `mesh` (`param_axes`,
    `RULES`).

    shard_latent_proj (the `--shard-latent-proj` layout option): q_a_proj and kv_a_proj_with_mqa split over `tensor`
    by their input dim, so a tensor-parallel device reads 1/tp of them instead of all, for one more collective a
    layer (README, "Choosing a layout on 8 GPUs").

    The routed experts' int4 `down` [.., E, F/2, H] (uint8, two rows a byte within each group of
    `quant.formats.int4_group(F)` rows) is interpreted per shard inside the expert-parallel `shard_map`: a shard of
    F / tp rows that is not a whole number of groups would read other groups' rows as its own. Such a split is
    refused (ConfigError naming the mesh, the width per shard and the group size)."""
    axes = param_axes(path, len(shape), shard_latent_proj)
    spec = PartitionSpec(*(_entry(mesh_axes(logical, mesh, dim)) for dim, logical in zip(shape, axes)))
    if dtype is not None and np.dtype(dtype) == np.uint8 and len(shape) >= 3:
        _check_int4_split(path, shape, spec, mesh)
    return spec


def _check_int4_split(path, shape, spec: PartitionSpec, mesh) -> None:
    names = [str(p) for p in path]
    if names[-2:] != ["experts", "down"] or spec[-2] is None:
        return
    axes = (spec[-2],) if isinstance(spec[-2], str) else tuple(spec[-2])
    n = math.prod(dict(mesh.shape)[a] for a in axes)
    width, group = 2 * shape[-2], int4_group(2 * shape[-2])
    if (width // n) % group:
        text = ",".join(f"{k}={v}" for k, v in dict(mesh.shape).items())
        raise ConfigError(
            f"int4 routed experts on the mesh {text}: {'/'.join(names)} splits the expert width {width} over "
            f"{'x'.join(axes)} ({n} shards) into {width // n} rows per shard, not a multiple of the int4 group size "
            f"{group}; use a {'x'.join(axes)} size that leaves whole groups (dividing {width // group}), or fp8 / "
            "int8 experts")


def sharding_for(path: Sequence, shape: Sequence[int], mesh: Mesh | None, dtype=None) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, spec_for(path, shape, mesh, dtype=dtype))


MESH_AXES = ("data", "expert", "tensor")  # the mesh axis names RULES and the MoE layout use


def parse_mesh(spec: str | dict, where: str = "--mesh") -> dict[str, int]:
    """The one mesh parser: 'data=1,expert=8,tensor=1' (a flag) or a mapping (YAML) -> {'data': 1, ...}.

    Axis names must be among MESH_AXES (a typo such as `exprt` would otherwise run unsharded) and sizes positive
    integers; a ConfigError names `where` and the offending part.
    """
    expected = f"name=size pairs over the axes {', '.join(MESH_AXES)}, e.g. data=1,expert=8,tensor=1"
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            name, eq, size = (x.strip() for x in part.partition("="))
            if not name or not eq or not size.isdigit():
                raise ConfigError(f"{where}: {part.strip()!r} in {spec!r} is not name=size; expected {expected}")
            pairs.append((name, int(size)))
    elif isinstance(spec, dict):
        pairs = list(spec.items())
        for name, size in pairs:
            if not isinstance(size, int) or isinstance(size, bool):
                raise ConfigError(f"{where}: size of axis {name!r} = {size!r}; expected a positive integer")
    else:
        raise ConfigError(f"{where}: got {spec!r}; expected {expected}")
    shape: dict[str, int] = {}
    for name, size in pairs:
        if name not in MESH_AXES:
            raise ConfigError(f"{where}: unknown mesh axis {name!r}; expected {expected}")
        if name in shape:
            raise ConfigError(f"{where}: axis {name!r} given twice")
        if size <= 0:
            raise ConfigError(f"{where}: size of axis {name!r} = {size}; expected a positive integer")
        shape[name] = size
    return shape


def make_mesh(shape: str | dict[str, int], where: str = "--mesh") -> Mesh:
    """A mesh from {'data': 1, 'expert': 8, 'tensor': 1} (or its text form); the product of the sizes must equal the
    number of devices in the job (a ConfigError saying both otherwise)."""
    shape = parse_mesh(shape, where)
    names = tuple(shape)
    size, n = math.prod(shape.values()), jax.device_count()
    if size != n:
        text = ",".join(f"{k}={v}" for k, v in shape.items())
        raise ConfigError(f"{where}: {text} spans {size} devices but this job has {n} "
                          f"({jax.default_backend()}); the sizes must multiply to {n}")
    # Auto axes: XLA propagates shardings through the model; the expert-parallel shard_map comes on top of this.
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(shape[n] for n in names), names, axis_types=auto)


# ----------------------------------------------------------------------------------------------------------------------
# Expert parallelism.
@dataclasses.dataclass(frozen=True)
class MoELayout:
    """How one MoE call is laid out on a mesh inside `shard_map` (strategy-independent parts).

    `expert_axis` / `tensor_axis` / `data_axis` are the mesh axis names in use (None when absent); `ep` and `tp`
    their sizes. Expert weights are sharded over experts on `expert_axis` (ep must divide E) and over the expert
    MLP width on `tensor_axis` when tp divides F (else tp = 1 and the weights enter replicated over `tensor`).
    """

    mesh: Mesh | AbstractMesh
    data_axis: str | None
    expert_axis: str | None
    tensor_axis: str | None
    data: int
    ep: int
    tp: int

    def token_spec(self, all_to_all: bool = True) -> PartitionSpec:
        """Tokens [N, ...] enter and leave split over data x expert, as the non-routed work holds them
        (`RULES["batch"]`), with either strategy: the replicated one gathers its expert group's tokens inside."""
        axes = tuple(a for a in (self.data_axis, self.expert_axis) if a)
        return PartitionSpec(axes if axes else None)

    def token_shards(self, all_to_all: bool = True) -> int:
        return self.data * self.ep

    @property
    def gate_up_spec(self) -> PartitionSpec:  # [E, H, 2F]
        return PartitionSpec(self.expert_axis, None, self.tensor_axis if self.tp > 1 else None)

    @property
    def down_spec(self) -> PartitionSpec:  # [E, F, H]
        return PartitionSpec(self.expert_axis, self.tensor_axis if self.tp > 1 else None, None)

    @property
    def lora_specs(self) -> tuple[PartitionSpec, ...]:
        """gate_up_a [E, H, r], gate_up_b [E, r, 2F], down_a [E, F, r], down_b [E, r, H]: each beside its base."""
        t = self.tensor_axis if self.tp > 1 else None
        e = self.expert_axis
        return PartitionSpec(e, None, None), PartitionSpec(e, None, t), PartitionSpec(e, t, None), PartitionSpec(e)


def moe_layout(mesh, num_experts: int, intermediate: int) -> MoELayout | None:
    """The expert-parallel (and / or tensor-parallel) layout on `mesh`, or None when its `expert` axis does not divide
    the experts, or it has no expert axis and no `tensor` axis dividing F. On a mesh with a tensor axis but no expert
    axis (the latency layout, `--mesh tensor=8`), expert_axis is None and ep 1: every shard holds all experts at
    F / tp of their width."""
    shape = dict(mesh.shape)
    expert = RULES["experts"]
    data = next(a for a in RULES["batch"] if a != expert)  # the batch axis the experts are not sharded over
    tensor = RULES["expert_mlp"]
    tp = shape.get(tensor, 1)
    if intermediate % tp:
        tp = 1
    if expert in shape and num_experts % shape[expert]:
        return None  # the experts cannot split over `expert`: XLA partitions the single-device code
    if expert not in shape and tp == 1:
        return None
    return MoELayout(
        mesh=mesh,
        data_axis=data if data in shape else None,
        expert_axis=expert if expert in shape else None,
        tensor_axis=tensor if tensor in shape else None,
        data=shape.get(data, 1),
        ep=shape.get(expert, 1),
        tp=tp,
    )


def keep_last_dim_whole(x: jax.Array) -> jax.Array:
    """x with its last dim unsharded on the mesh it lives on (`mesh_of`), its other dims as XLA chooses; x itself
    off a mesh. The `shard_latent_proj` layout pins the latent projections' input and outputs with it, so XLA slices
    the replicated residual locally and all-reduces the partial sums, instead of splitting the residual stream."""
    mesh = mesh_of(x)
    if mesh is None:
        return x
    spec = PartitionSpec(*(PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1), None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_of(x: jax.Array) -> Mesh | AbstractMesh | None:
    """The mesh `x` lives on: the context mesh (`jax.set_mesh`), else the mesh of x's sharding (an abstract mesh,
    eager or under `jit`); None for one device, and inside a `shard_map` (manual axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in getattr(mesh, "axis_types", ())):
        return None
    return mesh
