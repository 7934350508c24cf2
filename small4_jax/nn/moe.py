"""Routing and the routed-expert dispatch of the Mistral Small 4 MoE layer, as plain functions.

`route` turns router logits into top-k expert ids and weights (fp32: softmax over all experts, group-limited top-k,
renormalise, scale); `replay_route` takes given expert ids instead of the top-k (rollout routing replay: the ids
a serving engine used, train/grpo.py) with the weights recomputed from the router. `routed_experts` is the one
dispatch function every MoE layer calls:

    sort_by_expert -> permute (gather rows into expert order) -> expert_mlp -> unpermute (gather back) -> combine

`expert_mlp` is the fused expert MLP: one grouped matmul for gate+up on the stored [E, H, 2F] layout (which already is
the kernel's [G, K, N]; checkpoint.py transposes HF's [E, 2F, H] into it once, at load), SwiGLU, the down projection;
the router weights are applied in float32 at the combine. Per-expert LoRA adapters (`ExpertLoRA`) are extra grouped
matmuls over the same sorted rows. The grouped matmul is `small4_jax.kernels.gmm`, chosen by `impl`:

    "pallas"      the Pallas kernel (custom VJP; Pallas interpret mode on a CPU, so only for tests there)
    "ragged_dot"  jax.lax.ragged_dot (XLA's lowering)
    "dense"       every expert on every token: a reference for tests (O(E) work)
    "tiled"       not a grouped matmul: the whole expert MLP per row tile in an XLA loop (below; one device, no LoRA)
    "auto"        the fastest correct one where the program runs (`platform.platform_of` the weights / mesh, not the
                  default backend): "pallas" on GPUs once its first-use self-check passed, "ragged_dot" elsewhere;
                  on one CPU device without LoRA, "tiled" (below)

On a CPU XLA lowers ragged_dot to a masked matmul of every routed row with every expert (E x the work), and the
dense einsum over all experts relayouts every expert's weights on every call, so `auto` there (one device, no LoRA)
takes the tiled loop instead (`_tiled_experts`, impl "tiled"): the routed pairs sorted by expert are cut into
fixed-size row tiles that never straddle two experts, and an XLA loop runs each tile through its expert's fused MLP
(gate_up, SwiGLU, down), skipping the unused tail of the static tile bound. Its work follows the routed pairs: at
most P + E (T - 1) rows for P pairs over E experts with tile T, where T is the mean group size P / E rounded up to a
power of two (capped at 128), so padding adds at most about the routed work and the loop runs at most about 2E
tiles. Timings against the dense and ragged_dot paths: benchmarks/RESULTS.md ("The CPU routed-experts loop",
`python benchmarks/moe_gmm.py --cpu`).

Permute and unpermute are gathers whose backward passes are gathers too (custom VJPs), never scatter-adds.

Expert parallelism: when the expert weights live on a mesh with an `expert` axis (`sharding.mesh_of`), the dispatch
runs inside `jax.shard_map` over the mesh axes data / expert / tensor (layout from `sharding.moe_layout`). Tokens
enter and leave split over data x expert, as the attention and dense layers hold them (`sharding.RULES["batch"]`:
data-parallel attention), with one of two strategies (`strategy`, default "auto": by tokens per data shard against `a2a_min_tokens`):

    "replicated"  every expert shard gathers the tokens of its expert group, runs its local experts on their rows
                  (the kernel's local-group window), and a reduce-scatter over expert (a psum over tensor) combines
                  and returns each shard its own tokens. Decode, small batches.
    "all_to_all"  each shard sends every routed row of its tokens to the shard owning its
                  expert, runs its local experts, and sends results back. `jax.lax.ragged_all_to_all` on GPU meshes; on
                  other platforms (XLA:CPU has no ragged all-to-all) a padded dense `all_to_all` with the same
                  semantics (`_ragged_all_to_all_dense`). Prefill and training.
    "none"        no shard_map: XLA partitions the single-device code (also the fallback when the mesh has no
                  expert axis or its size does not divide the number of experts).

With tensor parallelism (tp > 1) each shard holds gate_up columns [t*2F/tp, (t+1)*2F/tp) of the stored [gate | up]
layout, so the gate_up output is all-gathered over `tensor` and each shard keeps its F/tp gate and up columns, which
match its rows of `down`; partial outputs are summed in float32 by a psum over `tensor`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from small4_jax import kernels, platform
from small4_jax.config import DENSE_IMPLS, Small4Config
from small4_jax.kernels.gmm import pallas_triton
from small4_jax.nn.initializers import normal_init
from small4_jax.quant.formats import QArray, check_activations, column_scale, dequantize, quantize, quantize_act, w8a8_dot
from small4_jax.parallel.sharding import MoELayout, mesh_of, moe_layout, scale_spec, spec_for

IMPLS = ("pallas", "ragged_dot", "dense")
STRATEGIES = ("auto", "replicated", "all_to_all", "none")
_GMM_BACKEND = {"pallas": "pallas", "ragged_dot": "ragged_dot", "dense": "reference"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AtLayer:
    """One layer's expert weight given as its whole layer stack and the layer's index: `stack[index]`, not sliced.

    `model.run_layers` hands the frozen expert weights to each layer this way (the stack closed over by the scan,
    `index` the scan's int32 counter): the "pallas" grouped matmul reads its tiles at that layer in place
    (`kernels.gmm(..., layer=index)`), so no layer's experts are copied into a temporary before the kernel; the
    CPU tile loop (`_tiled_experts`) slices one expert of it per tile. Every other path takes `get()`, the layer's
    slice. `stack` is an array [L, E, ...] or a QArray of stacks."""

    stack: Any
    index: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    def __getitem__(self, key):  # `param[...]` of an nnx variable holding an AtLayer
        if key is Ellipsis:
            return self
        raise TypeError(f"AtLayer supports only [...]; got {key!r}")

    def get(self):
        """stack[index] (a dynamic slice: a copy of the layer's weights)."""
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False), self.stack)

    def matmul(self, x: jax.Array, out_dtype) -> jax.Array:
        """x [..., K] @ stack[index] [K, N] -> [..., N] in `out_dtype`, accumulated in float32: a dense projection
        whose stack `model.run_layers` passed whole (`dense_impl`, model.py). The grouped-matmul kernel runs it with
        one group holding every row ("pallas": compiled on GPUs, Pallas interpret mode elsewhere), reading the
        float or quantised stack at the layer in place (a QArray dequantised tile by tile in the kernel), so
        neither a copy of the layer's weights nor a dequantised one is written. The stack gets a group axis of one
        ([L, 1, K, N]: a bitcast). A float stack in another dtype than x is sliced and multiplied by XLA instead
        (the kernel would cast the whole stack)."""
        stack = self.stack
        if not isinstance(stack, QArray) and jnp.dtype(stack.dtype) != jnp.dtype(x.dtype):
            return jnp.dot(x, self.get().astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
        rows = x.reshape(-1, x.shape[-1])
        grouped = jax.tree.map(lambda a: a[:, None], stack)
        y = kernels.gmm(rows, grouped, jnp.full((1,), rows.shape[0], jnp.int32), layer=self.index,
                        preferred_element_type=out_dtype, backend="pallas")
        return y.reshape(*x.shape[:-1], y.shape[-1])


def at_layer(make, *parts):
    """`make(*parts)` of one layer's weight parts (e.g. a QArray's values and scales), or, where `run_layers` passed
    them as AtLayers of their whole stacks, one AtLayer of `make` over the stacks, at their index. None parts stay
    None."""
    first = next(p for p in parts if p is not None)
    if isinstance(first, AtLayer):
        return AtLayer(make(*(None if p is None else p.stack for p in parts)), first.index)
    return make(*parts)


class Experts(nnx.Module):
    """Routed experts, stacked: gate_up [E, H, 2F] (gate columns then up), down [E, F, H].

    `lora` is None, or a module with `weights() -> moe.ExpertLoRA` (per-expert adapters applied inside the same
    grouped matmuls; attached by small4_jax.lora.adapters).
    """

    def __init__(self, config: Small4Config, *, dtype, rngs: nnx.Rngs):
        e, h, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        init = normal_init(config.initializer_range)
        self.gate_up = nnx.Param(init(rngs.params(), (e, h, 2 * f), jnp.dtype(dtype)))
        self.down = nnx.Param(init(rngs.params(), (e, f, h), jnp.dtype(dtype)))
        # set by quantize(): gate_up / down then hold quant.QArray values, these their scale grids
        self.gate_up_scale, self.down_scale = nnx.data(None), nnx.data(None)
        # W8A8 only (quantize(..., activations="fp8")): the experts' static activation scales [E, 1, 1]
        self.gate_up_act_scale, self.down_act_scale = nnx.data(None), nnx.data(None)
        self.lora = None
        # gate_up's column order: 1 is [gate | up]; tp is tp blocks [gate_t | up_t] (interleave_gate_up), what a
        # tensor-parallel layout of width tp reads without an all-gather (`model.interleave_experts`)
        self.gate_up_blocks = 1

    def quantize(self, fmt: str, activations: str | None = None) -> None:
        """Quantise the stacked weights in place (quant.py formats; fp8 gets one scale per expert); with
        activations="fp8" also placeholder activation scales (1) for a loader to fill (`qlinear.quantize_model`)."""
        for name in ("gate_up", "down"):
            q = quantize(getattr(self, name)[...], fmt)
            setattr(self, name, nnx.Param(q.values))
            setattr(self, name + "_scale", nnx.Param(q.scale))
            if check_activations(activations, fmt):
                setattr(self, name + "_act_scale", nnx.Param(jnp.ones(q.scale.shape[:-2] + (1, 1), jnp.float32)))

    def weights(self):
        """(gate_up, down): float arrays, or `quant.QArray`s (values + scales) for a quantised model; each wrapped
        in one `moe.AtLayer` when `run_layers` passes the layer its stacks whole."""
        if self.gate_up_scale is None:
            return self.gate_up[...], self.down[...]
        def quantised(name):
            act = getattr(self, name + "_act_scale")
            return at_layer(QArray, getattr(self, name)[...], getattr(self, name + "_scale")[...],
                            None if act is None else act[...])

        return quantised("gate_up"), quantised("down")


def sliced(w):
    """An expert weight as its layer's own array (an AtLayer's slice: a copy of the layer's weights)."""
    return w.get() if isinstance(w, AtLayer) else w


def _placed(w):
    """The array an expert weight lives on (for its mesh and platform)."""
    w = w.stack if isinstance(w, AtLayer) else w
    return w.values if isinstance(w, QArray) else w


class ExpertLoRA(NamedTuple):
    """Per-expert low-rank adapters: W_e + scale * A_e @ B_e for gate_up and for down."""

    gate_up_a: jax.Array  # [E, H, r]
    gate_up_b: jax.Array  # [E, r, 2F]
    down_a: jax.Array  # [E, F, r]
    down_b: jax.Array  # [E, r, H]
    scale: float


# The first-use self-check of the Pallas kernel: device key -> None (passed) or the error text (fell back).
_SELF_CHECK: dict[tuple[str, int], str | None] = {}
FALLBACK_COST = (
    "jax.lax.ragged_dot compiled for a GPU (jax 0.10.2) computes every expert for every row: E / top_k times the "
    "FLOPs of the routed experts (32x for Small 4's 128 experts, top-4) and [rows, E, N] temporaries (8.0 GiB at "
    "8192 rows x 4096 -> 4096 with 128 experts)")


def kernel_self_check(device=None) -> str | None:
    """Run the Pallas grouped matmul once on `device` (default: this process's first GPU) against its reference.

    Once per device and process; returns None when it passed (or there is no GPU to run on: a CPU host compiling for
    compile-only GPUs, where the compile tests are the check), else the error, after one warning that names it and
    what the ragged_dot fallback costs.
    """
    device = device or platform.runnable_gpu()
    if device is None:
        return None
    key = (device.platform, device.id)
    if key not in _SELF_CHECK:
        try:
            kernels.gmm_self_check(device)
            _SELF_CHECK[key] = None
        except Exception as e:  # noqa: BLE001 - any failure (Triton, ptxas, driver, wrong numbers) means fall back
            first = (str(e).strip().splitlines() or [""])[0][:300]
            _SELF_CHECK[key] = f"{type(e).__name__}: {first}"
            warnings.warn(
                f"moe_impl 'auto': the Pallas grouped-matmul kernel failed its first-use check on {device.device_kind}"
                f" ({_SELF_CHECK[key]}); falling back to 'ragged_dot'. Cost: {FALLBACK_COST}. Set moe_impl to "
                "'ragged_dot' or 'pallas' explicitly to skip the check.", RuntimeWarning, stacklevel=3)
    return _SELF_CHECK[key]


def resolve_impl(impl: str, *placed) -> str:
    """The grouped-matmul implementation to use for `impl` ("auto" -> the fastest correct one where it runs).

    The platform is that of `placed` (the expert weights, the tokens, the mesh: `platform.platform_of`). "auto" is
    "pallas" on GPUs, after the kernel's first-use self-check (`kernel_self_check`) passed on a real GPU, and
    "ragged_dot" elsewhere (on a CPU the Pallas kernel only runs in interpret mode) or when the check failed.
    `routed_experts` then replaces "auto" on one CPU device without LoRA by "tiled" (module docstring).
    """
    if impl == "auto":
        if not (platform.on_gpu(*placed) and pallas_triton.available()):
            return "ragged_dot"
        return "pallas" if kernel_self_check() is None else "ragged_dot"
    if impl not in IMPLS:
        raise ValueError(f"unknown moe impl {impl!r}; expected 'auto' or one of {IMPLS}")
    return impl


def resolve_dense_impl(impl: str, *placed) -> str:
    """"xla" or "gmm": how the layers' dense projections multiply in an inference program (`config.dense_impl`;
    model.run_layers). "gmm" reads each stack at the layer in place (`AtLayer.matmul`); "xla" lets XLA slice
    the layer out of the stack (a copy of every dense weight each layer on GPUs: benchmarks/scan_copies.py). "auto"
    is "gmm" where `resolve_impl("auto")` picks the Pallas kernel for the experts (GPUs, after its first-use
    self-check), else "xla"."""
    if impl not in DENSE_IMPLS:
        raise ValueError(f"unknown dense impl {impl!r}; expected one of {DENSE_IMPLS}")
    if impl == "auto":
        return "gmm" if resolve_impl("auto", *placed) == "pallas" else "xla"
    return impl


def resolve_strategy(strategy: str, tokens_per_data_shard: int, ep: int, a2a_min_tokens: int) -> str:
    """The expert-parallel strategy for `strategy` ("auto" -> by token count)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown moe strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "auto":
        return "all_to_all" if ep > 1 and tokens_per_data_shard >= a2a_min_tokens else "replicated"
    return strategy


def route(
    logits: jax.Array,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] -> (expert ids [N, k] int32, weights [N, k] float32).

    Softmax over all experts comes first. With n_group > 1 each group is scored by the sum of its two largest
    probabilities (as transformers), only the best `topk_group` groups stay eligible, and the top-k experts are taken
    among them. Weights are the unmasked probabilities of the picks, renormalised when `norm_topk_prob`.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    ids = _select(probs, top_k, n_group, topk_group)
    return ids, _gate_weights(probs, ids, norm_topk_prob, routed_scaling_factor)


def replay_route(
    logits: jax.Array,
    forced_ids: jax.Array | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Routing replay: router logits [N, E] and recorded expert ids [N, k] -> (ids used [N, k], their weights
    [N, k] float32, the router's own top-k ids [N, k]).

    The definition of Megatron-LM's routing replay (`moe_enable_routing_replay`, NVIDIA/Megatron-LM#2101, as verl's
    and NeMo RL's "rollout routing replay" R3 use it, arXiv:2510.11370): only the discrete selection is replayed.
    The softmax over all experts is recomputed from this forward's own router logits, the weights are those
    probabilities gathered at the replayed ids and renormalised and scaled exactly as `route` does, so gradients
    flow through the weights into the router's input (and the router, where it is trained). A row whose ids
    hold a negative entry (not recorded: -1) keeps its own top-k, as do all rows with forced_ids None. The own
    top-k comes back too, so a caller can measure how often the router would have chosen differently."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    own = _select(probs, top_k, n_group, topk_group)
    ids = own
    if forced_ids is not None:
        forced = jnp.asarray(forced_ids, jnp.int32).reshape(own.shape)
        ids = jnp.where(jnp.all(forced >= 0, axis=-1, keepdims=True), forced, own)
    return ids, _gate_weights(probs, ids, norm_topk_prob, routed_scaling_factor), own


def _select(probs: jax.Array, top_k: int, n_group: int, topk_group: int) -> jax.Array:
    """The top-k experts [N, k] int32 of probabilities [N, E], among the best `topk_group` groups (`route`)."""
    n, e = probs.shape
    choice = probs
    if n_group > 1:
        grouped = probs.reshape(n, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, keep = jax.lax.top_k(group_scores, topk_group)  # [N, topk_group]
        group_mask = jnp.zeros((n, n_group), jnp.bool_).at[jnp.arange(n)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), probs, 0.0)
    _, ids = jax.lax.top_k(choice, top_k)
    return ids.astype(jnp.int32)


def _gate_weights(probs: jax.Array, ids: jax.Array, norm_topk_prob: bool, scale: float) -> jax.Array:
    """The unmasked probabilities of the picks, renormalised when `norm_topk_prob`, times `scale`."""
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * scale


# ----------------------------------------------------------------------------------------------------------------------
# Sort-based dropless dispatch.
class Dispatch(NamedTuple):
    """Token-expert pairs sorted by expert: sorted row r holds pair order[r] (pair p = token p // k, slot p % k)."""

    order: jax.Array  # [P] int32
    inverse: jax.Array  # [P] int32, argsort(order): the sorted row of pair p
    group_sizes: jax.Array  # [E] int32, rows per expert
    sorted_ids: jax.Array  # [P] int32, the expert of each sorted row


def sort_by_expert(expert_ids: jax.Array, num_experts: int) -> Dispatch:
    """Stable sort of the flattened [N, k] expert ids (ids >= num_experts sort last and count in no group)."""
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return Dispatch(order, inverse, group_sizes, flat[order])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    """rows[r] = x[order[r] // k]: the token rows in expert order [N*k, H]. Backward: a gather and a sum over k."""
    return x[order // k]


def _permute_fwd(x, order, inverse, k):
    return x[order // k], (order, inverse)


def _permute_bwd(k, residuals, d_rows):
    order, inverse = residuals
    dx = d_rows[inverse].astype(jnp.float32).reshape(inverse.shape[0] // k, k, -1).sum(1)
    return dx.astype(d_rows.dtype), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute(y: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """out[p] = y[inverse[p]]: sorted rows back to pair order. Backward: the gather by `order`."""
    return y[inverse]


def _unpermute_fwd(y, order, inverse):
    return y[inverse], (order, inverse)


def _unpermute_bwd(residuals, d_out):
    order, _ = residuals
    return d_out[order], None, None


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def _combine(y_pairs: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_k w_k y_k in float32: y_pairs [N*k, H], weights [N, k] -> [N, H]."""
    n, k = weights.shape
    y = y_pairs.reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("nkh,nk->nh", y, weights.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------------------
# The fused expert MLP over sorted rows.
def expert_mlp(
    rows: jax.Array,
    group_sizes: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    impl: str = "ragged_dot",
    lora: ExpertLoRA | None = None,
    group_offset=None,
    tensor_axis: str | None = None,
    out_dtype=None,
) -> jax.Array:
    """down_e(act(rows gate_e) * (rows up_e)) for rows [M, H] sorted by expert -> [M, H] (out_dtype, default rows').

    gate_up [G, H, 2F'] and down [G, F', H] hold the window of G experts from `group_offset` (all of them when None);
    rows outside the window, and rows past sum(group_sizes), come out zero. With `tensor_axis` (inside shard_map,
    tp > 1) gate_up holds this shard's slice of the [gate | up] columns and down its F/tp rows; the result is then
    this shard's partial sum over F.
    """
    backend = _GMM_BACKEND[impl]

    def gmm(lhs, rhs, dtype=None):
        if isinstance(rhs, AtLayer):  # a frozen stack read at the layer in place (module docstring of AtLayer)
            return kernels.gmm(lhs, rhs.stack, group_sizes, group_offset, layer=rhs.index, backend=backend,
                               preferred_element_type=dtype)
        return kernels.gmm(lhs, rhs, group_sizes, group_offset, backend=backend, preferred_element_type=dtype)

    per_pair = lora is not None and jnp.ndim(lora.scale) == 2  # multi-LoRA: a scale mask [M, S*R] per row

    def low_rank(x, a, b, dtype=None):
        if per_pair:
            return gmm(gmm(x, a) * lora.scale.astype(x.dtype), b, dtype)
        return lora.scale * gmm(gmm(x, a), b, dtype)

    h = gmm(rows, gate_up)
    if lora is not None:
        h = h + low_rank(rows, lora.gate_up_a, lora.gate_up_b)
    if tensor_axis is None:
        f = h.shape[-1] // 2
        gate, up = h[:, :f], h[:, f:]
    else:
        gate, up = _gate_up_columns(h, tensor_axis)
    a = act(gate) * up
    y = gmm(a, down, out_dtype)
    if lora is not None:
        y = y + low_rank(a, lora.down_a, lora.down_b, out_dtype)
    return y


def _gate_up_columns(h: jax.Array, tensor_axis: str) -> tuple[jax.Array, jax.Array]:
    """This tensor shard's gate and up columns from its slice of [gate | up] (an all-gather over `tensor_axis`)."""
    full = jax.lax.all_gather(h, tensor_axis, axis=1, tiled=True)  # [M, 2F]
    f = full.shape[1] // 2
    width = h.shape[1] // 2  # F / tp
    start = jax.lax.axis_index(tensor_axis) * width
    gate = jax.lax.dynamic_slice_in_dim(full, start, width, axis=1)
    up = jax.lax.dynamic_slice_in_dim(full, f + start, width, axis=1)
    return gate, up


# ----------------------------------------------------------------------------------------------------------------------
# The dispatch.
def routed_experts(
    x: jax.Array,
    expert_ids: jax.Array,
    expert_weights: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    impl: str = "auto",
    lora: ExpertLoRA | None = None,
    mesh=None,
    strategy: str = "auto",
    a2a_min_tokens: int = 512,
    gate_up_blocks: int = 1,
    shared=None,
) -> jax.Array:
    """Mixture of routed SwiGLU experts.

    x [N, H]; expert_ids, expert_weights [N, k]; gate_up [E, H, 2F] (gate columns first, then up); down [E, F, H],
    each a float array or a `quant.QArray` (quantised values + scales, dequantised tile by tile by the kernel), or
    an `AtLayer` of such stacks (read in place by the "pallas" kernel, sliced for every other impl).
    Returns sum_k w_k * down_e(act(x gate_e) * (x up_e)) as [N, H] in x.dtype. With `lora`, each expert's weights
    are W_e + scale * A_e B_e, computed as extra grouped matmuls over the same sorted rows (never merged).
    With `mesh` (a mesh with an `expert` axis, or "auto": the one gate_up lives on, `sharding.mesh_of`) the experts
    run expert-parallel with `strategy` (module docstring); the result equals one device's.

    gate_up_blocks: the column order of gate_up (`interleave_gate_up`): 1 is [gate | up]; tp is tp blocks
    [gate_t | up_t], so that each `tensor` shard of a tensor-parallel layout holds the gate and up columns of its F / tp
    and needs no all-gather; it must equal the layout's tp. shared: the shared expert(s) (an `MLP` module) whose
    output is added: on a tensor-parallel layout inside the same shard_map, so routed and shared partial sums
    take one reduction (`_replicated_body`); otherwise `shared(x)` is added after.
    """
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be a Mesh, 'auto' or None; got {mesh!r}")
        mesh = mesh_of(_placed(gate_up))
    requested = impl
    placed = _placed(gate_up)
    impl = impl if impl == "tiled" else resolve_impl(impl, mesh, placed, x)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown moe strategy {strategy!r}; expected one of {STRATEGIES}")
    layout = None
    if mesh is not None and strategy != "none":
        layout = moe_layout(mesh, gate_up.shape[0], down.shape[1])
    if gate_up_blocks > 1 and (layout is None or layout.tp != gate_up_blocks):
        raise ValueError(f"gate_up holds {gate_up_blocks} interleaved [gate | up] blocks (interleave_gate_up) but "
                         f"this call runs the experts at tensor parallelism "
                         f"{1 if layout is None else layout.tp}; run it on the mesh it was interleaved for")
    if layout is None and shared is not None:
        y = routed_experts(x, expert_ids, expert_weights, gate_up, down, act=act, impl=requested, lora=lora,
                           mesh=mesh, strategy=strategy, a2a_min_tokens=a2a_min_tokens)
        return y + shared(x)
    if impl == "tiled" and (layout is not None or lora is not None):
        raise ValueError("moe impl 'tiled' runs on one device without LoRA adapters; use 'auto' or 'ragged_dot'")
    if lora is not None and jnp.ndim(lora.scale) == 2:
        # multi-LoRA (small4_jax/lora/multi.py): the per-row scale mask [B, S*R] -> per token [N, S*R]; below, per
        # routed pair in expert order (travelling with its row through an expert-parallel exchange), so each pair's
        # grouped matmuls use its own token's adapter
        lora = lora._replace(scale=jnp.repeat(lora.scale, x.shape[0] // lora.scale.shape[0], axis=0))
    if layout is None:
        if requested == "auto" and lora is None and platform.platform_of(placed, x) == "cpu":
            impl = "tiled"  # module docstring: the fastest measured on a CPU from one token to 1024
        if impl == "tiled":  # reads an AtLayer stack one expert at a time (`_expert_weight`)
            return _tiled_experts(x, expert_ids, expert_weights, gate_up, down, act)
        if impl != "pallas":
            gate_up, down = sliced(gate_up), sliced(down)
        if impl == "dense":
            return _dense_experts(x, expert_ids, expert_weights, gate_up, down, act, lora)
        d = sort_by_expert(expert_ids, gate_up.shape[0])
        rows = permute(x, d.order, d.inverse, expert_ids.shape[1])
        if lora is not None and jnp.ndim(lora.scale) == 2:
            lora = lora._replace(scale=permute(lora.scale, d.order, d.inverse, expert_ids.shape[1]))
        y = expert_mlp(rows, d.group_sizes, gate_up, down, act=act, impl=impl, lora=lora)
        return _combine(unpermute(y, d.order, d.inverse), expert_weights).astype(x.dtype)
    strategy = resolve_strategy(strategy, x.shape[0] // layout.data, layout.ep, a2a_min_tokens)
    if impl != "pallas":
        gate_up, down = sliced(gate_up), sliced(down)
    fused = shared if layout.tp > 1 and shared is not None and _fusable(shared) else None
    all_to_all = strategy == "all_to_all" and layout.expert_axis is not None
    y = _expert_parallel(x, expert_ids, expert_weights, gate_up, down, layout=layout, all_to_all=all_to_all, act=act,
                         impl=impl, lora=lora, interleaved=gate_up_blocks > 1, shared=fused)
    if shared is not None and fused is None:
        y = y + shared(x)
    return y


def interleave_gate_up(w, blocks: int, inverse: bool = False):
    """gate_up's last axis [gate | up] (2F columns) reordered into `blocks` blocks [gate_t | up_t] of F / blocks
    columns each (inverse=True: back). A tensor-parallel layout with tp = blocks then gives every shard the gate and
    up columns of the same F / tp (`routed_experts(gate_up_blocks=...)`): no all-gather of the gate_up output.
    `w` is an array or a QArray (per-column scale grids follow their columns; per-expert ones have one column)."""
    if isinstance(w, QArray):
        return QArray(interleave_gate_up(w.values, blocks, inverse),
                      w.scale if w.scale.shape[-1] == 1 else interleave_gate_up(w.scale, blocks, inverse), w.act_scale)
    lead, n = w.shape[:-1], w.shape[-1]
    if inverse:
        return w.reshape(*lead, blocks, 2, n // (2 * blocks)).swapaxes(-3, -2).reshape(*lead, n)
    return w.reshape(*lead, 2, blocks, n // (2 * blocks)).swapaxes(-3, -2).reshape(*lead, n)


def _fusable(shared) -> bool:
    """Whether the shared expert module can run inside the tensor-parallel shard_map: its parameters are plain
    weights (no adapters) whose shardings follow `sharding.spec_for`."""
    return all(type(v) is nnx.Param and isinstance(v[...], jax.Array | jax.ShapeDtypeStruct)
               for _, v in nnx.to_flat_state(nnx.state(shared)))


def tile_rows(pairs: int, num_experts: int) -> int:
    """Rows per tile of `_tiled_experts`: the mean group size pairs / num_experts rounded up to a power of two,
    at most 128 (module docstring)."""
    mean = -(-pairs // num_experts)
    return min(1 << max(mean - 1, 0).bit_length(), 128)


def _expert_weight(w, e, dtype):
    """Expert `e`'s weight [K, N] in `dtype` (a quantised one dequantised from its values and scale grid; a W8A8
    one kept as its QArray for `_expert_dot`); of an AtLayer, expert e of the stack at its layer (one expert's
    slice: no copy of the layer's weights)."""
    if isinstance(w, AtLayer):
        q, i = w.stack, w.index
        if isinstance(q, QArray):
            return _expert_weight(QArray(*(None if a is None else a[i] for a in q)), e, dtype)
        return q[i, e].astype(dtype)
    if isinstance(w, QArray):
        scale = w.scale[e] if w.scale.ndim == w.values.ndim else w.scale
        if w.act_scale is not None:
            return QArray(w.values[e], scale, w.act_scale[e])
        return dequantize(QArray(w.values[e], scale), dtype)
    return w[e].astype(dtype)


def _expert_dot(lhs, w, e, dtype):
    """lhs @ expert e's weight in float32: the W8A8 product (`quant.w8a8_dot`) for fp8 weights with activation
    scales, else a dot with the (dequantised) weight."""
    w = _expert_weight(w, e, dtype)
    if isinstance(w, QArray):
        return w8a8_dot(lhs, w, jnp.float32)
    return jnp.dot(lhs, w, preferred_element_type=jnp.float32)


def _tiled_experts(x, expert_ids, expert_weights, gate_up, down, act, tile: int | None = None):
    """The routed experts by row tiles (module docstring): pairs sorted by expert, each expert's rows cut into tiles
    of `tile` rows (default `tile_rows`), one fused expert MLP per tile in an XLA loop; the routed work plus padding.

    The loop has a static bound of ceil(P / tile) + min(E, P) tiles (the most that sum over experts of
    ceil(rows_e / tile) can be); tiles past the real count are skipped by a cond. Every step is a gather, a matmul
    or a cond, so it is differentiable, and the tiles' outputs are stacked rather than scattered into a carry, so
    reverse mode keeps one tile's residuals per step.
    """
    n, k = expert_ids.shape
    pairs, num_experts, width = n * k, gate_up.shape[0], x.shape[1]
    tile = tile or tile_rows(pairs, num_experts)
    d = sort_by_expert(expert_ids, num_experts)
    sizes = d.group_sizes
    starts = jnp.cumsum(sizes) - sizes  # first sorted row of each expert
    counts = (sizes + tile - 1) // tile  # tiles of each expert
    tiles_end = jnp.cumsum(counts)
    tiles_start = tiles_end - counts
    bound = -(-pairs // tile) + min(num_experts, pairs)
    t = jnp.arange(bound, dtype=jnp.int32)
    tile_expert = jnp.minimum(jnp.searchsorted(tiles_end, t, side="right"), num_experts - 1).astype(jnp.int32)
    first_row = starts[tile_expert] + (t - tiles_start[tile_expert]) * tile
    rows = jnp.concatenate([x[d.order // k], jnp.zeros((tile, width), x.dtype)])  # a tile of zeros past the end
    tiles = rows[jnp.clip(first_row, 0, pairs)[:, None] + jnp.arange(tile, dtype=jnp.int32)]  # [bound, tile, H]

    def one_tile(args):
        lhs, e, used = args

        def mlp(lhs):
            h = _expert_dot(lhs, gate_up, e, x.dtype)
            f = h.shape[-1] // 2
            a = (act(h[:, :f]) * h[:, f:]).astype(x.dtype)
            return _expert_dot(a, down, e, x.dtype)

        return jax.lax.cond(used, mlp, lambda lhs: jnp.zeros((tile, width), jnp.float32), lhs)

    ys = jax.lax.map(one_tile, (tiles, tile_expert, t < tiles_end[-1]))  # [bound, tile, H] float32
    # Sorted row r of expert e is row (r - starts[e]) % tile of tile tiles_start[e] + (r - starts[e]) // tile; rows
    # of no expert (ids >= E) read the zero row appended after the last tile.
    r = jnp.arange(pairs, dtype=jnp.int32)
    e = jnp.minimum(d.sorted_ids, num_experts - 1)
    within = r - starts[e]
    flat = jnp.where(d.sorted_ids < num_experts, (tiles_start[e] + within // tile) * tile + within % tile,
                     bound * tile)
    ys = jnp.concatenate([ys.reshape(bound * tile, width), jnp.zeros((1, width), jnp.float32)])
    return _combine(ys[flat[d.inverse]], expert_weights).astype(x.dtype)


def _dense_experts(x, expert_ids, expert_weights, gate_up, down, act, lora=None):
    """Every expert on every token, combined by one-hot routing weights: O(E) work, for reference."""
    num_experts = gate_up.shape[0]
    w8a8 = isinstance(gate_up, QArray) and gate_up.act_scale is not None
    if w8a8 and lora is not None:
        raise ValueError("moe impl 'dense' (a reference) takes no LoRA adapters over W8A8 experts")
    if isinstance(gate_up, QArray) and not w8a8:  # dequantise-then-compute: the definition the kernels meet
        gate_up, down = dequantize(gate_up, jnp.float32), dequantize(down, jnp.float32)
    per_token = lora is not None and jnp.ndim(lora.scale) == 2  # multi-LoRA: each token's own adapter, unmerged
    if lora is not None and not per_token:  # merged weights: fine for a reference
        gate_up = gate_up + lora.scale * jnp.einsum("ehr,erf->ehf", lora.gate_up_a, lora.gate_up_b)
        down = down + lora.scale * jnp.einsum("efr,erh->efh", lora.down_a, lora.down_b)
    combine = jnp.einsum(
        "nke,nk->ne", jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), expert_weights.astype(jnp.float32)
    )
    h = _dense_w8a8(x, gate_up) if w8a8 else jnp.einsum("nh,ehf->enf", x, gate_up.astype(x.dtype))
    if per_token:
        m = lora.scale.astype(x.dtype)[None]  # [1, N, S*R]
        low = jnp.einsum("nh,ehj->enj", x, lora.gate_up_a.astype(x.dtype)) * m
        h = h + jnp.einsum("enj,ejf->enf", low, lora.gate_up_b.astype(x.dtype))
    f = h.shape[-1] // 2
    a = act(h[..., :f]) * h[..., f:]
    y = _dense_w8a8(a.astype(x.dtype), down) if w8a8 else jnp.einsum("enf,efh->enh", a, down.astype(x.dtype))
    if per_token:
        low = jnp.einsum("enf,efj->enj", a, lora.down_a.astype(x.dtype)) * m
        y = y + jnp.einsum("enj,ejh->enh", low, lora.down_b.astype(x.dtype))
    return jnp.einsum("enh,ne->nh", y.astype(jnp.float32), combine).astype(x.dtype)


def _dense_w8a8(x, q: QArray):
    """Every expert's W8A8 product on every row: x [N, K] (or [E, N, K], one input per expert) quantised with each
    expert's activation scale, times its fp8 values, scaled -> [E, N, N'] float32 (the reference's definition)."""
    s_x = q.act_scale.astype(jnp.float32)  # [E, 1, 1]
    xq = quantize_act(x, s_x).astype(jnp.float32)  # [E, N, K]
    y = jnp.einsum("enk,ekf->enf", xq, q.values.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y * s_x * column_scale(q).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Expert parallelism.
def _expert_parallel(x, expert_ids, expert_weights, gate_up, down, *, layout: MoELayout, all_to_all: bool, act,
                     impl, lora, interleaved: bool = False, shared=None):
    n = x.shape[0]
    shards = layout.token_shards(all_to_all)
    pad = -n % shards
    token_scale = None  # multi-LoRA: each token's adapter mask [N, S*R], an input sharded as the tokens are
    if lora is not None and jnp.ndim(lora.scale) == 2:
        token_scale, lora = lora.scale, lora._replace(scale=PER_TOKEN)
    if pad:  # padding tokens: routed anywhere with weight 0, sliced off below
        x = jnp.pad(x, ((0, pad), (0, 0)))
        expert_ids = jnp.pad(expert_ids, ((0, pad), (0, 0)))
        expert_weights = jnp.pad(expert_weights, ((0, pad), (0, 0)))
        token_scale = None if token_scale is None else jnp.pad(token_scale, ((0, pad), (0, 0)))
    lora_arrays = None if lora is None else tuple(lora[:4])
    weight_specs = (_weight_spec(layout.gate_up_spec, gate_up), _weight_spec(layout.down_spec, down))
    shared_graph, shared_leaves, shared_specs = None, None, None
    if shared is not None:  # the shared expert's weights enter as the rules place them (`sharding.spec_for`)
        shared_graph, state = nnx.split(shared)
        flat = nnx.to_flat_state(state)
        shared_leaves = tuple(v[...] for _, v in flat)
        shared_specs = tuple(spec_for(p, a.shape, layout.mesh) for (p, _), a in zip(flat, shared_leaves))
        shared_graph = (shared_graph, tuple(p for p, _ in flat))
    key = (layout, all_to_all, gate_up.shape[0], act, impl, None if lora is None else lora.scale, weight_specs,
           interleaved, shared_graph, shared_specs)
    try:
        fn = _expert_parallel_fn(*key)
    except TypeError:  # an unhashable key (e.g. an array LoRA scale): build it uncached
        fn = _expert_parallel_fn.__wrapped__(*key)
    out = fn(x, expert_ids, expert_weights, gate_up, down, lora_arrays, token_scale, shared_leaves)
    return out[:n] if pad else out


def _weight_spec(spec, w):
    """The shard_map spec of an expert weight: its layout spec, or for a QArray that spec for the values and the
    matching scale spec (quantised weights and their scales are sharded together, `sharding.scale_spec`)."""
    if isinstance(w, AtLayer):  # the stack: no layer axis sharding; the index replicated
        return AtLayer(_weight_spec(jax.sharding.PartitionSpec(None, *spec), w.stack), jax.sharding.PartitionSpec())
    if not isinstance(w, QArray):
        return spec
    act = None if w.act_scale is None else scale_spec(spec, w.act_scale.shape)  # W8A8: per expert, with its expert
    return QArray(spec, scale_spec(spec, w.scale.shape), act)


PER_TOKEN = "per_token"  # the static LoRA scale of the expert-parallel bodies when each token has its own mask


@functools.lru_cache(maxsize=256)
def _expert_parallel_fn(layout: MoELayout, all_to_all: bool, num_experts: int, act, impl: str, lora_scale,
                        weight_specs=None, interleaved: bool = False, shared_graph=None, shared_specs=None):
    """The jitted shard_map of one configuration, cached so that eager calls do not retrace and recompile."""
    tokens = layout.token_spec(all_to_all)
    lora_specs = None if lora_scale is None else layout.lora_specs
    body = functools.partial(_all_to_all_body if all_to_all else _replicated_body, layout=layout,
                             num_experts=num_experts, act=act, impl=impl, lora_scale=lora_scale,
                             interleaved=interleaved, shared_graph=shared_graph)
    # check_vma=False: a pallas_call inside shard_map does not type-check under varying-manual-axes checking (jax
    # 0.10/0.11); gradients through psum / all_gather / all_to_all stay correct (tests compare with one device).
    return jax.jit(jax.shard_map(
        body,
        mesh=layout.mesh,
        in_specs=(tokens, tokens, tokens, *(weight_specs or (layout.gate_up_spec, layout.down_spec)), lora_specs,
                  tokens if isinstance(lora_scale, str) else None, shared_specs),
        out_specs=tokens,
        check_vma=False,
    ))


def _local_lora(lora_arrays, scale, pair_scale=None):
    """The shard's ExpertLoRA: its adapters with the static scale, or (multi-LoRA) each sorted row's mask."""
    if lora_arrays is None:
        return None
    return ExpertLoRA(*lora_arrays, scale if pair_scale is None else pair_scale)


def _replicated_body(x, expert_ids, expert_weights, gate_up, down, lora_arrays, token_scale, shared_leaves, *,
                     layout: MoELayout, num_experts, act, impl, lora_scale, interleaved=False, shared_graph=None):
    """All tokens of this expert group (gathered over `expert`: they arrive split as the attention holds them);
    this shard's experts on their rows (zero elsewhere); a reduce-scatter over `expert` sums the partial outputs
    and hands each shard its own tokens back (and a psum over `tensor` the tensor-parallel parts). With the shared
    expert (`shared_graph`: tensor-parallel layouts), its partial sum over this shard's F / tp for the shard's own
    tokens joins the routed one before that psum: one reduction over `tensor` for both."""
    local = gate_up.shape[0]
    own = x
    if layout.expert_axis is not None:
        offset = jax.lax.axis_index(layout.expert_axis) * local
        gather = functools.partial(jax.lax.all_gather, axis_name=layout.expert_axis, tiled=True)
        x, expert_ids, expert_weights = gather(x), gather(expert_ids), gather(expert_weights)
        token_scale = None if token_scale is None else gather(token_scale)
    else:
        offset = 0
    d = sort_by_expert(expert_ids, num_experts)
    rows = permute(x, d.order, d.inverse, expert_ids.shape[1])
    pair_scale = None if token_scale is None else permute(token_scale, d.order, d.inverse, expert_ids.shape[1])
    tensor_axis = layout.tensor_axis if layout.tp > 1 and not interleaved else None
    y = expert_mlp(rows, d.group_sizes, gate_up, down, act=act, impl=impl,
                   lora=_local_lora(lora_arrays, lora_scale, pair_scale),
                   group_offset=offset, tensor_axis=tensor_axis, out_dtype=jnp.float32)
    out = _combine(unpermute(y, d.order, d.inverse), expert_weights)
    if layout.expert_axis is not None:
        out = jax.lax.psum_scatter(out, layout.expert_axis, scatter_dimension=0, tiled=True)
    out = out + _shared_partial(shared_graph, shared_leaves, own)
    if layout.tp > 1:
        out = jax.lax.psum(out, layout.tensor_axis)
    return out.astype(own.dtype)


def _exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis) - a


def _all_to_all_body(x, expert_ids, expert_weights, gate_up, down, lora_arrays, token_scale, shared_leaves, *,
                     layout: MoELayout, num_experts, act, impl, lora_scale, interleaved=False, shared_graph=None):
    """This shard's tokens: rows go to their experts' shards (ragged all-to-all), run there, and come back (the
    shared expert as in `_replicated_body`)."""
    axis = layout.expert_axis
    n, k = expert_ids.shape
    ep, local = layout.ep, gate_up.shape[0]
    me = jax.lax.axis_index(axis)
    pairs = n * k
    d = sort_by_expert(expert_ids, num_experts)
    rows = permute(x, d.order, d.inverse, k)  # [P, H], sorted by expert, hence by destination shard

    # Who sends what to whom: group sizes of every shard of this expert group, [ep (source), E].
    all_sizes = jax.lax.all_gather(d.group_sizes, axis)
    by_dest = all_sizes.reshape(ep, ep, local)  # [source, destination, local expert]
    sizes = by_dest.sum(-1)  # [source, destination] rows
    send_sizes = sizes[me]
    input_offsets = _exclusive_cumsum(send_sizes)
    output_offsets = _exclusive_cumsum(sizes, axis=0)[me]  # where my slice lands on each destination
    recv_sizes = sizes[:, me]
    recv_offsets = _exclusive_cumsum(recv_sizes)

    capacity = ep * pairs  # dropless: every row of the expert group could land here
    exchange = jax.lax.ragged_all_to_all if platform.on_gpu(layout.mesh, x) else _ragged_all_to_all_dense
    recv = exchange(rows, jnp.zeros((capacity, x.shape[1]), x.dtype), input_offsets, send_sizes, output_offsets,
                    recv_sizes, axis_name=axis)
    recv_scale = None
    if token_scale is not None:  # multi-LoRA: each row's adapter mask goes along with it
        pair_scale = permute(token_scale, d.order, d.inverse, k)
        recv_scale = exchange(pair_scale, jnp.zeros((capacity, pair_scale.shape[1]), pair_scale.dtype),
                              input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis)

    # Expert of every received row: source s's slice holds its rows for my experts, sorted, by_dest[s, me] of each.
    counts = by_dest[:, me, :]  # [source, local expert]
    r = jnp.arange(capacity, dtype=jnp.int32)
    source = jnp.clip(jnp.searchsorted(recv_offsets + recv_sizes, r, side="right"), 0, ep - 1)
    within = r - recv_offsets[source]
    recv_ids = jnp.sum(within[:, None] >= jnp.cumsum(counts, axis=1)[source], axis=1).astype(jnp.int32)
    recv_ids = jnp.where(r < recv_offsets[-1] + recv_sizes[-1], recv_ids, local)  # unused rows: past every group
    d2 = sort_by_expert(recv_ids[:, None], local + 1)
    tensor_axis = layout.tensor_axis if layout.tp > 1 and not interleaved else None
    pair_scale = None if recv_scale is None else permute(recv_scale, d2.order, d2.inverse, 1)
    y = expert_mlp(permute(recv, d2.order, d2.inverse, 1), d2.group_sizes[:local], gate_up, down, act=act, impl=impl,
                   lora=_local_lora(lora_arrays, lora_scale, pair_scale), tensor_axis=tensor_axis,
                   out_dtype=jnp.float32)
    y = unpermute(y, d2.order, d2.inverse)  # back to arrival order

    back_offsets = _exclusive_cumsum(sizes, axis=1)[:, me]  # where each source keeps its rows for me
    y = exchange(y, jnp.zeros((pairs, y.shape[1]), y.dtype), recv_offsets, recv_sizes, back_offsets, send_sizes,
                 axis_name=axis)
    out = _combine(unpermute(y, d.order, d.inverse), expert_weights) + _shared_partial(shared_graph, shared_leaves, x)
    if layout.tp > 1:
        out = jax.lax.psum(out, layout.tensor_axis)
    return out.astype(x.dtype)


def _shared_partial(shared_graph, shared_leaves, x):
    """The shared expert on this shard's tokens x, float32: a partial sum over its F / tp (0 without it)."""
    if shared_graph is None:
        return 0.0
    graph, paths = shared_graph
    module = nnx.merge(graph, nnx.from_flat_state(list(zip(paths, (nnx.Param(a) for a in shared_leaves)))))
    return module(x).astype(jnp.float32)


def _ragged_all_to_all_dense(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` (one slice per peer) from a padded dense `all_to_all`, for platforms without it.

    Each slice is padded to the operand's length, so the buffer exchanged is axis_size times the operand.
    """
    cap = operand.shape[0]
    peers = input_offsets.shape[0]
    pos = jnp.arange(cap, dtype=jnp.int32)
    send = operand[jnp.clip(input_offsets[:, None] + pos[None, :], 0, cap - 1)]  # [peers, cap, ...]
    valid = pos[None, :] < send_sizes[:, None]
    send = jnp.where(valid.reshape(valid.shape + (1,) * (operand.ndim - 1)), send, 0)
    recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # recv[i]: the slice peer i sent me
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where peer i's slice goes here
    r = jnp.arange(output.shape[0], dtype=jnp.int32)
    inside = (r[None, :] >= offsets[:, None]) & (r[None, :] < (offsets + recv_sizes)[:, None])  # [peers, rows]
    source = jnp.argmax(inside, axis=0)
    row = jnp.clip(r - offsets[source], 0, cap - 1)
    vals = recv.reshape((peers * cap,) + operand.shape[1:])[source * cap + row]
    hit = inside.any(0).reshape((-1,) + (1,) * (operand.ndim - 1))
    return jnp.where(hit, vals, output)
