"""Every GPU program of ours compiles for H100 / H200 (sm_90a) on this CPU machine, at Small 4's real dims.

Deviceless compilation (`small4_jax/tools/aot.py`) runs XLA's real GPU pipeline: Pallas -> Triton IR -> PTX -> ptxas with
the target's shared-memory and register limits, so a kernel change that breaks the GPU build fails here. Programs
(`small4_jax/tools/aot_programs.py`, the same builders `small4_jax/plan.py` uses), each compiled once per module:

    kernels   gmm + its VJP (gmm on both weight layouts, tgmm): decode / prefill tilings, bf16 and fp32, ragged M
    experts   expert parallelism, replicated and all-to-all (the real ragged_all_to_all), on 1x1x8 and 2x1x8
    model     the forward (moe_impl auto) on 8 x H200; the serving engine's prefill and decode steps on 8 x H100;
              the LoRA train step on configs/finetune-small4.yaml's mesh; GRPO's update and its rollout engine's
              decode step with a multi-LoRA slot (configs/grpo-small4.yaml)
Layers: one (every layer is the same program; depth changes argument bytes, not what compiles). The tilings are also
checked analytically against the target limits for every row count 1 .. 2^17 the heuristics can see.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from small4_jax.tools import aot
from small4_jax.tools import aot_programs as ap
from small4_jax.config import Small4Config
from small4_jax.kernels.gmm import tiling as T

E, H, F, TOP_K = 128, 4096, 2048, 4
CONFIG = "configs/small4-119b.yaml"
FINETUNE = "configs/finetune-small4.yaml"
GRPO = "configs/grpo-small4.yaml"


def _one_layer(config: Small4Config) -> Small4Config:
    return config.replace(num_hidden_layers=1)


@pytest.fixture(scope="module")
def compiled():
    """name -> aot.Compiled, compiled on first use and shared by the module's tests."""
    cache = {}

    def get(name, build):
        if name not in cache:
            cache[name] = build().compile()
        return cache[name]

    return get


# ----------------------------------------------------------------------------------------------------------------------
# Kernels.
KERNEL_CASES = [  # (target, rows, dtype, transpose_rhs, k, n): each VJP compiles gmm on both layouts and tgmm
    ("h200", 64, jnp.bfloat16, False, H, 2 * F),  # decode tiling with split-K (gate_up)
    ("h200", 16384, jnp.bfloat16, True, F, H),  # prefill tiling, weights stored [G, N, K] (down, transposed)
    ("h100", 8192 + 3, jnp.float32, False, H, 2 * F),  # fp32 prefill tiling, rows not a multiple of any tile
    ("h100", 1, jnp.bfloat16, True, H, 2 * F),  # one row
]


@pytest.mark.gpu_compile
@pytest.mark.parametrize("target, rows, dtype, transpose_rhs, k, n", KERNEL_CASES,
                         ids=[f"{c[0]}-{c[1]}rows-{jnp.dtype(c[2]).name}-{'T' if c[3] else 'N'}" for c in KERNEL_CASES])
def test_gmm_and_its_vjp_compile(compiled, target, rows, dtype, transpose_rhs, k, n):
    mesh = aot.gpu_mesh(target, {"x": 1}, topology="1x1x1")
    c = compiled(("gmm", target, rows, dtype, transpose_rhs),
                 lambda: ap.gmm_vjp(mesh, rows, groups=E, k=k, n=n, dtype=dtype, transpose_rhs=transpose_rhs))
    assert c.triton_calls == 3  # gmm, gmm on the other layout (dlhs), tgmm (dw)
    size = jnp.dtype(dtype).itemsize
    assert c.memory.argument == (rows * k + E * k * n) * size + E * 4
    assert c.memory.output >= (rows * k + E * k * n) * size  # both gradients


