"""LoRA adapters on Mistral Small 4: attention projections, dense and shared MLPs, and every routed expert.

Adapters are attached by module surgery on a built model (`apply_lora`); model.py knows nothing about them.

    before                                         after
    layers[i].self_attn.q_a_proj: nnx.Linear       LoRALinear(kernel, bias?, lora_a [in, r], lora_b [r, out])
    layers[i].mlp.shared_experts.gate_proj ...     LoRALinear (same for up_proj, down_proj, dense-layer MLPs)
    layers[i].mlp.experts.lora: None               ExpertsLoRA(gate_up_a [E, H, r], gate_up_b [E, r, 2F],
                                                               down_a [E, F, r],  down_b [E, r, H])
    layers[i].mlp.gate (router, only if asked)     LoRARouter(weight [H, E], lora_a [H, r], lora_b [r, E])

`LoRALinear` keeps the base `kernel` / `bias` under their own names, so the checkpoint map and the sharding rules
see the same paths as for the plain model; the adapters sit beside them. On the model's layer stacks (model.py) an
adapter is stacked like its base ([layers, in, r] ...): one adapter module per stacked module, with a per-layer
`active` flag (0 on the stack's layers the targets did not pick: they add exactly nothing and get zero gradients).
Paths, targets, `adapters()` and the PEFT files stay per layer (`layers.{i}.self_attn.q_a_proj`); within one stack
a module's adapters share one rank and alpha. Routed experts are never merged: the
`ExpertLoRA` hook of `moe.routed_experts` runs two extra grouped matmuls per projection over the same sorted rows
and group sizes as the base (W_e x + s * B_e A_e x).

Numerics: adapters are `nnx.LoRAParam` in float32 (the optimizer state follows them); they are cast to the
activation dtype (bf16 for training) at the matmul. y = base(x) + (alpha / r) * (dropout(x) @ A) @ B, as in PEFT;
A starts uniform(+-1/sqrt(in)) (PEFT's kaiming-uniform), B at zero, so a fresh adapter is the identity.

The base is frozen by construction: training differentiates and optimises only `nnx.LoRAParam` state
(`TRAINABLE`); base parameters are plain `nnx.Param` and get neither gradients nor optimizer state.

Targets (`LoRAConfig.targets`), each one of:
- an alias: "attention" (q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj), "shared_experts",
  "dense_mlp" (MLPs of the first_k_dense_replace layers), "experts" (routed), "router", "all" (everything but the
  router);
- a module name or dotted suffix: "o_proj", "gate_proj" (dense and shared), "shared_experts.down_proj";
- a regular expression matched against the whole path, e.g. r"layers\\.[0-3]\\.self_attn\\..*".
A target that matches nothing is an error. The router is adapted only when named ("router", "gate" or a path
ending in "mlp.gate"); patterns never pick it up. The same holds for the multimodal projector's linears (alias
"projector", or "multi_modal_projector.linear_1" / "linear_2" / "patch_merger.merging_layer"): the vision encoder
and projector stay frozen unless named. Dropout applies to the dense adapters only (PEFT's
`target_parameters` experts have none either); its mask comes from a `DropoutKey` the trainer sets per micro-batch.

`moe_rank_scaling`: routed experts get rank max(1, r // top_k) (a token sees top_k experts, so its expert adapter
capacity matches the dense rank); every adapter's scale is alpha / its own rank.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from small4_jax.ckpt.safetensors_io import read_safetensors_header, save_safetensors
from small4_jax.errors import CheckpointError, ConfigError, Small4Error
from small4_jax.nn.model import MLA, MLP, MoE, PerLayer, Router, Shared, Small4ForCausalLM, layer_groups, layer_slice
from small4_jax.nn.moe import AtLayer, ExpertLoRA, Experts, at_layer, sliced
from small4_jax.nn.qlinear import act_scale_of, qdot
from small4_jax.quant.formats import QArray, dequantize, logical_shape
from small4_jax.parallel.placement import place_model
from small4_jax.parallel.sharding import spec_for

TRAINABLE = nnx.LoRAParam  # the filter of everything training updates
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # base weights (LoRAParam subclasses Param)

ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
ALIASES = {
    "attention": {"attention"},
    "self_attn": {"attention"},
    "shared_experts": {"shared_experts"},
    "dense_mlp": {"dense_mlp"},
    "experts": {"experts"},
    "router": {"router"},
    "projector": {"projector"},
    "all": {"attention", "shared_experts", "dense_mlp", "experts"},
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which modules get adapters and how big they are."""

    targets: tuple[str, ...] = ("all",)  # aliases, names or regexes (module docstring)
    rank: int = 8  # r of the dense adapters (and of the experts unless moe_rank_scaling)
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0  # on the input of dense adapters during training
    moe_rank_scaling: bool = False  # expert rank = max(1, rank // num_experts_per_tok)
    seed: int = 0  # adapter init (and the dropout stream)

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ConfigError("lora.targets: empty; name at least one target (e.g. 'all')")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"lora.rank = {self.rank!r}; expected a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha = {self.alpha!r}; expected a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout = {self.dropout!r}; expected 0 <= dropout < 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "lora") -> LoRAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def expert_rank(self, top_k: int) -> int:
        return max(1, self.rank // top_k) if self.moe_rank_scaling else self.rank


# ----------------------------------------------------------------------------------------------------------------------
# Adapter modules.
def _init_a(key, shape, fan_in: int) -> jax.Array:
    """PEFT's A init; `key` [n] (one key per layer of a stack) gives [n, *shape]."""
    bound = 1.0 / math.sqrt(fan_in)
    if jnp.ndim(key) == 1:
        return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -bound, bound))(key)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _lead(key) -> tuple[int, ...]:
    """The stack's leading shape for per-layer keys [n], () for one key."""
    return tuple(key.shape[:1]) if jnp.ndim(key) == 1 else ()


