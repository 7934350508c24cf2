"""The GPU programs users run, built as abstract programs for `aot.compile_for` on compile-only GPU meshes.

One builder per program, shared by the compile tests (`tests/test_gpu_compile.py`: every program compiles for sm_90a,
at real dims) and the deployment planner (`small4_jax/plan.py`: per-device memory and work of a deployment):

    gmm_vjp          the grouped matmul, forward and gradients (gmm, its transposed-rhs twin, tgmm)
    expert_parallel  the routed experts on an expert mesh (replicated or all-to-all), forward or with gradients
    model_forward    the model's forward over a batch of tokens
    serve_step       the serving engine's model step (`paged.logits_step`): a prefill chunk or a decode step
    vision_encode    the vision encoder + projector on images packed as the engine packs them (`vision.encode_packed`)
    lora_train_step  the fine-tuning step of `train.trainer.make_steps` (grad accumulation scan, AdamW)

Arguments are `jax.ShapeDtypeStruct`s placed the way the real code places them (weights by `sharding.spec_for`,
adapters by `lora.lora_spec`, the paged cache and engine inputs replicated). Nothing here allocates a weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from small4_jax import kernels
from small4_jax.lora import adapters as lora
from small4_jax.nn import moe
from small4_jax.nn.model import Small4ForCausalLM, abstract_model, shard_latent_projections
from small4_jax.nn.paged import PagedCache, cache_spec, default_cache_axes, logits_step
from small4_jax.nn.vision import encode_packed, pack_images
from small4_jax.parallel.sharding import batch_spec, spec_for
from small4_jax.quant import formats as quant
from small4_jax.tools import aot
from train import trainer


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
                          shard_latent_proj: bool = False):
    """(graphdef, state) of the model with every weight abstract and placed on `mesh` (`sharding.spec_for`, with the
    `shard_latent_proj` layout option), its
    linears and experts in `quantize`'s format (small4_jax.quant.formats) when given (with activations="fp8": W8A8, the
    static activation scales as parameters too); `scan_layers=False` unrolls the
    layer loop (model.run_layers; compile-time comparison)."""
    model = abstract_model(config, dtype=dtype, quantize=quantize, activations=activations)
    model.scan_layers = scan_layers
    tp = dict(mesh.shape).get("tensor", 1)
    if tensor_interleave and tp > 1 and config.moe_intermediate_size % tp == 0:
        for stack in model.layer_stacks:  # the engine's column order (model.interleave_experts); shapes unchanged
            if getattr(stack.mlp, "experts", None) is not None:
                stack.mlp.experts.gate_up_blocks = tp
    if shard_latent_proj:
        shard_latent_projections(model)  # marked here, placed below
    graphdef, state = nnx.split(model)
    return graphdef, aot.placed(state, mesh, shard_latent_proj=shard_latent_proj)


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
               tensor_interleave: bool = True, shard_latent_proj: bool = False) -> Program:
    """The engine's model step (`paged.logits_step`, as `Engine._run` dispatches it; the sampler is a separate small
    program): decode ([rows, 1]) or one prefill chunk ([rows, tokens]), absorbed MLA over the pages as the engine
    runs both (absorbed=False: the expanded reference), over a page table `table_pages` wide; the paged cache
    [layers, num_pages, page_size, width] with its pages sharded over `cache_axes` and the rows with them (default:
    the engine's, `paged.default_cache_axes`: data-parallel attention; () replicates it) and donated. `scan_layers=False`
    unrolls the layers. context_axes: one sequence's pages split over these axes by position (decode context
    parallelism; the engine then shards no rows, so cache_axes defaults to ()): the page table holds each shard's
    columns in turn. On a mesh with a `tensor` axis the routed experts' gate_up is in the engine's interleaved order
    (`model.interleave_experts`) unless tensor_interleave=False. shard_latent_proj: the latent projections split over
    `tensor` (`sharding.spec_for`)."""
    if cache_axes is None:  # the engine's default: pages and rows over the batch axes (data-parallel attention)
        cache_axes = default_cache_axes(mesh, rows, tuple(context_axes))
    graphdef, state = abstract_placed_model(config, mesh, dtype, quantize, scan_layers, activations,
                                            tensor_interleave=tensor_interleave, shard_latent_proj=shard_latent_proj)
    cache_dtype = cache_dtype or dtype
    pages = jax.eval_shape(lambda: PagedCache.create(config, num_pages, page_size, cache_dtype).pages)

    def run(state, pages, ids, positions, seq_index, slots, page_table, logit_index):
        return logits_step(graphdef, state, pages, ids, positions, seq_index, slots, page_table, logit_index,
                           absorbed=absorbed, cache_axes=cache_axes, context_axes=context_axes)

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
    kind = "decode" if tokens == 1 else "prefill"
    return Program(f"serve {kind} {rows}x{tokens}, {table_pages} pages/seq", run, args, mesh,
                   dict(donate_argnums=(1,)))


def lora_train_step(run_config, mesh: Mesh, *, micro_batch: int | None = None, seq_len: int | None = None,
                    grad_accum: int | None = None) -> Program:
    """`train.trainer.make_steps(...).train` for a run config (e.g. configs/finetune-small4.yaml) on `mesh`: the
    frozen base placed by `sharding.spec_for`, adapters and AdamW state by `lora.lora_spec`, the batch
    [grad_accum, micro_batch, seq_len] split over the batch axes as `trainer.put_batch` does (`sharding.batch_spec`). Defaults: the config's."""
    cfg = run_config

    def build():  # adapters attached while tracing: apply_lora reads the base weights' shapes through [...]
        m = Small4ForCausalLM(cfg.model, dtype=cfg.base.dtype, rngs=nnx.Rngs(0))
        lora.apply_lora(m, cfg.lora)
        return m

    model = nnx.eval_shape(build)
    trainer.configure(model, cfg)
    tx, sched = trainer.optimizer(cfg), trainer.schedule(cfg)
    steps = trainer.make_steps(model, tx, sched)
    _, params, rng, frozen = nnx.split(model, lora.TRAINABLE, lora.DropoutKey, ...)
    params = aot.placed(params, mesh, lora.lora_spec)
    frozen = aot.placed(frozen, mesh)
    rng = _replicated(rng, mesh)
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(
        lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding) else aot.spec(x.shape, x.dtype, mesh),
        opt_state)

    accum = grad_accum or cfg.train.grad_accum
    micro = micro_batch or cfg.train.batch_size // cfg.train.grad_accum
    seq = seq_len or cfg.data.seq_len
    bspec = batch_spec(mesh, micro, leading=1)
    batch = {k: aot.spec((accum, micro, seq), jnp.float32 if k == "weights" else jnp.int32, mesh, bspec)
             for k in ("inputs", "targets", "positions", "segments", "weights")}
    step = aot.spec((), jnp.int32, mesh)
    return Program(f"LoRA train step {accum}x{micro}x{seq}", steps.train, (params, opt_state, rng, frozen, batch, step),
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
