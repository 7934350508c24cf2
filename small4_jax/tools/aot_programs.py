"""The GPU programs users run, built as abstract programs for `aot.compile_for` on compile-only GPU meshes.

One builder per program, shared by the compile tests (`tests/test_gpu_compile.py`: every program compiles for sm_90a,
at real dims) and the deployment planner (`small4_jax/plan.py`: per-device memory and work of a deployment):

    gmm_vjp          the grouped matmul, forward and gradients (gmm, its transposed-rhs twin, tgmm)
    expert_parallel  the routed experts on an expert mesh (replicated or all-to-all), forward or with gradients
    model_forward    the model's forward over a batch of tokens
    serve_step       the serving engine's model step (`paged.logits_step`): a prefill chunk or a decode step
    vision_encode    the vision encoder + projector on images packed as the engine packs them (`vision.encode_packed`)
    lora_train_step  the fine-tuning step of `train.trainer.make_steps` (grad accumulation scan, AdamW)
    grpo_steps       GRPO's two trainer programs (`train.grpo.make_steps`): the rollouts' log-probs and the update
    dpo_update_step  DPO's step (`train.dpo.make_update`): policy and adapter-off reference forwards, AdamW

Arguments are `jax.ShapeDtypeStruct`s placed the way the real code places them (weights by `sharding.spec_for`,
adapters by `lora.lora_spec`, multi-LoRA slots by `multi.slot_spec`, the paged cache and engine inputs replicated
or split over the batch axes as the engine splits them). Nothing here allocates a weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from small4_jax import kernels
from small4_jax.lora import adapters as lora
from small4_jax.lora.multi import AdapterIds, MultiLoRA, MultiLoRAParam, slot_spec
from small4_jax.nn import moe
from small4_jax.nn.model import Small4ForCausalLM, abstract_model, shard_latent_projections
from small4_jax.nn.qlinear import quantize_model
from small4_jax.nn.paged import PagedCache, cache_spec, default_cache_axes, logits_step
from small4_jax.nn.vision import encode_packed, pack_images
from small4_jax.parallel.sharding import batch_spec, spec_for
from small4_jax.quant import formats as quant
from small4_jax.tools import aot
from train import dpo, grpo, loop, trainer


@dataclasses.dataclass
class Program:
    """A function and its abstract arguments on `mesh`; `compile()` compiles it for the mesh's GPUs."""

    name: str
    fn: Callable
    args: tuple
    mesh: Mesh
    jit_kwargs: dict = dataclasses.field(default_factory=dict)

    def compile(self, compiler_options: dict | None = None) -> aot.Compiled:
        """`compiler_options`: XLA debug options for this compile only (`aot.compile_for`)."""
        return aot.compile_for(self.fn, *self.args, mesh=self.mesh, compiler_options=compiler_options,
                               **self.jit_kwargs)


def _replicated(tree, mesh: Mesh):
    """Abstract copies of the leaves of `tree` (arrays or ShapeDtypeStructs), replicated over `mesh`."""
    return jax.tree.map(lambda x: aot.spec(x.shape, x.dtype, mesh), tree)


# ----------------------------------------------------------------------------------------------------------------------
# Kernels.
def gmm_vjp(mesh: Mesh, rows: int, *, groups: int = 128, k: int = 4096, n: int = 4096, dtype=jnp.bfloat16,
            transpose_rhs: bool = False, grad: bool = True, tiling=None) -> Program:
    """sum(gmm(x, w)) and its gradients in x and w: gmm on the given rhs layout, gmm on the other layout (dlhs) and
    tgmm (dw). Row groups are uneven at run time; shapes are what the compiler sees."""
    def loss(x, w, sizes):
        y = kernels.gmm(x, w, sizes, transpose_rhs=transpose_rhs, backend="pallas", tiling=tiling)
        return jnp.sum(y.astype(jnp.float32))

    fn = jax.value_and_grad(loss, argnums=(0, 1)) if grad else loss
    w_shape = (groups, n, k) if transpose_rhs else (groups, k, n)
    args = (aot.spec((rows, k), dtype, mesh), aot.spec(w_shape, dtype, mesh), aot.spec((groups,), jnp.int32, mesh))
    layout = "[G, N, K]" if transpose_rhs else "[G, K, N]"
    return Program(f"gmm{' VJP' if grad else ''} {rows}x{k} @ {layout} {jnp.dtype(dtype).name}", fn, args, mesh)