def _per_layer(value, lead: tuple[int, ...], dtype) -> PerLayer:
    return PerLayer(jnp.broadcast_to(jnp.asarray(value, dtype), lead))


def base_output(layer, x: jax.Array) -> jax.Array:
    """x W + b of an adapted linear's frozen base in its compute dtype: `kernel` [in, out] (quantised when
    `kernel_scale` is set: `qlinear.qdot` dequantises in the product), optional `bias`. Shared by the single- and the
    multi-adapter linears (multi_lora.py)."""
    kernel = layer.kernel[...]
    if layer.kernel_scale is not None:
        y = qdot(x, at_layer(QArray, kernel, layer.kernel_scale[...], act_scale_of(layer)), layer.dtype)
    elif isinstance(kernel, AtLayer):  # the stack, read at the layer in place (model.run_layers, dense_impl)
        y = kernel.matmul(x, layer.dtype)
    else:
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = jax.lax.dot_general(x, kernel.astype(layer.dtype), dims, precision=layer.precision)
    if layer.bias is not None:
        y = y + layer.bias[...].astype(layer.dtype)
    return y


class DropoutKey(Shared):
    """The adapter-dropout key (a raw uint32[2] PRNG key). Never mutated by the model: the trainer derives one per
    micro-batch from (seed, step, micro-batch), so dropout needs no RNG state to checkpoint."""


