"""Multi-LoRA serving: many PEFT adapters resident at once, each batch row with its own (or none).

`MultiLoRA(model, slots, rank)` replaces, in place, every adaptable linear of the model (attention projections,
shared experts, dense MLPs) by a `MultiLoRALinear` and puts a `MultiExpertsLoRA` on every routed-experts block. Each
holds `slots` adapters side by side at a common padded rank R (slot 0 is the base model: all zeros):

    A_cat [in, S*R]   columns s*R .. s*R + r_s - 1 are adapter s's A (the rest zero)
    B_cat [S*R, out]  rows likewise; scales [S] = alpha_s / r_s

A row whose adapter is s computes  y = x W + ((x A_cat) * m_s) B_cat,  with m_s the block mask of slot s scaled by
scales[s]: exactly x W + scale_s (x A_s) B_s, for every row of the batch in the same matmuls (the zero blocks add
exact zeros). The routed experts do the same inside the grouped matmuls: per routed (token, expert) pair the mask of
its token's adapter (`moe.expert_mlp` with a per-pair scale), i.e. per-pair adapter ids, over the same sorted rows
and group sizes as the base, on one device or expert-parallel inside the MoE's shard_map (the masks are an input
sharded like the tokens, sent with their rows by the all-to-all). Absorbed-MLA decode folds kv_b_proj into the query; a row's adapter on kv_b_proj stays
low rank there (`absorb_query` / `absorb_output`, called by `paged.absorbed_attention`).

On the model's layer stacks (model.py) each stacked module gets one stacked holder ([layers, in, S*R] ..., scales
[layers, S]); a layer where an adapter has no tensors keeps zeros and scale 0 in that slot.

The rows' adapter slots are one `AdapterIds` variable [B] shared by every adapted module, set in the split state
before each step (`set_ids`); changing adapters never recompiles. Loading (`load`) reads a PEFT directory (from
`train.export` or from peft) into a free slot, unloading zeroes it; both swap the adapter arrays of the state.
Router adapters are not served (an adapter that has one is refused, naming it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from small4_jax.errors import ConfigError, InputError
from small4_jax.lora.adapters import (ExpertsLoRA, LoRALinear, LoRARouter, adapters as adapter_modules, base_output,
                                      load_peft, lora_spec, select_targets, site_groups)
from small4_jax.nn.model import Shared, Small4ForCausalLM, abstract_model
from small4_jax.nn.moe import ExpertLoRA, at_layer, sliced
from small4_jax.quant.formats import QArray, dequantize, logical_shape


class AdapterIds(Shared):
    """Each batch row's adapter slot [B] int32 (0 = the base model)."""


class MultiLoRAParam(nnx.Variable):
    """Stacked adapter weights (never trained, never in a checkpoint plan)."""


def block_mask(ids: jax.Array, scales: jax.Array, rank: int) -> jax.Array:
    """[..., S*R]: scales[ids] on the columns of slot `ids`, 0 elsewhere."""
    cols = jnp.arange(scales.shape[0] * rank, dtype=jnp.int32) // rank
    return jnp.where(cols == ids[..., None], scales[ids][..., None], 0.0)