def expert_parallel(mesh: Mesh, tokens: int, *, strategy: str, grad: bool, experts: int = 128, hidden: int = 4096,
                    intermediate: int = 2048, top_k: int = 4, dtype=jnp.bfloat16, impl: str = "auto") -> Program:
    """`moe.routed_experts` on `mesh` (axes data / expert / tensor) with `strategy`; with `grad`, the gradients in
    the tokens and both expert weights (the full-training backward: gmm, transposed gmm and tgmm in the shard_map)."""
    def run(x, ids, weights, gate_up, down):
        y = moe.routed_experts(x, ids, weights, gate_up, down, impl=impl, mesh=mesh, strategy=strategy)
        return jnp.sum(y.astype(jnp.float32))

    fn = jax.value_and_grad(run, argnums=(0, 3, 4)) if grad else run
    gu_shape, down_shape = (experts, hidden, 2 * intermediate), (experts, intermediate, hidden)
    path_gu, path_down = ("experts", "gate_up"), ("experts", "down")
    args = (aot.spec((tokens, hidden), dtype, mesh), aot.spec((tokens, top_k), jnp.int32, mesh),
            aot.spec((tokens, top_k), jnp.float32, mesh),
            aot.spec(gu_shape, dtype, mesh, spec_for(path_gu, gu_shape, mesh)),
            aot.spec(down_shape, dtype, mesh, spec_for(path_down, down_shape, mesh)))
    return Program(f"experts {strategy}{' +grad' if grad else ''} {tokens} tokens", fn, args, mesh)


def gmm_quant(mesh: Mesh, rows: int, fmt: str, *, groups: int = 128, k: int = 4096, n: int = 4096,
              dtype=jnp.bfloat16, grad: bool = False, tiling=None, w8a8: bool = False) -> Program:
    """gmm over quantised experts (`quant.QArray` [groups, k, n] in `fmt`: the in-kernel dequantising kernel); with
    `grad`, also the input gradient (dy @ W^T from the same bytes: QLoRA's backward through the frozen base). With
    `w8a8` (fp8 only, no grad): the fp8 x fp8 kernel, with the experts' static activation scales [groups, 1, 1]."""
    def loss(x, values, scale, sizes, *act):
        y = kernels.gmm(x, quant.QArray(values, scale, *act), sizes, backend="pallas", tiling=tiling)
        return jnp.sum(y.astype(jnp.float32))

    fn = jax.value_and_grad(loss) if grad else loss
    vshape, sshape, vdtype = quant.stored_shapes((groups, k, n), fmt)
    args = (aot.spec((rows, k), dtype, mesh), aot.spec(vshape, vdtype, mesh),
            aot.spec(sshape, quant.scale_dtype(fmt), mesh), aot.spec((groups,), jnp.int32, mesh))
    if w8a8:
        args += (aot.spec((groups, 1, 1), jnp.float32, mesh),)
    kind = f"{fmt}{' W8A8' if w8a8 else ''}{' +dx' if grad else ''}"
    return Program(f"gmm {kind} {rows}x{k} @ [G, K, N]", fn, args, mesh)