class LoRALinear(nnx.Module):
    """An `nnx.Linear` (kernel [in, out], optional bias) plus a low-rank update: x W + b + s (x A) B.

    Over a `qlinear.QLinear` (QLoRA) the frozen base stays quantised: `kernel` holds its values and `kernel_scale` its
    scales, and x W is `qlinear.qdot` (gradients flow to x through the dequantising product, never to the base)."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float = 0.0, *, key,
                 dropout_key: DropoutKey | None = None, index=0, active=1.0):
        """key: one PRNG key, or [n] keys for a stacked base (then index / active are [n] per layer)."""
        lead = _lead(key)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype = base.dtype or base.kernel[...].dtype
        self.precision = base.precision
        self.kernel = base.kernel
        self.kernel_act_scale = getattr(base, "kernel_act_scale", None)  # W8A8 (quant.py)
        self.kernel_scale = getattr(base, "kernel_scale", None)  # a quantised base (QLoRA)
        self.bias = base.bias
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nnx.LoRAParam(_init_a(key, (self.in_features, rank), self.in_features))
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, self.out_features), jnp.float32))
        self.active = _per_layer(active, lead, jnp.float32)
        self.dropout_rate, self.index = dropout, _per_layer(index, lead, jnp.int32)
        self.dropout_key = dropout_key if dropout > 0 else None  # one Variable shared by every adapter
        self.deterministic = True  # set_dropout(model, True) for training

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = base_output(self, x)
        xd = x
        if self.dropout_key is not None and not self.deterministic:
            k = jax.random.fold_in(self.dropout_key[...], self.index[...])
            keep = jax.random.bernoulli(k, 1.0 - self.dropout_rate, x.shape)
            xd = jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)
        low = (xd @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return y + (self.scale * self.active[...] * low).astype(y.dtype)

    def delta(self) -> jax.Array:
        """The merged update s A B [(layers,) in, out], float32."""
        return self.scale * self.active[...][..., None, None] * (self.lora_a[...] @ self.lora_b[...])

    def effective_kernel(self) -> jax.Array:
        """W + s A B [in, out] in the compute dtype (what absorbed MLA decode folds into the query), unmerged."""
        return (self.base_kernel() + self.delta()).astype(self.dtype)

    def base_kernel(self) -> jax.Array:
        """The frozen base matrix [in, out] in float32 (dequantised for a quantised base)."""
        if self.kernel_scale is not None:
            return dequantize(sliced(at_layer(QArray, self.kernel[...], self.kernel_scale[...])), jnp.float32)
        return sliced(self.kernel[...]).astype(jnp.float32)


class ExpertsLoRA(nnx.Module):
    """Stacked per-expert adapters for `Experts` (set as `experts.lora`); read by `moe.routed_experts`."""

    def __init__(self, experts: Experts, rank: int, alpha: float, *, key, active=1.0):
        # logical [E, H, 2F] (also for packed int4 values), from shape and dtype only: the model may be abstract
        lead = _lead(key)
        e, h, f2 = logical_shape(experts.gate_up.shape, experts.gate_up.dtype)[-3:]
        f = f2 // 2
        k1, k2 = (jax.vmap(jax.random.split, out_axes=1)(key) if lead else jax.random.split(key))
        self.rank, self.scale = rank, alpha / rank
        self.gate_up_a = nnx.LoRAParam(_init_a(k1, (e, h, rank), h))
        self.gate_up_b = nnx.LoRAParam(jnp.zeros(lead + (e, rank, f2), jnp.float32))
        self.down_a = nnx.LoRAParam(_init_a(k2, (e, f, rank), f))
        self.down_b = nnx.LoRAParam(jnp.zeros(lead + (e, rank, h), jnp.float32))
        self.active = _per_layer(active, lead, jnp.float32)

    def weights(self) -> ExpertLoRA:
        # the layer's flag multiplies the B matrices: the scale stays a Python number (a static of the
        # expert-parallel shard_map), and an inactive layer's adapter adds zeros and gets zero gradients
        on = self.active[...]
        return ExpertLoRA(self.gate_up_a[...], self.gate_up_b[...] * on, self.down_a[...], self.down_b[...] * on,
                          self.scale)

    def delta(self) -> tuple[jax.Array, jax.Array]:
        """Merged updates (gate_up [(layers,) E, H, 2F], down [(layers,) E, F, H]), float32."""
        s = self.scale * self.active[...][..., None, None, None]
        gu = s * jnp.einsum("...ehr,...erf->...ehf", self.gate_up_a[...], self.gate_up_b[...])
        dn = s * jnp.einsum("...efr,...erh->...efh", self.down_a[...], self.down_b[...])
        return gu, dn


class LoRARouter(nnx.Module):
    """The router (weight [H, E], float32 logits) with a low-rank update; only when a target names it."""

    def __init__(self, base: Router, rank: int, alpha: float, *, key, active=1.0):
        lead = _lead(key)
        self.weight = base.weight
        h, e = base.weight.shape[-2:]
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nnx.LoRAParam(_init_a(key, (h, rank), h))
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, e), jnp.float32))
        self.active = _per_layer(active, lead, jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        base = Router.__call__(self, x) if isinstance(w, AtLayer) else None  # its stack read in place (run_layers)
        x = x.astype(jnp.float32)
        low = (x @ self.lora_a[...]) @ self.lora_b[...]
        if base is None:
            base = jnp.dot(x, w.astype(jnp.float32))
        return base + self.scale * self.active[...] * low

    def delta(self) -> jax.Array:
        return self.scale * self.active[...][..., None, None] * (self.lora_a[...] @ self.lora_b[...])


# ----------------------------------------------------------------------------------------------------------------------
# Finding targets.
@dataclasses.dataclass
class _Site:
    path: str  # "layers.1.self_attn.q_a_proj"
    kind: str  # "linear" | "experts" | "router"
    group: str  # "attention" | "shared_experts" | "dense_mlp" | "experts" | "router"
    parent: nnx.Module  # a layer stack's (stacked) module, or an unstacked one (the projector)
    attr: str
    index: int | None = None  # the layer's slice in its stack; None for an unstacked module
    stack_size: int = 1


def _sites(model: Small4ForCausalLM) -> Iterator[_Site]:
    """Every place an adapter can go, in model order (per layer: the sites of one stack's module share `parent`)."""
    for stack, (start, n) in zip(model.layer_stacks, layer_groups(model.config)):
        for j in range(n):
            i = start + j
            attn: MLA = stack.self_attn
            for name in ATTENTION:
                if getattr(attn, name, None) is not None:
                    yield _Site(f"layers.{i}.self_attn.{name}", "linear", "attention", attn, name, j, n)
            mlp = stack.mlp
            if isinstance(mlp, MoE):
                if mlp.shared_experts is not None:
                    for name in MLP_PROJ:
                        path = f"layers.{i}.mlp.shared_experts.{name}"
                        yield _Site(path, "linear", "shared_experts", mlp.shared_experts, name, j, n)
                yield _Site(f"layers.{i}.mlp.experts", "experts", "experts", mlp, "experts", j, n)
                yield _Site(f"layers.{i}.mlp.gate", "router", "router", mlp, "gate", j, n)
            elif isinstance(mlp, MLP):
                for name in MLP_PROJ:
                    yield _Site(f"layers.{i}.mlp.{name}", "linear", "dense_mlp", mlp, name, j, n)
    projector = getattr(model, "multi_modal_projector", None)
    if projector is not None:
        for name, parent, attr in (("linear_1", projector, "linear_1"), ("linear_2", projector, "linear_2"),
                                   ("patch_merger.merging_layer", projector.patch_merger, "merging_layer")):
            yield _Site(f"multi_modal_projector.{name}", "linear", "projector", parent, attr)


def site_groups(model: Small4ForCausalLM) -> list[list[tuple[int, _Site]]]:
    """The sites grouped by the module that holds them (a stacked module's per-layer sites together, in layer
    order), each with its model-order number."""
    groups: dict[tuple[int, str], list[tuple[int, _Site]]] = {}
    for n, site in enumerate(_sites(model)):
        groups.setdefault((id(site.parent), site.attr), []).append((n, site))
    return list(groups.values())


def _adapter_of(site: _Site):
    """The adapter module on `site`'s module (stacked for a stack), or None."""
    m = getattr(site.parent, site.attr)
    if site.kind == "experts":
        return m.lora
    return m if isinstance(m, (LoRALinear, LoRARouter)) else None


def _make_adapter(site: _Site, base, rank: int, alpha: float, *, key, active, index=0, dropout=0.0,
                  dropout_key=None):
    if site.kind == "linear":
        return LoRALinear(base, rank, alpha, dropout, key=key, dropout_key=dropout_key, index=index, active=active)
    if site.kind == "experts":
        return ExpertsLoRA(base, rank, alpha, key=key, active=active)
    return LoRARouter(base, rank, alpha, key=key, active=active)


def _attach(site: _Site, adapter) -> None:
    if site.kind == "experts":
        getattr(site.parent, site.attr).lora = nnx.data(adapter)
    else:
        setattr(site.parent, site.attr, adapter)


def _matches(target: str, site: _Site) -> bool:
    if target in ALIASES:
        return site.group in ALIASES[target]
    if site.group == "projector":  # only when asked for (alias or name)
        return site.path == target or site.path.endswith("." + target)
    if site.kind == "router":  # only by name
        return target in ("gate", "mlp.gate") or site.path == target or site.path.endswith("." + target)
    if site.path == target or site.path.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, site.path) is not None
    except re.error:
        return False