@pytest.mark.gpu_compile
def test_the_tiling_check_agrees_with_the_compiler():
    """An oversized tiling: the analytic check and the compiler both refuse it, over the same shared-memory bytes."""
    t = T.GmmTiling(128, 256, 256, num_warps=8, num_stages=4)
    need = T.resources(t, jnp.bfloat16)["shared_memory"]
    assert T.check_tiling(t, jnp.bfloat16) == [f"shared memory {need} B > 232448 B per block"]
    mesh = aot.gpu_mesh("h100", {"x": 1}, topology="1x1x1")
    with pytest.raises(Exception, match=f"Shared memory size limit exceeded: requested {need}, available: 232448"):
        ap.gmm_vjp(mesh, 8192, grad=False, tiling=t).compile()


def _kernel_shapes(h, f, experts, top_k, ranks=(4, 16), parallel=(1, 8)):
    """(k, n, local groups) of every gmm the model issues: gate_up, down and their input gradients (the same shapes
    swapped), LoRA A and B of both, under tensor parallelism tp and expert parallelism ep."""
    out = set()
    for tp in parallel:
        for ep in parallel:
            g = experts // ep
            mats = [(h, 2 * f // tp), (f // tp, h)]
            for r in ranks:
                mats += [(h, r), (r, 2 * f // tp), (f // tp, r), (r, h)]
            for k, n in mats:
                out |= {(k, n, g), (n, k, g)}
    return sorted(out)


def test_every_tiling_the_heuristics_pick_fits_hopper():
    """Rows 1 .. 2^17 (decode, prefill, training), fp32 and bf16: gmm and tgmm tilings within the H100/H200 limits.

    Every row count for the main shape (gate_up, 128 experts); for the rest, every row count where a tiling can change
    (1..512, powers of two and their neighbours, the decode threshold of each group count)."""
    for target in aot.TARGETS:
        assert T.GpuLimits.from_target_config(aot.target_config(target)) == T.HOPPER
    seen = {}
    every = range(1, 2**17 + 1)
    edges = sorted(set(range(1, 513)) | {2**i + d for i in range(18) for d in (-1, 0, 1)} |
                   {T._DECODE_ROWS_PER_GROUP * g + d for g in (1, 2, 4, 8, 16, 32, 64, 128) for d in (-1, 0, 1)})
    edges = [m for m in edges if 1 <= m <= 2**17]
    for k, n, g in _kernel_shapes(H, F, E, TOP_K):
        rows = every if (k, n, g) == (H, 2 * F, E) else edges
        for dtype in (jnp.float32, jnp.bfloat16):
            for m in rows:
                for kind, t in (("gmm", T.gmm_tiling(m, k, n, g, dtype)), ("tgmm", T.tgmm_tiling(m, k, n, g, dtype))):
                    key = (kind, t, jnp.dtype(dtype).name, n if kind == "gmm" else 0)
                    if key not in seen:
                        seen[key] = (m, k, n, g)
                        bad = T.check_tiling(t, dtype, T.HOPPER, kind, m=m, n=n)
                        assert not bad, f"{kind} {t} ({jnp.dtype(dtype).name}, m={m} k={k} n={n} g={g}): {bad}"
    assert len({key[1] for key in seen}) >= 6  # decode (several split-K), prefill, tgmm tilings in both dtypes


# ----------------------------------------------------------------------------------------------------------------------
# Expert parallelism.
EP_CASES = [  # (target, topology, mesh, strategy, tokens, grad)
    ("h200", "1x1x8", {"data": 1, "expert": 8, "tensor": 1}, "replicated", 64, False),
    ("h200", "1x1x8", {"data": 1, "expert": 8, "tensor": 1}, "all_to_all", 2048, True),
    ("h100", "2x1x8", {"data": 2, "expert": 8, "tensor": 1}, "replicated", 64, False),
    ("h100", "2x1x8", {"data": 2, "expert": 8, "tensor": 1}, "all_to_all", 2048, True),
]


@pytest.mark.gpu_compile
@pytest.mark.parametrize("target, topology, shape, strategy, tokens, grad", EP_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}{'-grad' if c[5] else ''}" for c in EP_CASES])
def test_expert_parallel_compiles_with_the_kernel(compiled, target, topology, shape, strategy, tokens, grad):
    mesh = aot.gpu_mesh(target, shape, topology=topology)
    c = compiled(("ep", target, topology, strategy),
                 lambda: ap.expert_parallel(mesh, tokens, strategy=strategy, grad=grad, experts=E, hidden=H,
                                            intermediate=F, top_k=TOP_K))
    assert c.uses_triton, "moe_impl auto on GPU devices must run the Pallas kernel"
    assert c.uses_ragged_all_to_all == (strategy == "all_to_all")
    # gate_up and down of this device's 16 experts, in bf16; tokens replicated over expert, split over data
    assert c.memory.argument >= (E // 8) * 3 * H * F * 2
    if grad:
        assert c.triton_calls >= 6  # forward gmm x2, dlhs x2, tgmm x2


# ----------------------------------------------------------------------------------------------------------------------
# The model: forward, serving steps, LoRA train step.
def _sharded_bytes(state, skip=()) -> int:
    """Per-device bytes of the leaves of `state`, leaving out top-level modules whose name contains a `skip` word."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for path, x in leaves
               if not any(word in str(path[0]) for word in skip))


@pytest.mark.gpu_compile
def test_model_forward_with_auto_runs_the_kernel_on_8_h200(compiled):
    config = _one_layer(Small4Config.from_yaml(CONFIG))
    assert config.moe_impl == "auto"
    mesh = aot.gpu_mesh("h200", {"data": 1, "expert": 8, "tensor": 1})
    program = ap.model_forward(config, mesh, 4096)
    c = compiled("forward", lambda: program)
    assert c.uses_triton and c.triton_calls == 3  # gate_up and down of the one MoE layer; flash attention
    assert c.uses_ragged_all_to_all  # 4096 tokens >= moe_a2a_min_tokens: all-to-all dispatch
    # every text weight is an argument at its sharding (jit drops the unused vision tower's)
    assert c.memory.argument == _sharded_bytes(program.args[0], skip=("vision", "multi_modal")) + 4096 * 4


@pytest.mark.gpu_compile
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_serving_steps_compile_on_8_h100(compiled, decode):
    """The engine's step at the serve defaults (page 16, prefill 4 x 256, decode batch 16), a 64-page table; both
    run absorbed MLA over the pages (the Pallas MLA kernel beside the MoE's)."""
    config = _one_layer(Small4Config.from_yaml(CONFIG))
    mesh = aot.gpu_mesh("h100", {"data": 1, "expert": 8, "tensor": 1})
    rows, tokens = (16, 1) if decode else (4, 256)
    program = ap.serve_step(config, mesh, absorbed=True, rows=rows, tokens=tokens, table_pages=64,
                            num_pages=1024)
    c = compiled(("serve", decode), lambda: program)
    assert c.uses_triton and "small4_mla" in c.text  # the MLA kernel (kernels/mla_decode) is in the program
    assert c.uses_ragged_all_to_all == (rows * tokens >= config.moe_a2a_min_tokens)
    pages = program.args[1]
    shard = int(np.prod(pages.sharding.shard_shape(pages.shape))) * pages.dtype.itemsize
    assert c.memory.alias >= shard  # the cache (this device's pages) is donated: updated in place


@pytest.mark.gpu_compile
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_decode_step_reads_the_expert_stacks_in_place(compiled, quantize):
    """Under the scan over layers the routed experts' stacks go whole to the grouped-matmul kernel with the layer
    index (`moe.AtLayer`): the compiled decode step copies no layer's expert weights (quantised values and scales
    alike). Before, each stacked expert weight was sliced in the loop body by a dynamic-slice fusion with a `copy`
    root (e.g. bf16[1,16,4096,4096], a layer's gate_up shard), 0.5 GiB of temporaries, then read by the kernel.
    (The dense weights still are: test_aot's scan test and benchmarks/scan_copies.py.)"""
    from flax import nnx

    config = Small4Config.from_yaml(CONFIG).replace(num_hidden_layers=2)  # a scan of 2 MoE layers
    mesh = aot.gpu_mesh("h100", {"data": 1, "expert": 8, "tensor": 1})
    program = ap.serve_step(config, mesh, absorbed=True, rows=16, tokens=1, table_pages=64, num_pages=1024,
                            quantize=quantize)
    c = compiled(("serve-2-layers", quantize), lambda: program)
    stacks = {}  # per-device shard shape of each routed-expert stack (values and scales) -> bytes of one layer
    for path, var in nnx.to_flat_state(program.args[0]):
        x = var.get_raw_value() if hasattr(var, "get_raw_value") else var
        if len(path) >= 2 and path[-2] == "experts" and path[-1] in ("gate_up", "down", "gate_up_scale", "down_scale"):
            shard = x.sharding.shard_shape(x.shape)
            stacks[shard] = (path[-1], int(np.prod(shard[1:])) * x.dtype.itemsize)
    assert len(stacks) == (4 if quantize else 2) and all(s[0] == 2 for s in stacks)
    hlo = c.compiled.as_text()
    for shard in stacks:  # the whole stack [2, 16, ...] is an operand of the kernel's custom calls
        assert f"[{','.join(map(str, shard))}]" in hlo
    written = {a.shape for a in c.written_arrays()}  # every array the program writes (copies, fusion outputs)
    layer_shapes = {s[1:] for s in stacks} | {(1, *s[1:]) for s in stacks}
    assert not written & layer_shapes, f"a layer's expert weights are copied: {written & layer_shapes}"
    weights = [b for name, b in stacks.values() if not name.endswith("_scale")]  # gate_up / down of one layer
    assert c.memory.temp < min(weights), (c.memory.temp, weights)  # (2 layers: 0.78 GiB temp before, 0.05 after)


@pytest.mark.gpu_compile
def test_lora_train_step_compiles_on_the_finetune_mesh(compiled):
    from train.config import load

    run = load(FINETUNE)
    run = dataclasses.replace(run, model=_one_layer(run.model))
    mesh = aot.gpu_mesh("h200", dict(run.train.mesh))
    program = ap.lora_train_step(run, mesh, **TRAIN_SHAPE)
    c = compiled("lora", lambda: program)
    assert c.uses_triton and c.uses_ragged_all_to_all
    # frozen base: no weight gradient for the experts; the expert adapters' gradients are tgmm calls
    assert c.triton_calls >= 8


# ----------------------------------------------------------------------------------------------------------------------
# Eight GPUs doing the work of eight: per-device FLOPs against the one-device program's total / 8.
TRAIN_SHAPE = dict(micro_batch=8, seq_len=256, grad_accum=1)
DP_MESHES = {"data1-expert8": {"data": 1, "expert": 8, "tensor": 1}, "data2-expert4": {"data": 2, "expert": 4, "tensor": 1}}


def _program(kind, target, shape):
    """The train step (configs/finetune-small4.yaml, one layer) or the decode step (16 rows over a 64-page table,
    1024 pages) on `shape`; on one device the same rows and table with one cache shard's pages (the cache's size
    changes no step's work)."""
    from train.config import load

    mesh = aot.gpu_mesh(target, shape)
    if kind == "train":
        run = load(FINETUNE)
        return ap.lora_train_step(dataclasses.replace(run, model=_one_layer(run.model)), mesh, **TRAIN_SHAPE)
    pages = 1024 if mesh.size > 1 else 1024 // 8
    return ap.serve_step(_one_layer(Small4Config.from_yaml(CONFIG)), mesh, absorbed=True, rows=16, tokens=1,
                         table_pages=64, num_pages=pages)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("mesh", sorted(DP_MESHES))
@pytest.mark.parametrize("kind", ["train", "decode"])
def test_each_device_does_an_eighth_of_the_work(compiled, kind, mesh):
    """Attention, the dense and shared-expert MLPs, lm_head and the loss run data-parallel over data x expert
    (`sharding.RULES["batch"]`), the routed experts expert-parallel: each of the 8 devices' XLA FLOPs (`aot.hlo_cost`,
    loops counted per run) are within 1.3x of the one-device program's / 8 (the attention and loss of the whole
    batch on every device made it ~4x), and the decode step's cache is split 8 ways."""
    target = "h200" if kind == "train" else "h100"  # the keys the tests above compiled data1-expert8 under
    shape = DP_MESHES[mesh]
    key = {"train": "lora", "decode": ("serve", True)}[kind] if mesh == "data1-expert8" else (kind, mesh)
    program = _program(kind, target, shape)
    c = compiled(key, lambda: program)
    one = compiled((kind, "one device"), lambda: _program(kind, target, {"data": 1, "expert": 1, "tensor": 1}))
    ratio = c.cost.flops * 8 / one.cost.flops
    assert ratio <= 1.3, (ratio, c.cost, one.cost)
    if kind == "decode":
        pages = program.args[1]
        assert pages.sharding.shard_shape(pages.shape)[1] * 8 == pages.shape[1]  # every device holds 1/8 of the pages


# ----------------------------------------------------------------------------------------------------------------------
# GRPO at real dims (configs/grpo-small4.yaml): the trainer's update and the rollout engine's step.
@pytest.mark.gpu_compile
def test_grpo_update_compiles_and_splits_like_the_train_step(compiled):
    """GRPO's update (`train.grpo.make_steps`, built from the run config and the model's abstract state: no data, no
    engine) at the train step's shape (8 rollouts x 256 tokens) on the fine-tune mesh, routing replayed: the expert
    kernels and the all-to-all, and each device's FLOPs within 1.15x of the SFT step's, itself ~1/8 of the one-device
    program's (test_each_device_does_an_eighth_of_the_work). With loss_chunk 128 each device's 256 tokens are two
    chunks: the per-token log-probs cut across the shards (each chunk on one device, every device computing it)
    made them 3.9x."""
    from train.config import load

    run = load(GRPO)
    run = dataclasses.replace(run, model=_one_layer(run.model),
                              train=dataclasses.replace(run.train, grad_accum=1, loss_chunk=128),
                              grpo=dataclasses.replace(run.grpo, prompts_per_step=1, group_size=8))
    mesh = aot.gpu_mesh("h200", dict(run.train.mesh))
    update = ap.grpo_steps(run, mesh, seq_len=TRAIN_SHAPE["seq_len"])[1]
    c = compiled("grpo update", lambda: update)
    sft = compiled("lora", lambda: _program("train", "h200", DP_MESHES["data1-expert8"]))
    assert c.uses_triton and c.uses_ragged_all_to_all and c.triton_calls >= 8
    assert c.cost.flops <= 1.15 * sft.cost.flops, (c.cost, sft.cost)


@pytest.mark.gpu_compile
def test_rollout_decode_step_with_a_lora_slot_compiles_on_8_h100(compiled):
    """The GRPO engine's decode step (`Engine(max_loras=1, record_routing=True)`: slot 0 the base, slot 1 the policy's
    adapter, rank 16 on every adaptable module, bf16, split like their base weights) at the serving test's dims: the
    MLA and expert kernels, the slots and the rows' adapter ids among the arguments beside the same weights, the cache
    donated, each row's routed expert ids [rows, 1, layers, top-k] among the outputs."""
    from flax import nnx

    from small4_jax.lora.multi import AdapterIds, MultiLoRAParam

    config = _one_layer(Small4Config.from_yaml(CONFIG))
    mesh = aot.gpu_mesh("h100", {"data": 1, "expert": 8, "tensor": 1})
    program = ap.serve_step(config, mesh, absorbed=True, rows=16, tokens=1, table_pages=64, num_pages=1024,
                            lora_slots=(2, 16), record_routing=True)
    c = compiled("rollout decode", lambda: program)
    with jax.set_mesh(mesh):
        routed = jax.eval_shape(program.fn, *program.args)[-1]
    assert (routed.shape, routed.dtype) == ((16, 1, 1, TOP_K), jnp.int16)
    assert c.uses_triton and "small4_mla" in c.text
    slots, ids, base = nnx.split_state(program.args[0], MultiLoRAParam, AdapterIds, ...)
    plain = ap.serve_step(config, mesh, absorbed=True, rows=16, tokens=1, table_pages=64, num_pages=1024).args[0]
    assert _sharded_bytes(base) == _sharded_bytes(plain) and [x.shape for x in jax.tree.leaves(ids)] == [(16,)]
    assert c.memory.argument >= _sharded_bytes(plain, skip=("vision", "multi_modal")) + _sharded_bytes(slots) > 0
    pages = program.args[1]
    assert c.memory.alias >= int(np.prod(pages.sharding.shard_shape(pages.shape))) * pages.dtype.itemsize
