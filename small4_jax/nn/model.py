"""The Mistral Small 4 text decoder in Flax NNX, in the order the forward pass runs.

    h = embed(ids)
    for each layer:  h += MLA(RMSNorm(h));  h += MoE(RMSNorm(h))   (dense SwiGLU for the first k layers)
    logits = RMSNorm(h) @ lm_head

Layers are stacked: each run of consecutive layers of one kind (the dense prefix, then the MoE layers: `layer_groups`)
is one `DecoderLayer` whose every parameter has a leading layer axis (`layer_stacks[g]`, built by `stack_modules`),
and the forward runs the layer function under `jax.lax.scan` over that axis (`run_layers`), so a program holds one
copy of the layer however deep the model is and compile time does not grow with the layer count. `scan_layers =
False` runs the same function in a Python loop over slices of the same parameters (for comparison only).

Module and parameter names below the stack mirror transformers' `Mistral4ForCausalLM` (`self_attn.q_a_proj` ...),
so the checkpoint map is a rename, a transpose and slice g of a stack <-> `layers.{start + g}`
(`ckpt.plan.checkpoint_plan`): our linear kernels are [in, out] (`x @ W`), expert weights are `experts.gate_up`
[E, H, 2F] (gate columns first) and `experts.down` [E, F, H]. `model.layers[i]` is a read-only view of layer i.

Numerics: parameters and matmuls in the model dtype; RMSNorm statistics, the router, the attention softmax and
the expert combine in float32. The math is ARCHITECTURE.md §1; the softmax-scale choice is documented in config.py.

Decoding keeps a latent KV cache (`KVCache`): per token and layer the normalised latent (kv_lora_rank values) and the
RoPE'd shared key (qk_rope_head_dim values), expanded through kv_b_proj at attention time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from small4_jax.config import Small4Config
from small4_jax.kernels.attention import attention
from small4_jax.nn.initializers import normal_init
from small4_jax.nn.layers import ACT, RMSNorm, apply_rope, linear, project, tap
from small4_jax.nn.moe import (AtLayer, Experts, interleave_gate_up, replay_route, resolve_dense_impl, route,
                               routed_experts)
from small4_jax.nn.qlinear import quantize_model
from small4_jax.nn.vision import MultiModalProjector, PixtralVisionModel
from small4_jax.parallel.placement import place_model
from small4_jax.parallel.sharding import (LATENT_PROJ, batch_axes, keep_last_dim_whole, mesh_axes, mesh_of,
                                         param_axes)
from small4_jax.quant.formats import QUANTISED_LINEARS


def _dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# KV cache.
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Latent attention cache of every layer: `latent` [L, B, S, kv_lora_rank], `rope_key` [L, B, S, qk_rope_head_dim].

    Slot s of a row holds the token at position s. `length` [B] counts the tokens written per row.
    """

    latent: jax.Array
    rope_key: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, config: Small4Config, batch: int, max_len: int, dtype="float32") -> KVCache:
        n = config.num_hidden_layers
        return cls(
            latent=jnp.zeros((n, batch, max_len, config.kv_lora_rank), _dtype(dtype)),
            rope_key=jnp.zeros((n, batch, max_len, config.qk_rope_head_dim), _dtype(dtype)),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks.
class MLP(nnx.Module):
    """SwiGLU: down(act(gate x) * up x). Used for dense layers and the shared expert(s)."""

    def __init__(self, config: Small4Config, intermediate: int, *, dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        self.act = ACT[config.hidden_act]
        self.gate_proj = linear(h, intermediate, config, dtype, rngs)
        self.up_proj = linear(h, intermediate, config, dtype, rngs)
        self.down_proj = linear(intermediate, h, config, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return project(self.down_proj, self.act(project(self.gate_proj, x)) * project(self.up_proj, x))


class Router(nnx.Module):
    """Router weight [H, E]; logits and routing in float32."""

    def __init__(self, config: Small4Config, *, dtype, rngs: nnx.Rngs):
        init = normal_init(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (config.hidden_size, config.n_routed_experts), _dtype(dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        # One numeric path for every `dense_impl`: x in the weight's dtype (the model's: x already is), each product
        # exact in float32 (bf16 x bf16 fits), accumulated in float32, whether XLA multiplies the layer's slice or
        # the grouped-matmul kernel reads the stack in place (run_layers, dense_impl "gmm").
        w = self.weight[...]
        if isinstance(w, AtLayer):
            return w.matmul(x.astype(w.stack.dtype), jnp.float32)
        return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


class MoE(nnx.Module):
    """Routed experts (top-k of a softmax over all experts) plus ungated shared expert(s).

    When the expert weights sit on a mesh with an `expert` axis (loaded with `mesh=`, or under `jax.set_mesh`), the
    routed experts run expert-parallel (`config.moe_strategy`; see moe.py).
    """

    def __init__(self, config: Small4Config, *, dtype, rngs: nnx.Rngs):
        self.config = config
        self.act = ACT[config.hidden_act]
        self.gate = Router(config, dtype=dtype, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, rngs=rngs)
        if config.n_shared_experts > 0:
            self.shared_experts = MLP(
                config, config.moe_intermediate_size * config.n_shared_experts, dtype=dtype, rngs=rngs
            )
        else:
            self.shared_experts = None

    def __call__(self, x: jax.Array, expert_ids: jax.Array | None = None, return_ids: bool = False):
        """x [..., H] -> [..., H]. Routing replay (`moe.replay_route`): expert_ids [N, k] (N = the tokens of x,
        flattened; a row with a negative id routes itself) are used instead of the router's top-k, with weights
        from this forward's router. return_ids: also return (ids used [N, k], the router's own top-k [N, k])."""
        c = self.config
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        options = dict(top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
                       norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor)
        if expert_ids is None and not return_ids:
            ids, weights = route(self.gate(flat), **options)
        else:
            ids, weights, own = replay_route(self.gate(flat), expert_ids, **options)
        lora = None if self.experts.lora is None else self.experts.lora.weights()
        gate_up, down = self.experts.weights()
        tap("experts", self.experts, flat, ids, weights, gate_up, down, self.act)  # GPTQ calibration's point
        shared = self.shared_experts
        y = routed_experts(
            flat, ids, weights, gate_up, down, act=self.act, impl=c.moe_impl,
            lora=lora, mesh="auto", strategy=c.moe_strategy, a2a_min_tokens=c.moe_a2a_min_tokens,
            gate_up_blocks=self.experts.gate_up_blocks, shared=shared,
        )
        return (y.reshape(shape), ids, own) if return_ids else y.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------------
# Positions.
def rope_cos_sin(config: Small4Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rope_dim/2] in float32, times YaRN's magnitude factor (1 for the released model)."""
    inv_freq = jnp.asarray(config.rope_inv_freq())
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    m = config.rope_magnitude
    return jnp.cos(angles) * m, jnp.sin(angles) * m


def llama4_query_scale(config: Small4Config, positions: jax.Array) -> jax.Array:
    """lambda(p) = 1 + beta * ln(1 + floor(p / L0)), float32 [B, T]."""
    beta = config.llama_4_scaling_beta or 0.0
    p = positions.astype(jnp.float32)
    return 1.0 + beta * jnp.log1p(jnp.floor(p / config.llama_4_original))


# ----------------------------------------------------------------------------------------------------------------------
# Attention.
class MLA(nnx.Module):
    """Multi-head latent attention (un-absorbed), with a latent cache for decoding."""

    def __init__(self, config: Small4Config, *, dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        h, nh = c.hidden_size, c.num_attention_heads
        bias = c.attention_bias
        if c.q_lora_rank is None:
            self.q_proj = linear(h, nh * c.qk_head_dim, c, dtype, rngs)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = linear(h, c.q_lora_rank, c, dtype, rngs, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.latent_norm_eps, dtype=dtype)
            self.q_b_proj = linear(c.q_lora_rank, nh * c.qk_head_dim, c, dtype, rngs)
        self.kv_a_proj_with_mqa = linear(h, c.kv_lora_rank + c.qk_rope_head_dim, c, dtype, rngs, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.latent_norm_eps, dtype=dtype)
        self.kv_b_proj = linear(c.kv_lora_rank, nh * (c.qk_nope_head_dim + c.v_head_dim), c, dtype, rngs)
        self.o_proj = linear(nh * c.v_head_dim, h, c, dtype, rngs, bias=bias)
        self.latent_split = False  # q_a_proj / kv_a_proj split by their input dim (`shard_latent_projections`)

    def _latent_proj(self, linear, x: jax.Array) -> jax.Array:
        """linear(x) for a latent projection; split over `tensor` (`latent_split`), its input and output are pinned
        whole on the hidden / latent dim: each device multiplies its slice of x by its rows, one all-reduce sums them."""
        if not self.latent_split:
            return project(linear, x)
        return keep_last_dim_whole(project(linear, keep_last_dim_whole(x)))

    def query(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q_nope [B, T, nh, dn] and the RoPE'd q_pe [B, T, nh, dr] of x [B, T, H] (q_proj, or the q-LoRA path)."""
        c = self.config
        b, t, _ = x.shape
        nh, dn, dr = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        if self.q_proj is not None:
            q = project(self.q_proj, x)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(self._latent_proj(self.q_a_proj, x)))
        q = q.reshape(b, t, nh, dn + dr)
        return q[..., :dn], apply_rope(q[..., dn:], cos[:, :, None, :], sin[:, :, None, :], c.rope_interleave)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What is cached per token: the normalised latent [B, T, R] and the RoPE'd key [B, T, r] shared by every
        head."""
        c = self.config
        kv_a = self._latent_proj(self.kv_a_proj_with_mqa, x)
        latent = self.kv_a_layernorm(kv_a[..., : c.kv_lora_rank])
        return latent, apply_rope(kv_a[..., c.kv_lora_rank :], cos, sin, c.rope_interleave)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        key_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, H], positions [B, T]; cache = (latent [B, S, R], rope_key [B, S, r]) written at `positions`.

        key_mask [B, S_keys] (True = attend) masks padding; causality comes from positions; segment_ids [B, T]
        (no cache) restricts attention to keys of the same segment. The softmax itself is
        `small4_jax.kernels.attention` (O(T) memory; backend from `config.attn_impl`).
        """
        c = self.config
        b, t, _ = x.shape
        nh, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        q_nope, q_pe = self.query(x, cos, sin)
        latent, k_pe = self.latent(x, cos, sin)

        if cache is not None:
            cache_latent, cache_rope = cache
            start = positions[:, 0]
            write = jax.vmap(lambda buf, new, s: jax.lax.dynamic_update_slice_in_dim(buf, new, s, axis=0))
            cache_latent = write(cache_latent, latent.astype(cache_latent.dtype), start)
            cache_rope = write(cache_rope, k_pe.astype(cache_rope.dtype), start)
            keys_latent, keys_rope = cache_latent.astype(x.dtype), cache_rope.astype(x.dtype)
            key_pos = jnp.broadcast_to(jnp.arange(cache_latent.shape[1])[None], (b, cache_latent.shape[1]))
            cache = (cache_latent, cache_rope)
        else:
            keys_latent, keys_rope, key_pos = latent, k_pe, positions

        kv = project(self.kv_b_proj, keys_latent).reshape(b, keys_latent.shape[1], nh, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        # Expanded MLA is ordinary attention with K = dn + dr: the rope key is shared by every head, and the softmax
        # scale times the Llama-4 per-position factor is folded into q (in float32, then cast).
        scale = c.attn_softmax_scale * llama4_query_scale(c, positions)  # [B, T]
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        q = (q.astype(jnp.float32) * scale[:, :, None, None]).astype(q.dtype)
        k_pe_heads = jnp.broadcast_to(keys_rope[:, :, None, :], (*keys_rope.shape[:2], nh, dr)).astype(k_nope.dtype)
        k = jnp.concatenate([k_nope, k_pe_heads], axis=-1)
        out = attention(
            q, k, v, q_positions=positions, k_positions=key_pos, q_segments=segment_ids, k_segments=segment_ids,
            key_mask=key_mask, impl=c.attn_impl,
        ).reshape(b, t, nh * dv)
        return project(self.o_proj, out), cache


class DecoderLayer(nnx.Module):
    def __init__(self, config: Small4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.self_attn = MLA(c, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        if c.is_moe_layer(layer):
            self.mlp = MoE(c, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(c, c.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, h, positions, cos, sin, cache=None, key_mask=None, segment_ids=None):
        return self.residual(h, lambda attn, a: attn(a, positions, cos, sin, cache, key_mask, segment_ids))

    def residual(self, h: jax.Array, attend, expert_ids: jax.Array | None = None, return_ids: bool = False):
        """The layer body: h + attention(norm(h)), then + mlp(norm(h)). `attend(self_attn, a)` -> (output [B, T, H],
        carry): the contiguous cache here, the paged one in `paged.forward`; returns (h, carry).

        Routing replay and recording (MoE layers; a dense layer ignores them): expert_ids [B * T, k] are used
        instead of the router's top-k (`MoE.__call__`); return_ids returns (h, carry, ids) with ids = (used, the
        router's own top-k) [B * T, k] each, or None in a dense layer (`record_ids`)."""
        with jax.named_scope("attention"):
            a, carry = attend(self.self_attn, self.input_layernorm(h))
            h = h + a
        ids = None
        with jax.named_scope("mlp"):
            a = self.post_attention_layernorm(h)
            if not isinstance(self.mlp, MoE):
                y = self.mlp(a)
            elif return_ids:
                y, *ids = self.mlp(a, expert_ids, return_ids=True)
            else:
                y = self.mlp(a, expert_ids)
            h = h + y
        return (h, carry, ids) if return_ids else (h, carry)


def routing_buffers(config: Small4Config, tokens: int) -> tuple[jax.Array, jax.Array]:
    """(used, own) [L, tokens, k] int32 of -1: what `record_ids` fills as the layers run (dense layers stay -1)."""
    empty = jnp.full((config.num_hidden_layers, tokens, config.num_experts_per_tok), -1, jnp.int32)
    return empty, empty


def record_ids(buffers: tuple[jax.Array, jax.Array], i, ids) -> tuple[jax.Array, jax.Array]:
    """Write layer i's (used, own) ids [N, k] (`DecoderLayer.residual(return_ids=True)`) into the buffers."""
    if ids is None:  # a dense layer
        return buffers
    return tuple(buf.at[i].set(x.astype(buf.dtype)) for buf, x in zip(buffers, ids))


def layers_first(routing: jax.Array) -> jax.Array:
    """Expert ids per token [B, T, L, k] (as the engine returns them, vLLM's `routed_experts` layout) -> per layer
    [L, B * T, k] (what the layers read)."""
    b, t, n, k = routing.shape
    return jnp.moveaxis(jnp.asarray(routing, jnp.int32).reshape(b * t, n, k), 1, 0)


def tokens_first(ids: jax.Array, b: int, t: int) -> jax.Array:
    """[L, B * T, k] -> [B, T, L, k] (`layers_first` inverted)."""
    return jnp.moveaxis(ids, 0, 1).reshape(b, t, ids.shape[0], ids.shape[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Stacked layers.
def layer_groups(config: Small4Config) -> list[tuple[int, int]]:
    """(first layer, count) of each run of consecutive layers of one kind (dense MLP or MoE), in order: the layers
    one stack holds. Small 4 (every layer MoE) is one group; `first_k_dense_replace = k` gives [(0, k), (k, L - k)]."""
    groups: list[tuple[int, int]] = []
    for i in range(config.num_hidden_layers):
        if groups and config.is_moe_layer(i) == config.is_moe_layer(groups[-1][0]):
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((i, 1))
    return groups


class Shared(nnx.Variable):
    """A variable one object of which serves every layer (e.g. the batch rows' adapter ids, the dropout key): a
    layer stack does not stack it, and the scan passes it to every layer whole. Every other variable of a stacked
    module (parameters, adapters, per-layer flags) has the leading layer axis."""


class PerLayer(nnx.Variable):
    """A non-trainable per-layer value of a stacked module (e.g. whether layer j of a stack has an adapter)."""


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module of the same class whose parameters are those of `modules` stacked on a new leading axis (the
    modules must have one structure). Works abstractly (inside `nnx.eval_shape`) as well as on arrays."""
    parts = [nnx.split(m) for m in modules]
    graphdef = parts[0][0]
    states = [p[1] for p in parts]
    if any(isinstance(x, jax.core.Tracer | jax.ShapeDtypeStruct) for x in jax.tree.leaves(states)):
        return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    default = jax.local_devices()[0]
    if default.platform == "cpu" and all(x.sharding.device_set == {default} for x in jax.tree.leaves(states)):
        # On the default CPU device (a random model as it is built): numpy stacks with no compile at all, and the
        # stacks stay uncommitted, as eager results are (placing them on a mesh later is then no device transfer).
        return nnx.merge(graphdef, jax.tree.map(lambda *xs: jax.device_put(np.stack([np.asarray(x) for x in xs])),
                                                *states))
    # Elsewhere one compiled program stacks every leaf (eagerly, each leaf's shape would be a compile).
    return nnx.merge(graphdef, _stack_trees(states))


@jax.jit
def _stack_trees(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def build_layer_stacks(config: Small4Config, *, dtype, rngs: nnx.Rngs) -> nnx.List:
    """The decoder's layer stacks, one per `layer_groups` entry (layers initialised in order from `rngs`)."""
    return nnx.List([
        stack_modules([DecoderLayer(config, i, dtype=dtype, rngs=rngs) for i in range(start, start + n)])
        for start, n in layer_groups(config)
    ])


def _read_only(var, value):
    raise TypeError("a layer view (model.layers[i], lora.adapters()) is a read-only copy of one layer of a stack: "
                    "change model.layer_stacks[g] (slice i - start of its group, model.layer_groups) instead")


def _take(x, j: int):
    """x[j], also for the shape-only leaves of an abstract model."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[j]


def layer_slice(stack: nnx.Module, j: int) -> nnx.Module:
    """Layer j of a stack as an ordinary (unstacked) module: a read-only copy of slice j of its variables (writing
    one raises a TypeError, rather than silently changing the copy)."""
    graphdef, shared, params = nnx.split(stack, Shared, ...)
    view = nnx.merge(graphdef, shared, jax.tree.map(lambda x: _take(x, j), params))
    for _, var in nnx.iter_graph(view):
        if isinstance(var, nnx.Variable) and not isinstance(var, Shared):
            var.set_metadata(on_set_value=_read_only)
    return view


def per_layer_items(config: Small4Config, state) -> list[tuple[tuple[str, ...], jax.Array]]:
    """(path, array) of every leaf of `state` (the model's, or a part of it such as the LoRA parameters or their
    gradients) with a layer stack's leaves unstacked to the per-layer paths they had before the layers were
    stacked: ('layer_stacks', g, *rest) [n, ...] -> ('layers', str(start + j), *rest) for each j."""
    groups = layer_groups(config)
    out = []
    for path, var in nnx.to_flat_state(state):
        names = tuple(str(p) for p in path)
        value = var[...] if isinstance(var, nnx.Variable) else var
        if len(names) > 2 and names[0] == "layer_stacks":
            start, n = groups[int(names[1])]
            out += [(("layers", str(start + j)) + names[2:], value[j]) for j in range(n)]
        else:
            out.append((names, value))
    return out


class LayerViews:
    """`model.layers`: a read-only sequence of the layers (`layers[i]` is layer i sliced out of its stack, a copy;
    change parameters through `layer_stacks`)."""

    def __init__(self, stacks, groups):
        self._stacks, self._groups = stacks, groups

    def __len__(self) -> int:
        return sum(n for _, n in self._groups)

    def __getitem__(self, i: int) -> nnx.Module:
        if i < 0:
            i += len(self)
        for stack, (start, n) in zip(self._stacks, self._groups):
            if start <= i < start + n:
                return layer_slice(stack, i - start)
        raise IndexError(f"layer {i} out of range ({len(self)} layers)")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _frozen_expert_weight(path, value) -> bool:
    """The routed experts' base weights and scales (not their LoRA adapters): what `run_layers` passes whole."""
    return (len(path) >= 2 and path[-2] == "experts"
            and path[-1] in ("gate_up", "down", "gate_up_scale", "down_scale", "gate_up_act_scale", "down_act_scale")
            and not isinstance(value, nnx.LoRAParam))


def _dense_weight(path, value) -> bool:
    """A dense projection's base weight (an attention / MLP linear's `kernel`, its quantised scales) or the router's
    weight, not sharded over the mesh it lives on: what `run_layers` passes whole with `dense_impl` "gmm". A
    projection sharded over `tensor` stays with XLA (the kernel runs unpartitioned outside a shard_map: XLA would
    gather its stack)."""
    names = tuple(str(p) for p in path)
    if len(names) < 2 or isinstance(value, nnx.LoRAParam):
        return False
    module, leaf = names[-2], names[-1]
    if not ((module in QUANTISED_LINEARS and leaf.startswith("kernel")) or (module == "gate" and leaf == "weight")):
        return False
    mesh = mesh_of(value[...] if isinstance(value, nnx.Variable) else value)
    if mesh is None:
        return True
    axes = param_axes(names[:-1] + ("kernel",), 2)
    return not any(mesh_axes(a, mesh) for a in axes if a)


def run_layers(stacks, groups, h: jax.Array, carry, fn, *, scan: bool = True, remat: bool = False,
               frozen_experts: bool = True, dense: str = "xla"):
    """h, carry through every layer in order: `fn(layer, i, h, carry) -> (h, carry)` with `layer` an unstacked
    DecoderLayer (the stack's slice) and i its global index (a traced int32 under the scan, a Python int unrolled).

    Each stack runs under `jax.lax.scan` over its parameters' leading axis (`scan=False`: a Python loop over the
    same slices). `carry` is what every layer reads and writes, e.g. the whole stacked cache, updated in place at
    row i, so the loop carries one buffer and nothing is copied per layer. `remat` wraps each layer in
    `jax.checkpoint` (its activations are recomputed in the backward pass, one layer at a time).

    `frozen_experts` (serving, LoRA fine-tuning: no gradient w.r.t. the routed experts' base weights): those stacks
    are not scanned but closed over, and the layer gets them as `moe.AtLayer(stack, i - start)`, read in place by
    the grouped-matmul kernel. Sliced by the scan instead, each layer's experts were copied into a temporary
    before the kernel (a dynamic-slice fusion in the loop body): twice the weight reads of a decode step. Pass
    False where their gradient is wanted (full fine-tuning of the experts): it then comes one slice a layer.

    `dense` (`config.dense_impl`, resolved by `moe.resolve_dense_impl`; callers pass it for inference programs only,
    "xla" where the dense weights are differentiated): with "gmm" the dense projections' base weights (attention,
    shared expert and dense MLP linears, router; `_dense_weight`) are closed over the same way, and each linear
    multiplies its `AtLayer` through the grouped-matmul kernel (`AtLayer.matmul`): XLA's GEMMs take no
    dynamic-slice operand, so under the scan every layer's dense weights were copied out of the stacks first
    (102.5 MiB a layer a device for Small 4 on 8 x H200: benchmarks/scan_copies.py), and a quantised weight was
    also dequantised by XLA; the kernel reads the bytes in place. LoRA adapters and biases stay scanned.
    """
    dense = dense if dense == "xla" else resolve_dense_impl(dense, h)
    closed = [f for f, on in ((_frozen_expert_weight, frozen_experts), (_dense_weight, dense == "gmm")) if on]
    for stack, (start, n) in zip(stacks, groups):
        if closed:
            graphdef, shared, whole, params = nnx.split(stack, Shared, nnx.Any(*closed), ...)
        else:
            (graphdef, shared, params), whole = nnx.split(stack, Shared, ...), None

        def body(c, xs, graphdef=graphdef, shared=shared, whole=whole, start=start):
            h, carry = c
            i, p = xs
            states = (shared, p) if whole is None else (
                shared, jax.tree.map(lambda x: AtLayer(x, jnp.asarray(i - start, jnp.int32)), whole), p)
            out, carry = fn(nnx.merge(graphdef, *states), i, h, carry)
            return (out.astype(h.dtype), carry), None

        if remat:
            body = jax.checkpoint(body)
        if scan:
            (h, carry), _ = jax.lax.scan(body, (h, carry), (jnp.arange(start, start + n, dtype=jnp.int32), params))
        else:
            for j in range(n):
                (h, carry), _ = body((h, carry), (start + j, jax.tree.map(lambda x, j=j: x[j], params)))
    return h, carry


# ----------------------------------------------------------------------------------------------------------------------
# The model.
class Small4ForCausalLM(nnx.Module):
    """Mistral Small 4 text model. `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: Small4Config, *, dtype="float32", rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = _dtype(dtype)
        self.embed_tokens = nnx.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=normal_init(c.initializer_range),
            rngs=rngs,
        )
        self.layer_stacks = build_layer_stacks(c, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.lm_head = None if c.tie_word_embeddings else linear(c.hidden_size, c.vocab_size, c, dtype, rngs)
        if c.vision is not None:  # image input (small4_jax/nn/vision.py); its features come in through input_embeds
            self.vision_tower = PixtralVisionModel(c.vision, dtype=dtype, rngs=rngs)
            self.multi_modal_projector = MultiModalProjector(c.vision, c.hidden_size, dtype=dtype, rngs=rngs)
        else:
            self.vision_tower = self.multi_modal_projector = None
        self.remat = c.runtime.remat  # recompute each layer's activations in the backward pass (training memory)
        self.scan_layers = c.runtime.scan_layers  # False: the layers in a Python loop (compile-time comparison only)
        self.loss_chunk = 1024  # tokens per chunk of `token_loss` (logits held: chunk x vocab float32)
        # True to differentiate the routed experts' base weights (full fine-tuning): `run_layers` then scans them
        # per layer. False (serving, LoRA): each layer reads the frozen stacks in place (`run_layers`)
        self.train_experts = False

    def _forward(self, input_ids, positions, cache: KVCache | None, key_mask, segment_ids=None, input_embeds=None,
                 head=True, routing=None, return_routing=False):
        """(logits or the final hidden states, the cache), then with return_routing (used, own) [L, B * T, k]
        (`record_ids`). routing: expert ids per token [B, T, L, k] replayed in the MoE layers (`replay_route`)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        forced = None
        if routing is not None:
            want = (b, t, self.config.num_hidden_layers, self.config.num_experts_per_tok)
            if tuple(routing.shape) != want:
                raise ValueError(f"routing replay: expert ids of shape {tuple(routing.shape)}, expected {want} "
                                 "(tokens x layers x experts per token)")
            forced = layers_first(routing)
        if positions is None:
            start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
            positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        positions = jnp.asarray(positions, jnp.int32)
        cos, sin = rope_cos_sin(self.config, positions)
        h = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        remat = self.remat and cache is None  # training: recompute each layer in the backward pass

        def layer_fn(layer, i, h, carry):
            kv, rec = carry if return_routing else (carry, None)
            layer_cache = None if kv is None else (kv[0][i], kv[1][i])
            out = layer.residual(h, lambda attn, a: attn(a, positions, cos, sin, layer_cache, key_mask, segment_ids),
                                 None if forced is None else forced[i], return_routing)
            h = out[0]
            if kv is not None:
                kv = (kv[0].at[i].set(out[1][0]), kv[1].at[i].set(out[1][1]))
            if return_routing:
                return h, (kv, record_ids(rec, i, out[2]))
            return h, kv

        kv = None if cache is None else (cache.latent, cache.rope_key)
        carry = (kv, routing_buffers(self.config, b * t)) if return_routing else kv
        h, carry = run_layers(self.layer_stacks, layer_groups(self.config), h, carry, layer_fn, scan=self.scan_layers,
                              remat=remat, frozen_experts=not self.train_experts,
                              dense="xla" if cache is None else self.config.dense_impl)  # cached: inference
        kv, rec = carry if return_routing else (carry, None)
        extra = (rec,) if return_routing else ()
        h = self.norm(h)
        if not head:  # the final hidden states, for the chunked loss
            return h, None, *extra
        logits = self.logits(h)
        if cache is None:
            return logits, None, *extra
        new_cache = KVCache(latent=kv[0], rope_key=kv[1], length=jnp.max(positions, axis=1) + 1)
        return logits, new_cache, *extra

    def __call__(self, input_ids, positions=None, attention_mask=None, segment_ids=None, input_embeds=None) -> jax.Array:
        """Logits [B, T, vocab] for int32 ids [B, T].

        positions [B, T] default to 0..T-1 (give per-document positions for packed rows); attention_mask [B, T] of
        0/1 hides padding keys; segment_ids [B, T] keeps attention inside each packed document (equal ids attend).
        input_embeds [B, T, H], if given, replaces the embedding lookup (image features in the [IMG] rows: vision.py).
        """
        key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        segs = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        return self._forward(input_ids, positions, None, key_mask, segs, input_embeds)[0]

    @property
    def layers(self) -> LayerViews:
        """Layer i as `model.layers[i]` (read-only copies sliced out of the stacks)."""
        return LayerViews(self.layer_stacks, layer_groups(self.config))

    def logits(self, h: jax.Array) -> jax.Array:
        """The output head on final (normed) hidden states [..., H] -> [..., vocab] (tied to the embeddings or not)."""
        return self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)

    def token_loss(self, input_ids, targets, weights, positions=None, segment_ids=None, chunk: int | None = None,
                   input_embeds=None):
        """(sum of weights x cross-entropy of `targets`, sum of weights), float32 scalars, for ids [B, T].

        Same as a float32 log-softmax over `self(input_ids)`, without ever holding the [B, T, vocab] logits: the
        head and the log-softmax run over `chunk` tokens at a time (default `self.loss_chunk`) in a scan whose body
        is rematerialised, so the backward is chunked too (`chunked_cross_entropy`).
        """
        segs = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        h = self._forward(input_ids, positions, None, None, segs, input_embeds, head=False)[0]
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return chunked_cross_entropy(head, h, targets, weights, chunk or self.loss_chunk)

    def token_logprobs(self, input_ids, targets, positions=None, segment_ids=None, chunk: int | None = None,
                       routing=None, return_routing: bool = False):
        """float32 log p(targets) [B, T] for ids [B, T] (teacher-forced), chunked like `token_loss`: what preference
        and policy-gradient losses (train/dpo.py, train/grpo.py) need per token.

        routing: expert ids [B, T, L, k] to replay in the MoE layers instead of their routers' top-k (rollout routing
        replay, `moe.replay_route`: the weights still come from this forward's routers; a token whose ids hold a
        negative entry routes itself). return_routing: also return (ids used, the routers' own top-k), each
        [B, T, L, k] int32 (-1 in dense layers)."""
        segs = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        out = self._forward(input_ids, positions, None, None, segs, None, head=False, routing=routing,
                            return_routing=return_routing)
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        lp = chunked_token_logprobs(head, out[0], targets, chunk or self.loss_chunk).reshape(jnp.shape(targets))
        if not return_routing:
            return lp
        b, t = jnp.shape(targets)
        return lp, tuple(tokens_first(x, b, t) for x in out[2])

    def step(self, input_ids, cache: KVCache, positions=None, input_embeds=None) -> tuple[jax.Array, KVCache]:
        """Run ids [B, T] that continue each row of `cache`; returns (logits [B, T, V], updated cache).

        input_embeds [B, T, H], if given, replaces the embedding lookup (image features in the [IMG] rows: vision.py).
        """
        return self._forward(input_ids, positions, cache, None, None, input_embeds)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.create(self.config, batch, max_len, self.dtype)


def interleave_experts(model: Small4ForCausalLM, blocks: int) -> None:
    """Reorder every routed-expert stack's gate_up columns (and per-column scales) in place into `blocks` blocks
    [gate_t | up_t] (`moe.interleave_gate_up`; blocks=1 restores [gate | up]) and record it (`Experts.gate_up_blocks`),
    so that a tensor-parallel layout of width `blocks` reads each shard's gate and up columns without an all-gather.
    Each array keeps its sharding; the old one is donated. The serving engine does this on a tensor-parallel mesh."""
    for stack in model.layer_stacks:
        experts = getattr(stack.mlp, "experts", None)
        if experts is None or experts.gate_up_blocks == blocks:
            continue
        if experts.lora is not None:
            raise ValueError("interleave_experts: the routed experts carry LoRA adapters in the [gate | up] order")
        current = experts.gate_up_blocks

        def reorder(w, current=current):
            if current > 1:
                w = interleave_gate_up(w, current, inverse=True)
            return w if blocks == 1 else interleave_gate_up(w, blocks)

        names = ["gate_up"] + (["gate_up_scale"] if experts.gate_up_scale is not None
                               and experts.gate_up_scale[...].shape[-1] > 1 else [])
        for name in names:
            value = getattr(experts, name)[...]
            out = jax.jit(reorder, out_shardings=getattr(value, "sharding", None), donate_argnums=0)(value)
            setattr(experts, name, nnx.Param(out))
        experts.gate_up_blocks = blocks


def shard_latent_projections(model: Small4ForCausalLM, mesh=None) -> None:
    """The `shard_latent_proj` layout (`--shard-latent-proj`): q_a_proj and kv_a_proj_with_mqa split over `tensor` by
    their input dim (`sharding.spec_for`), each device reading 1/tp of them for one more collective a layer (the two
    projections' partial sums, all-reduced together). With `mesh`, the weights are re-placed in place; without, only
    the attention is marked (an abstract model the caller places with `shard_latent_proj=True`, `aot.placed`)."""
    if mesh is not None:
        place_model(model, mesh, _latent_weight, shard_latent_proj=True)
    for stack in model.layer_stacks:
        stack.self_attn.latent_split = True


def _latent_weight(path, value) -> bool:
    return any(str(p) in LATENT_PROJ for p in path)


def _shard_chunks(h: jax.Array, chunk: int):
    """(cut, uncut) for the tokens h [n, H] in chunks of `chunk` per batch shard (`chunked_cross_entropy`):
    cut [n, ...] -> [steps, shards * chunk, ...], step i holding chunk i of every shard (each shard's last chunk
    padded with zeros); uncut [steps, shards * chunk, ...] -> [n, ...], the inverse for per-token results."""
    mesh = mesh_of(h)
    n = h.shape[0]
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh, n)) if mesh is not None else 1
    per_shard = n // shards
    chunk = max(1, min(chunk, per_shard))
    steps = -(-per_shard // chunk)
    pad = steps * chunk - per_shard

    def cut(x):
        x = x.reshape(shards, per_shard, *x.shape[1:])
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        x = x.reshape(shards, steps, chunk, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape(steps, shards * chunk, *x.shape[3:])

    def uncut(y):
        y = jnp.swapaxes(y.reshape(steps, shards, chunk, *y.shape[2:]), 0, 1)
        return y.reshape(shards, steps * chunk, *y.shape[3:])[:, :per_shard].reshape(n, *y.shape[3:])

    return cut, uncut


def chunked_cross_entropy(head: nnx.Module, h: jax.Array, targets, weights, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum w * (logsumexp(z) - z[target]), sum w) with z = head(h) in float32, over tokens h [..., H].

    The tokens are flattened and cut into chunks of `chunk` (the last padded with weight 0); a `lax.scan` computes
    each chunk's logits and loss under `jax.checkpoint`, so forward and backward hold one [chunk, vocab] block of
    logits, never [tokens, vocab]. `head` is the model's lm_head (or the tied embedding, through `attend`), passed
    as split state (a pure function inside jax.jit / jax.grad of a merged model).

    On a mesh the tokens are split over the batch axes (`sharding.batch_axes`, data-parallel): each shard cuts ITS
    tokens into chunks of `chunk`, and step i of the scan takes chunk i of every shard, so every device computes
    the loss of its own tokens (`chunk` of them at a time). Cut across the shards instead, a step's chunk lay on
    one device and every device computed it: the whole batch's logits on each.
    """
    dim = h.shape[-1]
    h = h.reshape(-1, dim)
    targets = jnp.asarray(targets, jnp.int32).reshape(-1)
    weights = jnp.asarray(weights, jnp.float32).reshape(-1)
    cut, _ = _shard_chunks(h, chunk)
    graphdef, state = nnx.split(head)

    @jax.checkpoint
    def chunk_loss(state, hc, tc, wc):
        m = nnx.merge(graphdef, state)
        z = (m.attend(hc) if isinstance(m, nnx.Embed) else m(hc)).astype(jnp.float32)
        nll = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0]
        return jnp.sum(nll * wc)

    def body(total, xs):
        return total + chunk_loss(state, *xs), None

    xs = (cut(h), cut(targets), cut(weights))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights)


def chunked_token_logprobs(head: nnx.Module, h: jax.Array, targets, chunk: int) -> jax.Array:
    """log softmax(head(h))[target] in float32 per token [n] (tokens h [..., H] flattened), one [chunk, vocab] block
    of logits at a time under `jax.checkpoint`, as `chunked_cross_entropy` (on a mesh each shard cuts its own tokens:
    each device computes its tokens' logits, not the whole batch's)."""
    dim = h.shape[-1]
    h = h.reshape(-1, dim)
    targets = jnp.asarray(targets, jnp.int32).reshape(-1)
    cut, uncut = _shard_chunks(h, chunk)
    graphdef, state = nnx.split(head)

    @jax.checkpoint
    def chunk_logprobs(state, hc, tc):
        m = nnx.merge(graphdef, state)
        z = (m.attend(hc) if isinstance(m, nnx.Embed) else m(hc)).astype(jnp.float32)
        return jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)

    return uncut(jax.lax.map(lambda xs: chunk_logprobs(state, *xs), (cut(h), cut(targets))))


def init_model(config: Small4Config, *, seed: int = 0, dtype="float32", quantize: str | None = None,
               runtime=None):
    """A randomly initialised model (weights from `seed`), its linears and experts quantised when `quantize` is
    a quant.SPELLINGS spelling ("int4": int4 experts, int8 dense linears; `quant.policy`). `runtime` (a
    small4_jax.runtime.Runtime or a mapping of its options) replaces the config's runtime options."""
    if runtime is not None:
        config = config.with_runtime(runtime)
    return quantize_model(Small4ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed)), quantize)


def abstract_model(config: Small4Config, *, dtype="float32", quantize: str | None = None,
                   activations: str | None = None):
    """The model with shape-only parameters (no memory, no FLOPs): what a checkpoint is loaded into (with
    activations="fp8", W8A8: its static activation scales as parameters too, `qlinear.quantize_model`)."""
    return nnx.eval_shape(lambda: quantize_model(Small4ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)), quantize,
                                                 activations=activations))


def param_count(config: Small4Config) -> int:
    """Number of parameters, from shapes only."""
    _, state = nnx.split(abstract_model(config))
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