# ----------------------------------------------------------------------------------------------------------------------
# The model.
def abstract_placed_model(config, mesh: Mesh, dtype="bfloat16", quantize: str | None = None,
                          scan_layers: bool = True, activations: str | None = None, tensor_interleave: bool = False,
                          shard_latent_proj: bool = False, lora_slots: tuple[int, int, int] | None = None):
    """(graphdef, state) of the model with every weight abstract and placed on `mesh` (`sharding.spec_for`, with the
    `shard_latent_proj` layout option), its
    linears and experts in `quantize`'s format (small4_jax.quant.formats) when given (with activations="fp8": W8A8, the
    static activation scales as parameters too); `scan_layers=False` unrolls the
    layer loop (model.run_layers; compile-time comparison). `lora_slots` (slots, rank, rows): the serving engine's
    multi-LoRA slots on every adaptable module (`multi.MultiLoRA`, slot 0 the base) in `dtype`, placed by
    `multi.slot_spec`, and the `rows` rows' adapter ids (replicated)."""
    if lora_slots is None:
        model = abstract_model(config, dtype=dtype, quantize=quantize, activations=activations)
    else:
        def build():
            m = quantize_model(Small4ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)), quantize,
                               activations=activations)
            MultiLoRA(m, lora_slots[0], lora_slots[1], dtype=dtype)
            return m

        model = nnx.eval_shape(build)
    model.scan_layers = scan_layers
    tp = dict(mesh.shape).get("tensor", 1)
    if tensor_interleave and tp > 1 and config.moe_intermediate_size % tp == 0:
        for stack in model.layer_stacks:  # the engine's column order (model.interleave_experts); shapes unchanged
            if getattr(stack.mlp, "experts", None) is not None:
                stack.mlp.experts.gate_up_blocks = tp
    if shard_latent_proj:
        shard_latent_projections(model)  # marked here, placed below
    graphdef, state = nnx.split(model)
    if lora_slots is None:
        return graphdef, aot.placed(state, mesh, shard_latent_proj=shard_latent_proj)
    slots = {path for path, _ in nnx.to_flat_state(nnx.state(model, MultiLoRAParam))}
    ids = {path for path, _ in nnx.to_flat_state(nnx.state(model, AdapterIds))}
    state = aot.placed(state, mesh, lambda path, shape, m: (
        slot_spec(path, shape, m) if tuple(path) in slots else P() if tuple(path) in ids else
        spec_for(path, shape, m, shard_latent_proj=shard_latent_proj)))
    flat = [(path, v.replace(aot.spec((lora_slots[2],), jnp.int32, mesh)) if path in ids else v)
            for path, v in nnx.to_flat_state(state)]  # the engine writes [rows] ids before each step (set_ids)
    return graphdef, nnx.from_flat_state(flat)


def model_forward(config, mesh: Mesh, tokens: int, *, batch: int = 1, dtype="bfloat16",
                  quantize: str | None = None, scan_layers: bool = True) -> Program:
    """Logits of `batch` sequences of `tokens` tokens (the prefill / scoring forward)."""
    graphdef, state = abstract_placed_model(config, mesh, dtype, quantize, scan_layers)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = aot.spec((batch, tokens), jnp.int32, mesh)
    return Program(f"forward {batch}x{tokens}", forward, (state, ids), mesh)