def _row_ids(ids: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """Row ids [B] broadcast over an activation's leading dims: [B, ...] rows, or [B*T] flattened tokens."""
    b = ids.shape[0]
    if lead[0] == b:
        return jnp.broadcast_to(ids.reshape((b,) + (1,) * (len(lead) - 1)), lead)
    return jnp.repeat(ids, lead[0] // b).reshape(lead)


class MultiLoRALinear(nnx.Module):
    """An `nnx.Linear` plus `slots` stacked adapters chosen per row by `ids`."""

    def __init__(self, base: nnx.Linear, slots: int, rank: int, ids: AdapterIds, lead: tuple[int, ...] = (),
                 dtype=jnp.float32):
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype = base.dtype or base.kernel[...].dtype
        self.precision = base.precision
        self.kernel = base.kernel
        self.kernel_act_scale = getattr(base, "kernel_act_scale", None)  # W8A8 (quant.py)
        self.kernel_scale = getattr(base, "kernel_scale", None)  # a quantised base stays quantised
        self.bias = base.bias
        self.rank = rank
        self.lora_a = MultiLoRAParam(jnp.zeros(lead + (self.in_features, slots * rank), dtype))
        self.lora_b = MultiLoRAParam(jnp.zeros(lead + (slots * rank, self.out_features), dtype))
        self.scales = MultiLoRAParam(jnp.zeros(lead + (slots,), jnp.float32))
        self.ids = ids

    def mask(self, lead: tuple[int, ...]) -> jax.Array:
        return block_mask(_row_ids(self.ids[...], lead), self.scales[...], self.rank)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = base_output(self, x)
        low = (x @ self.lora_a[...].astype(self.dtype)) * self.mask(x.shape[:-1]).astype(self.dtype)
        return y + (low @ self.lora_b[...].astype(self.dtype)).astype(y.dtype)

    # Absorbed MLA (kv_b_proj): W_UK / W_UV come from the base kernel; each row's adapter is applied in low rank.
    @property
    def row_lora(self) -> MultiLoRALinear:
        return self

    def base_kernel(self, dtype) -> jax.Array:
        """The base [in, out] matrix (dequantised if quantised), without any adapter."""
        if self.kernel_scale is not None:
            return dequantize(sliced(at_layer(QArray, self.kernel[...], self.kernel_scale[...])), dtype)
        return sliced(self.kernel[...]).astype(dtype)

    def _halves(self, nh: int, dn: int):
        b = self.lora_b[...].reshape(-1, nh, self.out_features // nh)
        return b[..., :dn], b[..., dn:]

    def absorb_query(self, q_nope: jax.Array) -> jax.Array:
        """The adapters' part of q~ = W_UK^T q_nope: [B, T, nh, R] for q_nope [B, T, nh, dn]."""
        b, t, nh, dn = q_nope.shape
        bk, _ = self._halves(nh, dn)
        m = self.mask((b, t))[:, :, None, :]
        u = jnp.einsum("bthd,jhd->bthj", q_nope.astype(jnp.float32), bk) * m
        return jnp.einsum("bthj,rj->bthr", u, self.lora_a[...])

    def absorb_output(self, o_lat: jax.Array, dn: int) -> jax.Array:
        """The adapters' part of o = W_UV^T o~: [B, T, nh, dv] for the attended latent o_lat [B, T, nh, R]."""
        b, t, nh, _ = o_lat.shape
        _, bv = self._halves(nh, dn)
        m = self.mask((b, t))[:, :, None, :]
        v = jnp.einsum("bthr,rj->bthj", o_lat.astype(jnp.float32), self.lora_a[...]) * m
        return jnp.einsum("bthj,jhd->bthd", v, bv)


class MultiExpertsLoRA(nnx.Module):
    """Stacked per-expert adapters (`experts.lora`): gate_up_a [E, H, S*R] ... down_b [E, S*R, H], scales [S]."""

    def __init__(self, experts, slots: int, rank: int, ids: AdapterIds, lead: tuple[int, ...] = (),
                 dtype=jnp.float32):
        e, h, f2 = logical_shape(experts.gate_up.shape, experts.gate_up.dtype)[-3:]  # [E, H, 2F] also quantised
        j = slots * rank
        self.rank = rank
        self.gate_up_a = MultiLoRAParam(jnp.zeros(lead + (e, h, j), dtype))
        self.gate_up_b = MultiLoRAParam(jnp.zeros(lead + (e, j, f2), dtype))
        self.down_a = MultiLoRAParam(jnp.zeros(lead + (e, f2 // 2, j), dtype))
        self.down_b = MultiLoRAParam(jnp.zeros(lead + (e, j, h), dtype))
        self.scales = MultiLoRAParam(jnp.zeros(lead + (slots,), jnp.float32))
        self.ids = ids

    def weights(self) -> ExpertLoRA:
        """The stacked adapters with a per-row scale mask [B, S*R] as `scale` (expanded to pairs by moe.py)."""
        mask = block_mask(self.ids[...], self.scales[...], self.rank)
        return ExpertLoRA(self.gate_up_a[...], self.gate_up_b[...], self.down_a[...], self.down_b[...], mask)


@dataclasses.dataclass
class _Adapter:
    name: str
    slot: int
    identity: str  # name + content digest: the prefix-cache key of its rows
    path: str


class MultiLoRA:
    """The adapters a server holds: `slots - 1` adapters of rank <= `rank` on `model` (modified in place).

    Slots exist only on the modules `targets` selects (`lora.LoRAConfig.targets` spellings: aliases, module names,
    regexes over paths, or site paths; default every adaptable module; a stack gets slots for all its layers when
    any is selected), in `dtype` (the model's compute dtype), and with a `mesh` each slot array is placed beside its
    base weight (`lora.lora_spec`: the experts' slots split over `expert` as the experts are), so what the slots
    take per device is known before the engine sizes its cache (`device_bytes`)."""

    def __init__(self, model, slots: int, rank: int, *, targets=None, dtype=jnp.float32, mesh=None):
        if slots < 2:
            raise ConfigError(f"max_loras must be at least 1, got {slots - 1}")
        if rank < 1:
            raise ConfigError(f"max_lora_rank must be positive, got {rank}")
        self.model, self.slots, self.rank = model, slots, rank
        self.ids = AdapterIds(jnp.zeros((1,), jnp.int32))
        chosen = None if targets is None else set(select_targets(model, tuple(targets)))
        self.sites = {}  # per-layer site path -> (holder, its layer's slice in a stack or None)
        for members in site_groups(model):
            site = members[0][1]
            if chosen is not None and not any(s.path in chosen for _, s in members):
                continue
            base = getattr(site.parent, site.attr)
            lead = (len(members),) if site.index is not None else ()
            if site.kind == "linear":
                if isinstance(base, (LoRALinear, MultiLoRALinear)):
                    raise ConfigError(f"{site.path}: already has an adapter; multi-LoRA serving needs the base model")
                m = MultiLoRALinear(base, slots, rank, self.ids, lead, dtype)
                setattr(site.parent, site.attr, m)
            elif site.kind == "experts":
                m = MultiExpertsLoRA(base, slots, rank, self.ids, lead, dtype)
                base.lora = nnx.data(m)
            else:
                continue
            for _, s in members:
                self.sites[s.path] = (m, s.index)
        if mesh is not None:
            place_slots(model, mesh)
        self.adapters: dict[str, _Adapter] = {}
        self._ids_path = None

    def device_bytes(self, device=None) -> int:
        """Bytes the slots take on `device` (default: the first device of the first slot array)."""
        leaves = [x for x in jax.tree.leaves(nnx.state(self.model, MultiLoRAParam))]
        if not leaves:
            return 0
        device = device or min(leaves[0].sharding.device_set, key=lambda d: d.id)
        return sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)

    # ---- the per-step ids ------------------------------------------------------------------------------------------
    def set_ids(self, state, slots_per_row) -> None:
        """Write the rows' adapter slots [B] into `state` (the engine's split state) before a step."""
        if self._ids_path is None:
            self._ids_path = next(p for p, v in nnx.to_flat_state(state) if isinstance(v, AdapterIds))
        sub = state
        for k in self._ids_path[:-1]:
            sub = sub[k]
        leaf = sub[self._ids_path[-1]]
        sub[self._ids_path[-1]] = leaf.replace(jnp.asarray(np.asarray(slots_per_row, np.int32)))

    # ---- adapters --------------------------------------------------------------------------------------------------
    def slot_of(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.adapters:
            raise InputError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters) or 'none'}")
        return self.adapters[name].slot

    def identity(self, name: str | None) -> str | None:
        return None if name is None else self.adapters[name].identity

    def read(self, name: str, path, read: tuple[dict, str] | None = None) -> tuple[dict, str]:
        """Read the PEFT adapter in `path` (host side, no state touched; `read`: what `read_adapter` already gave)
        and check it fits the slots: (site path -> arrays, identity)."""
        path = Path(path)
        if not name or "/" in name or name in self.adapters:
            raise InputError(f"adapter name {name!r} is empty, has a '/', or is already loaded")
        out, digest = read or read_adapter(self.model.config, path)
        for site_path, w in out.items():
            if w["rank"] > self.rank:
                raise ConfigError(f"{path}: {site_path} has rank {w['rank']}, above --max-lora-rank {self.rank}")
            if site_path not in self.sites:
                raise ConfigError(f"{path}: {site_path} is not among the modules the server holds adapter slots for "
                                  "(--lora-targets)")
        return out, f"{name}#{digest}"

    def free_slot(self) -> int:
        used = {a.slot for a in self.adapters.values()}
        free = [s for s in range(1, self.slots) if s not in used]
        if not free:
            raise InputError(f"all {self.slots - 1} adapter slots are in use (--max-loras); unload one first")
        return free[0]

    def install(self, name: str, path, weights: dict, identity: str, slot: int) -> None:
        """Write `weights` (from `read`) into `slot` of every site (zeros where the adapter has none), in the slots'
        dtype and placement."""
        lo, hi = slot * self.rank, (slot + 1) * self.rank

        def put(var, index, block):
            old = var[...]
            new = old.at[index].set(block.astype(old.dtype))
            placed = isinstance(getattr(old, "sharding", None), NamedSharding)  # on a mesh: keep it where it was
            # on one device, a copy: jax 0.10's eager scatter leaves in its result's type the mesh of an earlier call
            # on a same-shaped array on a mesh, and a later one-device engine's step then traced a shard_map with no
            # context mesh (tests/test_grpo.py: a one-device run after one on a mesh)
            var[...] = jax.device_put(new, old.sharding, may_alias=None if placed else False)

        for site_path, (m, j) in self.sites.items():
            w = weights.get(site_path)
            scale = 0.0 if w is None else float(w["scale"])
            at = () if j is None else (j,)  # the layer's slice of a stacked holder
            if isinstance(m, MultiExpertsLoRA):
                for field in ("gate_up_a", "down_a"):
                    var = getattr(m, field)
                    e, din = var.shape[-3:-1]
                    block = jnp.zeros((e, din, self.rank), jnp.float32)
                    if w is not None:
                        block = block.at[..., : w["rank"]].set(w[field])
                    put(var, at + (Ellipsis, slice(lo, hi)), block)
                for field in ("gate_up_b", "down_b"):
                    var = getattr(m, field)
                    e, dout = var.shape[-3], var.shape[-1]
                    block = jnp.zeros((e, self.rank, dout), jnp.float32)
                    if w is not None:
                        block = block.at[:, : w["rank"]].set(w[field])
                    put(var, at + (slice(None), slice(lo, hi)), block)
            else:
                a = jnp.zeros((m.in_features, self.rank), jnp.float32)
                b = jnp.zeros((self.rank, m.out_features), jnp.float32)
                if w is not None:
                    a, b = a.at[:, : w["rank"]].set(w["a"]), b.at[: w["rank"]].set(w["b"])
                put(m.lora_a, at + (Ellipsis, slice(lo, hi)), a)
                put(m.lora_b, at + (slice(lo, hi),), b)
            put(m.scales, at + (slot,), jnp.float32(scale))
        if name is not None:
            self.adapters[name] = _Adapter(name, slot, identity, str(path))

    def load(self, name: str, path) -> _Adapter:
        """Read and install an adapter into a free slot (call between engine steps)."""
        weights, identity = self.read(name, path)
        slot = self.free_slot()
        self.install(name, path, weights, identity, slot)
        return self.adapters[name]

    def unload(self, name: str) -> None:
        slot = self.slot_of(name)
        self.install(None, None, {}, "", slot)
        del self.adapters[name]


def read_adapter(config, path) -> tuple[dict, str]:
    """The PEFT adapter in `path` read on the host: (site path -> its arrays, rank and scale; content digest)."""
    path = Path(path)
    scratch = abstract_model(config, dtype="float32")
    done = load_peft(scratch, path)
    digest = hashlib.sha256()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((path / f).read_bytes())
    out = {}
    for site_path, ad in adapter_modules(scratch).items():
        if isinstance(ad, LoRARouter):
            raise ConfigError(f"{path}: adapter on the router ({site_path}) is not supported in multi-LoRA serving")
        if isinstance(ad, ExpertsLoRA):
            out[site_path] = dict(gate_up_a=ad.gate_up_a[...], gate_up_b=ad.gate_up_b[...], down_a=ad.down_a[...],
                                  down_b=ad.down_b[...], scale=ad.scale, rank=ad.rank)
        else:
            out[site_path] = dict(a=ad.lora_a[...], b=ad.lora_b[...], scale=ad.scale, rank=ad.rank)
    assert done
    return out, digest.hexdigest()[:32]


def place_slots(model, mesh) -> None:
    """Place every multi-LoRA slot array of `model` on `mesh` beside its base weight (`lora.lora_spec`); the
    scales replicated."""
    state = nnx.state(model, MultiLoRAParam)
    flat = []
    for path, var in nnx.to_flat_state(state):
        x = var.get_raw_value() if hasattr(var, "get_raw_value") else var[...]
        flat.append((path, var.replace(jax.device_put(x, NamedSharding(mesh, slot_spec(path, x.shape, mesh))))))
    nnx.update(model, nnx.from_flat_state(flat))


def slot_spec(path, shape, mesh) -> PartitionSpec:
    """The PartitionSpec of the multi-LoRA slot array at `path`: a training adapter's (`lora.lora_spec`; the slots'
    names are the same: {module}.lora_{a,b}, experts.lora.{gate_up,down}_{a,b}); the scales replicated."""
    names = [str(p) for p in path]
    return PartitionSpec() if names[-1] == "scales" else lora_spec(names, shape, mesh)


def abstract_slots(config, slots: int, rank: int, *, targets=None, dtype=jnp.bfloat16):
    """The slot arrays `MultiLoRA` would add to a model of `config`, as shapes (nothing allocated): an nnx State."""
    def build():
        model = Small4ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
        MultiLoRA(model, slots, rank, targets=targets, dtype=dtype)
        return model

    return nnx.state(nnx.eval_shape(build), MultiLoRAParam)


def adapter_rank(path) -> int:
    """The largest rank of the PEFT adapter in `path` (its adapter_config.json: r and rank_pattern)."""
    import json

    cfg_path = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not a PEFT adapter directory (adapter_config.json missing)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise ConfigError(f"{cfg_path}: 'r' and rank_pattern values must be positive integers")
    return max(ranks)


def parse_lora_flags(values) -> list[tuple[str, str]]:
    """--lora NAME=DIR (repeatable) -> [(name, dir)]; a bad value names the flag."""
    out = []
    for v in values or ():
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--lora {v!r}: expected NAME=DIR (a PEFT adapter directory)")
        out.append((name, path))
    return out