def select_targets(model: Small4ForCausalLM, targets: Sequence[str]) -> list[str]:
    """Paths of the modules `targets` select; ConfigError naming every target that selects nothing."""
    sites = list(_sites(model))
    chosen, empty = set(), []
    for t in targets:
        hit = {s.path for s in sites if _matches(t, s)}
        if not hit:
            empty.append(t)
        chosen |= hit
    if empty:
        examples = ", ".join(s.path for s in sites[:4])
        raise ConfigError(
            f"lora.targets: {empty} match no module of this model; use an alias {sorted(ALIASES)}, a module name "
            f"(o_proj, gate_proj, ...) or a regex over paths such as {examples}"
        )
    return [s.path for s in sites if s.path in chosen]


def apply_lora(model: Small4ForCausalLM, config: LoRAConfig) -> list[str]:
    """Attach adapters in place; returns the adapted module paths. Call once, before jitting anything."""
    chosen = set(select_targets(model, config.targets))
    key = jax.random.key(config.seed)
    dropout_key = DropoutKey(jax.random.PRNGKey(config.seed + 1)) if config.dropout > 0 else None
    top_k = model.config.num_experts_per_tok
    done = []
    for members in site_groups(model):
        picked = [site.path for _, site in members if site.path in chosen]
        if not picked:
            continue
        site = members[0][1]
        rank = config.expert_rank(top_k) if site.kind == "experts" else config.rank
        keys = jnp.stack([jax.random.fold_in(key, n) for n, _ in members])
        index = [n for n, _ in members]
        active = [float(s.path in chosen) for _, s in members]
        if site.index is None:  # an unstacked module: one site
            keys, index, active = keys[0], index[0], active[0]
        ad = _make_adapter(site, getattr(site.parent, site.attr), rank, config.alpha, key=keys, active=active,
                           index=index, dropout=config.dropout, dropout_key=dropout_key)
        _attach(site, ad)
        done += picked
    return [p for p in (s.path for s in _sites(model)) if p in set(done)]