def serve_step(config, mesh: Mesh, *, absorbed: bool, rows: int, tokens: int, table_pages: int, num_pages: int,
               page_size: int = 16, dtype="bfloat16", cache_dtype=None, quantize: str | None = None,
               cache_axes: tuple[str, ...] | None = None, scan_layers: bool = True,
               activations: str | None = None, context_axes: tuple[str, ...] = (),
               tensor_interleave: bool = True, shard_latent_proj: bool = False,
               lora_slots: tuple[int, int] | None = None, record_routing: bool = False) -> Program:
    """The engine's model step (`paged.logits_step`, as `Engine._run` dispatches it; the sampler is a separate small
    program): decode ([rows, 1]) or one prefill chunk ([rows, tokens]), absorbed MLA over the pages as the engine
    runs both (absorbed=False: the expanded reference), over a page table `table_pages` wide; the paged cache
    [layers, num_pages, page_size, width] with its pages sharded over `cache_axes` and the rows with them (default:
    the engine's, `paged.default_cache_axes`: data-parallel attention; () replicates it) and donated. `scan_layers=False`
    unrolls the layers. context_axes: one sequence's pages split over these axes by position (decode context
    parallelism; the engine then shards no rows, so cache_axes defaults to ()): the page table holds each shard's
    columns in turn. On a mesh with a `tensor` axis the routed experts' gate_up is in the engine's interleaved order
    (`model.interleave_experts`) unless tensor_interleave=False. shard_latent_proj: the latent projections split over
    `tensor` (`sharding.spec_for`). lora_slots (slots, rank): the engine's multi-LoRA slots (`Engine(max_loras=slots
    - 1, max_lora_rank=rank)`: every adaptable module, the experts in their original order) and the rows' adapter
    ids. record_routing: the step also returns each token's routed expert ids (`Engine(record_routing=True)`)."""
    if cache_axes is None:  # the engine's default: pages and rows over the batch axes (data-parallel attention)
        cache_axes = default_cache_axes(mesh, rows, tuple(context_axes))
    graphdef, state = abstract_placed_model(config, mesh, dtype, quantize, scan_layers, activations,
                                            tensor_interleave=tensor_interleave and lora_slots is None,
                                            shard_latent_proj=shard_latent_proj,
                                            lora_slots=None if lora_slots is None else (*lora_slots, rows))
    cache_dtype = cache_dtype or dtype
    pages = jax.eval_shape(lambda: PagedCache.create(config, num_pages, page_size, cache_dtype).pages)

    extra = dict(record_routing=True) if record_routing else {}  # (a keyword only when on, as the engine passes it)

    def run(state, pages, ids, positions, seq_index, slots, page_table, logit_index):
        return logits_step(graphdef, state, pages, ids, positions, seq_index, slots, page_table, logit_index,
                           absorbed=absorbed, cache_axes=cache_axes, context_axes=context_axes, **extra)

    i32 = jnp.int32
    inputs = (jax.ShapeDtypeStruct((rows, tokens), i32), jax.ShapeDtypeStruct((rows, tokens), i32),
              jax.ShapeDtypeStruct((rows, tokens), i32), jax.ShapeDtypeStruct((rows, tokens, 2), i32),
              jax.ShapeDtypeStruct((rows, table_pages), i32), jax.ShapeDtypeStruct((rows,), i32))
    args = (state, _replicated(pages, mesh), *_replicated(inputs, mesh))
    if cache_axes or context_axes:
        batch = tuple(cache_axes) or None
        table = inputs[4]
        args = (state, aot.spec(pages.shape, pages.dtype, mesh, cache_spec(cache_axes, context_axes)),
                *(aot.spec(x.shape, x.dtype, mesh, P(batch, tuple(context_axes) or None) if x is table else P(batch))
                  for x in inputs))
    kind = ("decode" if tokens == 1 else "prefill") + (f" +{lora_slots[0] - 1} LoRA slot(s)" if lora_slots else "") \
        + (" +routing" if record_routing else "")
    return Program(f"serve {kind} {rows}x{tokens}, {table_pages} pages/seq", run, args, mesh,
                   dict(donate_argnums=(1,)))


def _abstract_trainer(cfg, mesh: Mesh):
    """The adapted model of a run config (nothing allocated) and its optimizer: (model, tx, schedule)."""
    def build():  # adapters attached while tracing: apply_lora reads the base weights' shapes through [...]
        m = Small4ForCausalLM(cfg.model, dtype=cfg.base.dtype, rngs=nnx.Rngs(0))
        lora.apply_lora(m, cfg.lora)
        return m

    model = nnx.eval_shape(build)
    trainer.configure(model, cfg)
    return model, trainer.optimizer(cfg), trainer.schedule(cfg)


def _placed_state(params, frozen, tx, mesh: Mesh):
    """(params, opt_state, frozen) on `mesh`: adapters by `lora.lora_spec` and AdamW's moments like them (the trainer's
    `tx.init` on the placed adapters: zeros_like keeps each one's sharding), the base by `spec_for`, the rest (the
    step count) replicated."""
    params = aot.placed(params, mesh, lora.lora_spec)
    frozen = aot.placed(frozen, mesh)
    like = jax.tree.structure(params)

    def place(sub):
        if jax.tree.structure(sub) == like:  # a moment: one leaf per adapter
            return jax.tree.map(lambda x, p: aot.spec(x.shape, x.dtype, mesh, p.sharding.spec), sub, params)
        return aot.spec(sub.shape, sub.dtype, mesh)

    opt_state = jax.tree.map(place, jax.eval_shape(tx.init, params),
                             is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct) or jax.tree.structure(x) == like)
    return params, opt_state, frozen