def adapters(model: Small4ForCausalLM) -> dict[str, nnx.Module]:
    """Adapted module path -> its adapter module (LoRALinear, ExpertsLoRA or LoRARouter), per layer: a stacked
    adapter's layer j is a read-only copy of its slice (layers the targets did not pick are left out)."""
    out = {}
    for site in _sites(model):
        ad = _adapter_of(site)
        if ad is None:
            continue
        if site.index is not None:
            if not float(ad.active[...][site.index]):
                continue
            ad = layer_slice(ad, site.index)
        out[site.path] = ad
    return out


def _stacked_adapters(model: Small4ForCausalLM) -> dict[tuple[str, ...], nnx.Module]:
    """State path of each adapted module (a stack's module: stacked) -> its adapter module, for merging."""
    paths = {id(m): tuple(str(p) for p in path) for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    out = {}
    for members in site_groups(model):
        site = members[0][1]
        ad = _adapter_of(site)
        if ad is not None:
            base = getattr(site.parent, site.attr)
            out[paths[id(base)]] = ad
    return out


def set_dropout(model: nnx.Module, enabled: bool) -> None:
    """Turn adapter dropout on (training) or off (eval, generation; the default)."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, LoRALinear):
            m.deterministic = not enabled


def num_lora_params(model: nnx.Module) -> int:
    """Trainable adapter parameters of the adapted layers (a stack's layers without an adapter are not counted)."""
    if not isinstance(model, Small4ForCausalLM):
        return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, TRAINABLE))))
    total = 0
    for members in site_groups(model):
        site = members[0][1]
        ad = _adapter_of(site)
        if ad is None:
            continue
        size = sum(x.size for x in jax.tree.leaves(nnx.state(ad, TRAINABLE)))
        if site.index is not None:
            size = size // len(members) * int(np.count_nonzero(np.asarray(ad.active[...])))
        total += size
    return int(total)