def _batch(mesh: Mesh, rows: int, shapes: dict, leading: int = 0) -> dict:
    """Abstract batch arrays {name: (shape, dtype)} split over the batch axes on their rows axis (after `leading`
    axes), as `trainer.put_batch` places a batch (`sharding.batch_spec`)."""
    bspec = batch_spec(mesh, rows, leading=leading)
    return {k: aot.spec(shape, dtype, mesh, bspec) for k, (shape, dtype) in shapes.items()}


def lora_train_step(run_config, mesh: Mesh, *, micro_batch: int | None = None, seq_len: int | None = None,
                    grad_accum: int | None = None) -> Program:
    """`train.trainer.make_steps(...).train` for a run config (e.g. configs/finetune-small4.yaml) on `mesh`: the
    frozen base placed by `sharding.spec_for`, adapters and AdamW state by `lora.lora_spec`, the batch
    [grad_accum, micro_batch, seq_len] split over the batch axes as `trainer.put_batch` does (`sharding.batch_spec`).
    Defaults: the config's."""
    cfg = run_config
    model, tx, sched = _abstract_trainer(cfg, mesh)
    steps = trainer.make_steps(model, tx, sched)
    _, params, rng, frozen = nnx.split(model, lora.TRAINABLE, lora.DropoutKey, ...)
    params, opt_state, frozen = _placed_state(params, frozen, tx, mesh)
    rng = _replicated(rng, mesh)

    accum = grad_accum or cfg.train.grad_accum
    micro = micro_batch or cfg.train.batch_size // cfg.train.grad_accum
    seq = seq_len or cfg.data.seq_len
    shape = (accum, micro, seq)
    batch = _batch(mesh, micro, {k: (shape, jnp.float32 if k == "weights" else jnp.int32)
                                 for k in ("inputs", "targets", "positions", "segments", "weights")}, leading=1)
    step = aot.spec((), jnp.int32, mesh)
    return Program(f"LoRA train step {accum}x{micro}x{seq}", steps.train, (params, opt_state, rng, frozen, batch, step),
                   mesh)


_TOKENS = ("inputs", "targets", "positions", "segments")


def grpo_steps(run_config, mesh: Mesh, *, seq_len: int | None = None) -> tuple[Program, Program]:
    """GRPO's trainer programs for a run config (`train.grpo.make_steps`, built from the model's abstract state and
    the config alone; no data, no engine) on `mesh`: (the rollouts' log-probs: the policy's and, with kl_coef, the
    adapter-off reference's, over the step's N = prompts_per_step x group_size rows, with the router disagreement
    against the engine's recorded expert ids [..., layers, top-k]; the update: the clipped policy gradient, replaying
    those ids with grpo.routing: replay; both over [grad_accum, N / grad_accum, seq_len], AdamW). Placement as
    `lora_train_step`'s."""
    cfg, g = run_config, run_config.grpo
    model, tx, sched = _abstract_trainer(cfg, mesh)
    graphdef, params, frozen = loop.split(model)
    rollout_logprobs, update = grpo.make_steps(graphdef, cfg, tx, sched)
    params, opt_state, frozen = _placed_state(params, frozen, tx, mesh)
    n, accum, seq = g.prompts_per_step * g.group_size, cfg.train.grad_accum, seq_len or cfg.data.seq_len
    micro = n // accum
    shape = (accum, micro, seq)
    routing = {"routing": ((*shape, cfg.model.num_hidden_layers, cfg.model.num_experts_per_tok), jnp.int16)}
    rows = _batch(mesh, micro, {k: (shape, jnp.int32) for k in _TOKENS} | {"weights": (shape, jnp.float32)} | routing,
                  leading=1)
    f32 = {k: (shape, jnp.float32) for k in ("old_logp", "ref_logp", "coef")}
    batch = {**rows, **_batch(mesh, micro, f32 | {"adv": ((accum, micro), jnp.float32)}, leading=1)}
    if g.routing != "replay":  # the update's forward routes itself (train/grpo.py drops the engine's ids)
        del batch["routing"]
    step = aot.spec((), jnp.int32, mesh)
    ref = " + reference" if g.kl_coef else ""
    return (Program(f"GRPO rollout log-probs (policy{ref}) {accum}x{micro}x{seq}", rollout_logprobs,
                    (params, frozen, rows), mesh),
            Program(f"GRPO update {accum}x{micro}x{seq} (routing {g.routing})", update,
                    (params, opt_state, frozen, batch, step), mesh))