# ----------------------------------------------------------------------------------------------------------------------
# Sharding: each adapter beside its base weight.
def lora_spec(path: Sequence, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of the LoRA parameter at `path`: A shares the base's input-dim sharding, B its output dim."""
    names = [str(p) for p in path]
    if len(names) > 2 and names[0] == "layer_stacks":  # a stacked adapter: the layer axis is never sharded
        return PartitionSpec(None, *lora_spec(names[2:], tuple(shape)[1:], mesh))
    leaf = names[-1]
    if names[-2] == "lora" and names[-3] == "experts":  # experts.lora.{gate_up,down}_{a,b}
        proj, side = leaf.rsplit("_", 1)
        base_shape = (shape[0], shape[1], 1) if side == "a" else (shape[0], 1, shape[2])  # size-1 dims never shard
        base = spec_for([*names[:-2], proj], base_shape, mesh)
        return PartitionSpec(base[0], base[1], None) if side == "a" else PartitionSpec(base[0], None, base[2])
    parent = names[-2]
    kernel_path = [*names[:-1], "kernel"]
    if parent == "gate":
        return PartitionSpec(None, None)
    if leaf == "lora_a":
        base = spec_for(kernel_path, (shape[0], 1), mesh)
        return PartitionSpec(base[0], None)
    base = spec_for(kernel_path, (1, shape[1]), mesh)
    return PartitionSpec(None, base[1])


def shard_lora(model: nnx.Module, mesh: Mesh | None) -> None:
    """Place every LoRA parameter on `mesh` beside its base (no-op without a mesh)."""
    if mesh is not None:
        place_model(model, mesh, TRAINABLE, lora_spec)


# ----------------------------------------------------------------------------------------------------------------------
# Merging (for export; serving keeps adapters separate).
def merged_params(model: Small4ForCausalLM) -> dict[tuple, np.ndarray]:
    """The plain model's parameters (path -> float32 numpy, our layout) with every adapter folded in.

    A quantised base (QLoRA) is dequantised first: the merged model is a float model."""
    raw = {tuple(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(nnx.state(model, FROZEN))}
    for key in [k for k in raw if k[-1].endswith("_scale")]:
        weight = key[:-1] + (key[-1][: -len("_scale")],)
        raw[weight] = dequantize(QArray(raw[weight], raw.pop(key)), jnp.float32)
    base = {k: np.asarray(v, np.float32) for k, v in raw.items()}
    for prefix, ad in _stacked_adapters(model).items():
        if isinstance(ad, ExpertsLoRA):
            gu, dn = ad.delta()
            base[prefix + ("gate_up",)] = base[prefix + ("gate_up",)] + np.asarray(gu)
            base[prefix + ("down",)] = base[prefix + ("down",)] + np.asarray(dn)
        elif isinstance(ad, LoRARouter):
            base[prefix + ("weight",)] = base[prefix + ("weight",)] + np.asarray(ad.delta())
        else:
            base[prefix + ("kernel",)] = base[prefix + ("kernel",)] + np.asarray(ad.delta())
    return base


def merge_into(plain: Small4ForCausalLM, lora_model: Small4ForCausalLM) -> Small4ForCausalLM:
    """Write the merged weights of `lora_model` into `plain` (a model without adapters, same config); returns it."""
    merged = merged_params(lora_model)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
        key = tuple(str(p) for p in path)
        flat.append((path, var.replace(jnp.asarray(merged[key], var[...].dtype))))
    nnx.update(plain, nnx.from_flat_state(flat))
    return plain


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face PEFT layout (adapter_config.json + adapter_model.safetensors).
#
# Dense adapters: lora_A.weight [r, in] = A^T, lora_B.weight [out, r] = B^T. Routed experts use PEFT's
# `target_parameters` on transformers' fused `experts.gate_up_proj` [E, 2F, H] / `experts.down_proj` [E, H, F]: one
# lora_A.weight [E*r, in] (rows expert-major: row e*r + j) and one lora_B.weight [out, r*E] (columns rank-major:
# column j*E + e), so delta_e = s * B[:, j*E+e] A[e*r+j, :] summed over j. Two parameters of one module nest their
# wrappers: gate_up_proj's adapter is saved under `experts.base_layer.lora_*`, down_proj's under `experts.lora_*`.
PEFT_PREFIX = "base_model.model.model."


def _expert_to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, din, r = a.shape
    return a.transpose(0, 2, 1).reshape(e * r, din), b.transpose(2, 1, 0).reshape(b.shape[2], r * e)


def _expert_from_peft(pa: np.ndarray, pb: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    r = pa.shape[0] // e
    a = pa.reshape(e, r, pa.shape[1]).transpose(0, 2, 1)  # [E, in, r]
    b = pb.reshape(pb.shape[0], r, e).transpose(2, 1, 0)  # [E, r, out]
    return a, b


def to_peft(model: Small4ForCausalLM, base_model_name_or_path: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors for adapter_model.safetensors, adapter_config.json content) of the attached adapters."""
    tensors: dict[str, np.ndarray] = {}
    modules, params, rank_pattern, alpha_pattern = [], [], {}, {}
    ranks = []
    for path, ad in adapters(model).items():
        alpha = ad.scale * ad.rank
        if isinstance(ad, ExpertsLoRA):
            a, b = _expert_to_peft(np.asarray(ad.gate_up_a[...]), np.asarray(ad.gate_up_b[...]))
            tensors[f"{PEFT_PREFIX}{path}.base_layer.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{path}.base_layer.lora_B.weight"] = b
            a, b = _expert_to_peft(np.asarray(ad.down_a[...]), np.asarray(ad.down_b[...]))
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
            for p in (f"{path}.gate_up_proj", f"{path}.down_proj"):
                params.append(p)
                rank_pattern[p], alpha_pattern[p] = ad.rank, alpha
        else:
            a, b = np.asarray(ad.lora_a[...]).T, np.asarray(ad.lora_b[...]).T
            if isinstance(ad, LoRARouter):
                params.append(f"{path}.weight")
                key = f"{path}.weight"
            else:
                modules.append(path)
                key = path
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
            rank_pattern[key], alpha_pattern[key] = ad.rank, alpha
        ranks.append(ad.rank)
    if not tensors:
        raise ConfigError("the model has no LoRA adapters to export")
    r = max(set(ranks), key=ranks.count)
    base_alpha = next(alpha_pattern[k] for k in alpha_pattern if rank_pattern[k] == r)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": base_alpha,
        "lora_dropout": 0.0,  # training-time only; PEFT's target_parameters refuse a non-zero value
        "target_modules": modules,
        "target_parameters": params,
        "rank_pattern": {k: v for k, v in rank_pattern.items() if v != r},
        "alpha_pattern": {k: v for k, v in alpha_pattern.items() if v != base_alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, config


def from_peft(model: Small4ForCausalLM, tensors: dict[str, np.ndarray], config: dict, where: str = "adapter") -> list[str]:
    """Attach the adapters of a PEFT LoRA (as written by `to_peft`, or by PEFT on transformers' Mistral4) in place."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; expected 'LORA'")
    if config.get("use_dora") or config.get("use_rslora") or config.get("fan_in_fan_out"):
        raise ConfigError(f"{where}: DoRA, rsLoRA and fan_in_fan_out adapters are not supported")
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def pattern(table, key, default):
        for k, v in table.items():
            if re.match(rf"(.*\.)?({k})$", key):
                return v
        return default

    names = {k.removeprefix(PEFT_PREFIX).removeprefix("base_model.model."): k for k in tensors}
    e = model.config.n_routed_experts
    done = []

    def get(n):
        return np.asarray(tensors[names[n]], np.float32)

    def read(site: _Site) -> tuple | None:
        """(rank, alpha, {field: array}) of the site's adapter in the files, or None."""
        path = site.path
        key = f"{path}.weight" if site.kind == "router" else path
        a_name = f"{path}.lora_A.weight"
        if a_name not in names and f"{path}.base_layer.lora_A.weight" not in names:
            return None
        rank, alpha = int(pattern(rank_pattern, key, r0)), float(pattern(alpha_pattern, key, alpha0))
        if site.kind == "experts":
            return _read_experts(site, names, get, e, model.config, config, pattern, (r0, alpha0), where)
        return rank, alpha, dict(lora_a=get(a_name).T, lora_b=get(f"{path}.lora_B.weight").T)

    for members in site_groups(model):
        found = [(site, read(site)) for _, site in members]
        present = [(site, r) for site, r in found if r is not None]
        if not present:
            continue
        rank, alpha = present[0][1][0], present[0][1][1]
        for site, (r, al, _) in present:
            if (r, al) != (rank, alpha):
                raise ConfigError(f"{where}: {site.path} has rank {r} / alpha {al:g} but {present[0][0].path} "
                                  f"{rank} / {alpha:g}: one module's adapters must share rank and alpha across its "
                                  "layers")
        site0 = members[0][1]
        stacked = site0.index is not None
        k = jax.random.split(jax.random.key(0), len(members)) if stacked else jax.random.key(0)
        active = [float(r is not None) for _, r in found] if stacked else 1.0
        ad = _make_adapter(site0, getattr(site0.parent, site0.attr), rank, alpha, key=k, active=active)
        try:
            for field in present[0][1][2]:
                var = getattr(ad, field)
                want = tuple(var.shape[1:]) if stacked else tuple(var.shape)
                values = []
                for site, r in found:
                    if r is None:
                        values.append(np.zeros(want, np.float32))
                        continue
                    if tuple(r[2][field].shape) != want:
                        raise ValueError(f"{site.path}: shape {list(r[2][field].shape)}, expected {list(want)}")
                    values.append(r[2][field])
                var[...] = jnp.asarray(np.stack(values) if stacked else values[0], jnp.float32)
        except ValueError as err:
            raise ConfigError(f"{where}: adapter for {err}") from None
        _attach(site0, ad)
        done += [site.path for site, _ in present]
    used = set()
    for path in done:
        used |= {n for n in names if n.startswith(path + ".")}
    unused = sorted(set(names) - used)
    if unused:
        raise ConfigError(f"{where}: tensors that match no module of this model: {unused[:5]}")
    if not done:
        raise ConfigError(f"{where}: no LoRA tensors found")
    order = {s.path: n for n, s in enumerate(_sites(model))}
    return sorted(done, key=order.get)


def _read_experts(site, names, get, e: int, mcfg, config: dict, pattern, defaults, where: str) -> tuple:
    """(rank, alpha, ExpertsLoRA fields) of a routed-experts adapter as peft writes it, any of its shapes: one
    parameter (`target_parameters=["mlp.experts.down_proj"]` or gate_up_proj: `experts.lora_*`) or both (the second
    wrapper nests the first: `experts.base_layer.lora_*` and `experts.lora_*`), each with its rank_pattern /
    alpha_pattern entry. Which parameter a pair adapts is read from its lora_A's input width (hidden for
    gate_up_proj, moe_intermediate for down_proj; where they are equal, from the nesting / target_parameters).
    The two share one rank here: the smaller is zero-padded; where the pairs' alpha / r differ, each is folded into
    its B (scale 1)."""
    h, f = mcfg.hidden_size, mcfg.moe_intermediate_size
    path = site.path
    pairs = [p for p in (f"{path}.base_layer.", f"{path}.") if f"{p}lora_A.weight" in names]
    targeted = [t.rsplit(".", 1)[-1] for t in config.get("target_parameters") or [] if "experts" in t]
    out: dict[str, tuple] = {}
    for prefix in pairs:
        a_name, b_name = f"{prefix}lora_A.weight", f"{prefix}lora_B.weight"
        if b_name not in names:
            raise ConfigError(f"{where}: {names[a_name]} has no {b_name.rsplit('.', 2)[-2]} partner")
        a, b = get(a_name), get(b_name)
        if h != f:
            param = {h: "gate_up_proj", f: "down_proj"}.get(a.shape[-1])
        elif len(pairs) == 2:
            param = "gate_up_proj" if prefix.endswith("base_layer.") else "down_proj"
        else:
            param = targeted[0] if len(set(targeted)) == 1 else None
        if param is None or param in out:
            raise ConfigError(f"{where}: {names[a_name]} has shape {list(a.shape)}; expected [E*r, {h}] "
                              f"(experts.gate_up_proj) or [E*r, {f}] (experts.down_proj), each once")
        din, dout = (h, 2 * f) if param == "gate_up_proj" else (f, h)
        rank = int(pattern(config.get("rank_pattern") or {}, f"{path}.{param}", defaults[0]))
        alpha = float(pattern(config.get("alpha_pattern") or {}, f"{path}.{param}", defaults[1]))
        for name, x, want in ((a_name, a, [e * rank, din]), (b_name, b, [dout, rank * e])):
            if list(x.shape) != want:
                raise ConfigError(f"{where}: {names[name]} has shape {list(x.shape)}, expected {want} "
                                  f"(experts.{param}, {e} experts, rank {rank})")
        ea, eb = _expert_from_peft(a, b, e)
        out[param] = (ea, eb, rank, alpha / rank)
    r = max(v[2] for v in out.values())
    scales = {v[3] for v in out.values()}
    # One alpha / r for both (peft's usual case): B stays as peft wrote it, so training from the adapter follows
    # peft's parametrisation (gradients and all); different scales are folded into each B (scale 1).
    scale = scales.pop() if len(scales) == 1 else None
    fields = {}
    for param, key in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
        din, dout = (h, 2 * f) if param == "gate_up_proj" else (f, h)
        zeros = (np.zeros((e, din, r), np.float32), np.zeros((e, r, dout), np.float32), r, 1.0)
        ea, eb, rank, s = out.get(param, zeros)
        eb = eb if scale is not None else eb * s
        fields[f"{key}_a"] = np.pad(ea, ((0, 0), (0, 0), (0, r - rank)))
        fields[f"{key}_b"] = np.pad(eb, ((0, 0), (0, r - rank), (0, 0)))
    return r, float(r) * (scale if scale is not None else 1.0), fields


def save_peft(model: Small4ForCausalLM, out_dir, base_model_name_or_path: str | None = None) -> None:
    """Write `out_dir/adapter_config.json` and `out_dir/adapter_model.safetensors`."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, config = to_peft(model, base_model_name_or_path)
    save_safetensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_peft_dir(adapter_dir, flag: str | None = None) -> dict:
    """What `load_peft` reads, checked without reading a tensor (before a model is built): adapter_config.json a
    JSON object, adapter_model.safetensors a valid safetensors file (header and sizes). Returns the config; a
    problem is a ConfigError / CheckpointError naming the file (after `flag`, e.g. "--lora a=DIR", when given)."""
    import json
    from pathlib import Path

    d = Path(adapter_dir)
    cfg_path, st_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    lead = f"{flag}: " if flag else ""
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise ConfigError(f"{lead or f'{d}: '}not a PEFT adapter directory ({p.name} missing)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{lead}{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{lead}{cfg_path}: expected a JSON object")
    try:
        read_safetensors_header(st_path)
    except Small4Error as e:
        raise type(e)(f"{lead}{e}") from None
    return config


def load_peft(model: Small4ForCausalLM, adapter_dir) -> list[str]:
    """Attach the PEFT adapter in `adapter_dir` to `model` (unmerged); returns the adapted paths."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config = check_peft_dir(adapter_dir)
    st_path = f"{adapter_dir}/adapter_model.safetensors"
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{st_path}: cannot be read ({e})") from None
    return from_peft(model, tensors, config, where=str(adapter_dir))