def dpo_update_step(run_config, mesh: Mesh, *, seq_len: int | None = None) -> Program:
    """DPO's step for a run config (`train.dpo.make_update`): per micro-batch the policy's and (unless
    reference_free) the adapter-off reference's forward over its pairs [grad_accum, batch_size / grad_accum, 2,
    seq_len] (the reference is the same weights with the LoRA parameters zeroed: no copy), AdamW."""
    cfg = run_config
    model, tx, sched = _abstract_trainer(cfg, mesh)
    graphdef, params, frozen = loop.split(model)
    update = dpo.make_update(graphdef, cfg, tx, sched)
    params, opt_state, frozen = _placed_state(params, frozen, tx, mesh)
    accum, seq = cfg.train.grad_accum, seq_len or cfg.data.seq_len
    pairs = cfg.train.batch_size // accum
    shape = (accum, pairs, 2, seq)
    batch = _batch(mesh, pairs, {k: (shape, jnp.float32 if k == "weights" else jnp.int32)
                                 for k in (*_TOKENS, "weights")}, leading=1)
    step = aot.spec((), jnp.int32, mesh)
    ref = "" if cfg.dpo.reference_free else " + reference"
    return Program(f"DPO step (policy{ref}) {accum}x{pairs}x2x{seq}", update, (params, opt_state, frozen, batch, step),
                   mesh)


def vision_encode(config, mesh: Mesh, images: tuple[tuple[int, int], ...] = ((1540, 1540),), *,
                  dtype="bfloat16") -> Program:
    """Image features of `images` ((height, width) pixels, multiples of 28) packed into one sequence, as
    `vision.encode_images` runs them when a prompt with images is prefilled: the encoder's weights placed by
    `sharding.spec_for`, the packed patches, positions, segments and merge index replicated. A 1540 x 1540 image is
    12,100 patches (padded to 12,288), 3,025 merged tokens."""
    import numpy as np

    vc = config.vision
    if vc is None:
        raise ValueError("vision_encode needs a config with a 'vision' block")
    graphdef, state = abstract_placed_model(config, mesh, dtype)
    vision_state = nnx.State({k: state[k] for k in ("vision_tower", "multi_modal_projector")})
    model = abstract_model(config, dtype=dtype)
    vision_def, _ = nnx.split((model.vision_tower, model.multi_modal_projector))
    packed = pack_images(vc, [np.zeros((vc.num_channels, h, w), np.float32) for h, w in images])

    def run(tower, projector, patches, rows, cols, segment_ids, merge_index):
        return encode_packed(vision_def, nnx.State({0: tower, 1: projector}), patches, rows, cols, segment_ids,
                       merge_index)

    inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (packed.patches, packed.rows, packed.cols,
                                                               packed.segment_ids, packed.merge_index)]
    args = (vision_state["vision_tower"], vision_state["multi_modal_projector"], *_replicated(inputs, mesh))
    name = " + ".join(f"{h}x{w}" for h, w in images)
    return Program(f"vision encode {name} ({packed.patches.shape[0]} patches)", run, args, mesh)
