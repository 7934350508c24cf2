"""The deployment planner: per-device memory and work of the programs a deployment runs, from compiled programs.

    python -m small4_jax.plan --gpu h100 --devices 8 --mesh data=1,expert=8,tensor=1          # serving at defaults
    python -m small4_jax.plan --gpu h100 --devices 8 --mesh data=1,expert=8,tensor=1 \\
        --finetune configs/finetune-small4.yaml                                              # + the train step
    python -m small4_jax.plan --preset serve-119b-bf16-8xH100 --layers 2 --json              # a documented row

Nothing runs on a GPU: every program is compiled deviceless for the target (`small4_jax/tools/aot.py`; run with
JAX_PLATFORMS=cpu and jax's CUDA plugin installed) on the mesh, and once more on ONE device for the ideal. Per
program and device it prints:

    memory   what stays resident (weights, the paged cache and the tokens it holds, multi-LoRA slots, the EAGLE
             draft, adapters + AdamW state) and the program's temporaries (XLA's memory analysis); need = the
             program's peak (arguments + outputs not donated + temporaries) plus resident bytes the program does
             not take (jit drops unused arguments, e.g. the vision tower in a text step), against the allocator's
             limit (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.92 as launch/ sets it, of the device's memory): headroom.
    work     FLOPs and HBM bytes per step (`aot.hlo_cost` of the partitioned module: each loop body counted as often
             as it runs) and their ratio to the ideal, the one-device program's total / devices: 1.0 when the
             devices split the work, N when each device repeats all of it. Pallas kernels (the routed experts'
             grouped matmul, flash / MLA attention) count their bytes but not their FLOPs (`kernels` says how many
             launch per step).
    per token  the decode step's row, at batch 1 and at the planned batch (`small4_jax.tools.token_cost`): bytes
             each device reads a token (weights, cache), collectives per layer and per token in the compiled HLO,
             and the floor they imply (bytes / HBM bandwidth + collectives x 5 us).

Serving is `infer.serve` at its engine flags (`infer.cli.add_engine_args` defaults): the cache the engine allocates
(90% of what is free after everything else resident, `infer.engine.engine.pages_for_memory`), sharded over the batch axes
(`sharding.RULES`: data-parallel attention, the engine's default `cache_axes`), the largest prefill step (the
engine's [shards x prefill_batch, prefill_chunk]) and decode step ([max_batch, 1]) over the widest page table, and
the vision encoder on one 1540 x 1540 image. `--finetune CONFIG` adds `train.finetune`'s step on the same GPUs; for
a config with `train.method: grpo` (configs/grpo-small4.yaml) the rollout engine's prefill and decode steps (one
multi-LoRA slot, a cache for every sample) and the trainer's two programs, the base weights resident once for both;
for `dpo` (configs/dpo-small4.yaml) its step (policy and adapter-off reference forwards).

Extending: a deployment is a `Deployment` (programs + resident bytes); a preset is a function in `PRESETS`; a
column of the per-program rows is a function in `ROW_COLUMNS` (deployment, program, compiled, one-device compiled
-> fields), e.g. collectives counted from `compiled.compiled.as_text()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from infer.cli import SHARD_LATENT_PROJ_HELP, add_engine_args
from infer.engine.engine import MAX_CONTEXT, free_device_memory_after, pages_for_memory
from small4_jax.config import Small4Config, load_config
from small4_jax.errors import Small4Error
from small4_jax.lora.multi import abstract_slots, slot_spec
from small4_jax.ckpt.eagle import load_eagle_config
from small4_jax.nn.eagle import EagleDraft
from small4_jax.nn.paged import cache_bytes_per_token_per_layer, default_cache_axes
from small4_jax.parallel.sharding import MESH_AXES, batch_axes, parse_mesh
from small4_jax.tools import aot, token_cost
from small4_jax.tools import aot_programs as ap
from train.config import load as load_run
from train.grpo import Rollouts

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "configs" / "small4-119b.yaml"
FINETUNE = ROOT / "configs" / "finetune-small4.yaml"
GRPO = ROOT / "configs" / "grpo-small4.yaml"
DPO = ROOT / "configs" / "dpo-small4.yaml"
SERVE_MESH = "data=1,expert=8,tensor=1"  # the README's serving command
MEM_FRACTION = 0.92  # XLA_PYTHON_CLIENT_MEM_FRACTION in launch/slurm/*.sbatch and launch/k8s


@dataclasses.dataclass
class Planned:
    """One program of a deployment, and (for the ideal) the same program built on one device."""

    program: ap.Program
    reference: Callable[[], ap.Program] | None = None


@dataclasses.dataclass
class Deployment:
    """What runs on a deployment's GPUs: its programs and what stays resident beside them (bytes per device)."""

    name: str
    target: str
    devices: int
    layout: str  # the mesh and how the batch / cache are split, as the table prints it
    programs: list[Planned]
    resident: dict[str, int]  # e.g. {"weights": ..., "cache": ...}
    note: str = ""
    check: Callable[[aot.Memory], str] | None = None  # a line on the compiled memory, added to the note
    mem_fraction: float = MEM_FRACTION  # of the device's memory the allocator may hand out
    cache_tokens: int = 0  # tokens the paged cache holds (all shards)
    # (program, compiled) -> the per-token columns of the program if it is the deployment's decode step, else {}
    per_token: Callable[[ap.Program, aot.Compiled], dict] | None = None


def shard_bytes(tree) -> int:
    """Per-device bytes of the (abstract, placed) leaves of `tree`."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def mesh_text(shape: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _meshes(target: str, shape: dict[str, int], hosts: int = 1):
    """(the deployment's mesh, a one-device mesh with the same axis names)."""
    n = math.prod(shape.values())
    mesh = aot.gpu_mesh(target, shape, topology=f"1x{hosts}x{n // hosts}")
    return mesh, aot.gpu_mesh(target, {k: 1 for k in shape}, topology="1x1x1")


def _layout(shape: dict[str, int], mesh, rows: int | None = None, cache: tuple[str, ...] | None = None) -> str:
    axes = batch_axes(mesh, rows)
    text = f"{mesh_text(shape)}; batch over {'x'.join(axes) or 'nothing (replicated)'}"
    if cache is not None:
        text += f"; cache over {'x'.join(cache) or 'nothing (replicated)'}"
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Deployments.
def serve(target: str, shape: dict[str, int], *, config=None, layers: int | None = None, quantize: str | None = None,
          mem_fraction: float = MEM_FRACTION, hosts: int = 1, engine_flags: tuple[str, ...] = (),
          cache_axes: tuple[str, ...] | None = None, name: str | None = None, lora: tuple[int, int] | None = None,
          lora_targets: tuple[str, ...] | None = None, eagle: bool = False, draft_path=None,
          shard_latent_proj: bool = False) -> Deployment:
    """`infer.serve --mesh SHAPE [--quantize Q] [engine flags]` on `target` GPUs: weights, the engine's default
    cache, the largest prefill and decode steps, the vision encoder. `lora` (slots, rank): multi-LoRA slots on the
    modules `lora_targets` selects (default all), in the model dtype, placed beside their bases; `eagle`: an EAGLE
    draft (its config from `draft_path`, default one decoder layer of the model's dims) and its cache. Both are
    resident before the engine sizes its cache, as `Engine.__init__` orders them. `shard_latent_proj`: the
    `--shard-latent-proj` layout. The decode step's row carries the per-token accounting (`per_token_columns`)."""
    flags = argparse.ArgumentParser()
    add_engine_args(flags)  # infer.serve's engine flags, at its defaults
    args = flags.parse_args(list(engine_flags))
    config = config or Small4Config.from_yaml(MODEL)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    dtype = "bfloat16"  # infer.serve's default for a checkpoint
    mesh, one = _meshes(target, shape, hosts)
    if cache_axes is None:
        cache_axes = default_cache_axes(mesh, args.max_batch)  # the engine's default
    d = math.prod(mesh.shape[a] for a in cache_axes)
    resident = {"weights": shard_bytes(ap.abstract_placed_model(config, mesh, dtype, quantize,
                                                                shard_latent_proj=shard_latent_proj)[1])}
    if lora is not None:
        slots = abstract_slots(config, lora[0] + 1, lora[1], targets=lora_targets, dtype=dtype)
        resident["lora slots"] = shard_bytes(aot.placed(slots, mesh, slot_spec))
    draft = None
    if eagle:
        draft = load_eagle_config(draft_path, config) if draft_path else config.replace(num_hidden_layers=1)
        state = nnx.state(nnx.eval_shape(lambda: EagleDraft(draft, dtype=dtype, rngs=nnx.Rngs(0))))
        resident["draft"] = shard_bytes(aot.placed(state, mesh))
    limit = int(mem_fraction * aot.device_memory_bytes(target))
    max_len = args.max_model_len or min(config.max_position_embeddings, MAX_CONTEXT)
    table = -(-max_len // args.page_size)
    num_pages = args.num_pages or d * pages_for_memory(
        config, dtype, free_device_memory_after(limit, sum(resident.values())), args.page_size, draft)
    num_pages -= num_pages % d
    note = ""
    if num_pages // d - 1 < table:
        note = (f"the engine refuses to start: {num_pages // d - 1} pages per cache shard < one {max_len}-token "
                f"sequence ({table} pages)")
        num_pages = d * (table + 1)
    max_batch = -(-args.max_batch // d) * d
    common = dict(table_pages=table, num_pages=num_pages, page_size=args.page_size, dtype=dtype, quantize=quantize,
                  shard_latent_proj=shard_latent_proj)

    def step(m, rows, tokens, axes, pages=num_pages):
        return lambda: ap.serve_step(config, m, absorbed=True, rows=rows, tokens=tokens, cache_axes=axes,
                                     **{**common, "num_pages": pages})

    # The one-device reference runs the same rows over the same page table, with one shard's pages: the cache's size
    # changes no step's work (a row reads its own pages), and a compile against 8 shards' pages on one device only
    # makes XLA struggle to fit them.
    ref_pages = max(num_pages // d, table + 1)
    programs = [Planned(step(mesh, d * args.prefill_batch, args.prefill_chunk, cache_axes)(),
                        step(one, d * args.prefill_batch, args.prefill_chunk, (), ref_pages)),
                Planned(step(mesh, max_batch, 1, cache_axes)(), step(one, max_batch, 1, (), ref_pages))]
    if config.vision is not None:  # a prompt's images are encoded (one 1540 x 1540 image: 12,100 patches) first
        programs.append(Planned(ap.vision_encode(config, mesh, ((1540, 1540),), dtype=dtype),
                                lambda: ap.vision_encode(config, one, ((1540, 1540),), dtype=dtype)))
    resident["cache"] = shard_bytes(programs[0].program.args[1])
    if draft is not None:  # the draft's own pages: as many as the target's, its layers wide
        per_token = cache_bytes_per_token_per_layer(draft, dtype) * draft.num_hidden_layers
        resident["draft cache"] = num_pages // d * args.page_size * per_token
    tokens = (num_pages - d) * args.page_size
    note = "; ".join(filter(None, [note, f"{tokens:,} cache tokens ({tokens // d:,} per cache shard)"]))
    n = math.prod(shape.values())
    extra = (f"-lora{lora[0]}x{lora[1]}" if lora else "") + ("-eagle" if eagle else "")
    decode = programs[1].program

    def per_token(program: ap.Program, compiled: aot.Compiled) -> dict:
        """The decode step at the planned batch (each row as long as the cache holds for it, at most max_len) and
        at batch 1 (one max_len request, as `--max-batch 1` runs it: compiled here), `token_cost.account`."""
        if program is not decode:
            return {}
        kw = dict(dtype=dtype, shard_latent_proj=shard_latent_proj)
        planned = token_cost.account(config, target, shape, program, compiled, batch=max_batch,
                                     context=min(max_len, tokens // max_batch), cache_axes=cache_axes, **kw)[0]
        one = planned if max_batch == 1 else token_cost.decode_row(
            config, target, shape, batch=1, context=min(max_len, tokens // d), quantize=quantize,
            cache_axes=default_cache_axes(mesh, 1), page_size=args.page_size, **kw)[0]
        return {"per_token_batch_1": one.as_dict(), "per_token_planned_batch": planned.as_dict()}

    return Deployment(name or f"serve-{quantize or 'bf16'}{extra}-{n}x{target.upper()}", target, n,
                      _layout(shape, mesh, max_batch, cache_axes), programs, resident, note,
                      mem_fraction=mem_fraction, cache_tokens=tokens, per_token=per_token)


def _run_config(config_path, layers: int | None):
    run = load_run(config_path)
    if layers:
        run = dataclasses.replace(run, model=run.model.replace(num_hidden_layers=layers))
    return run


def finetune(target: str, config_path: str | os.PathLike = FINETUNE, *, shape: dict[str, int] | None = None,
             layers: int | None = None, hosts: int = 1, name: str | None = None,
             mem_fraction: float = MEM_FRACTION) -> Deployment:
    """`train.finetune --config CONFIG`: one train step at the config's batch, on its mesh (or `shape`); a config
    with `train.method: grpo | dpo` is planned by `grpo` / `dpo`."""
    run = _run_config(config_path, layers)
    if run.train.method in ("grpo", "dpo"):
        return {"grpo": grpo, "dpo": dpo}[run.train.method](target, config_path, shape=shape, layers=layers,
                                                            hosts=hosts, name=name, mem_fraction=mem_fraction)
    shape = shape or dict(run.train.mesh)
    mesh, one = _meshes(target, shape, hosts)
    program = ap.lora_train_step(run, mesh)
    params, opt_state, _, frozen = program.args[:4]
    n = math.prod(shape.values())
    micro = run.train.batch_size // run.train.grad_accum
    return Deployment(name or f"{Path(config_path).stem}-{n}x{target.upper()}", target, n,
                      _layout(shape, mesh, micro), [Planned(program, lambda: ap.lora_train_step(run, one))],
                      {"weights": shard_bytes(frozen), "adapters+adam": shard_bytes((params, opt_state))},
                      f"micro-batch {micro} x {run.data.seq_len} tokens, {run.train.grad_accum} accumulated",
                      mem_fraction=mem_fraction)


def grpo(target: str, config_path: str | os.PathLike = GRPO, *, shape: dict[str, int] | None = None,
         layers: int | None = None, hosts: int = 1, name: str | None = None,
         mem_fraction: float = MEM_FRACTION) -> Deployment:
    """`train.finetune --config CONFIG` with `train.method: grpo` on its mesh (or `shape`): the in-process engine's
    prefill and decode steps (train/grpo.py's `Rollouts.engine_limits`: one multi-LoRA slot of lora.rank, a cache
    page for every token of every sample at data.seq_len, split over the batch axes as the engine splits it, the
    longest prompt data.seq_len - grpo.max_tokens + 1 prefilled in one chunk per cache shard, the decode batch every
    sample of a step) and the trainer's (`ap.grpo_steps`: the rollouts' log-probs, the update). Resident on every
    GPU through all of them: the base weights ONCE (the engine serves the trainer's arrays), the adapters + AdamW,
    the engine's slot and its cache."""
    run = _run_config(config_path, layers)
    shape = shape or dict(run.train.mesh)
    mesh, one = _meshes(target, shape, hosts)
    config, dtype, g = run.model, run.base.dtype, run.grpo
    lim = Rollouts.engine_limits(run, run.data.seq_len - g.max_tokens + 1, mesh)
    cache_axes = default_cache_axes(mesh, lim["max_batch"])  # the engine's default
    d = math.prod(mesh.shape[a] for a in cache_axes)
    page, table = lim["page_size"], lim["max_model_len"] // lim["page_size"]
    num_pages = -(-lim["num_pages"] // d) * d
    rows, chunk = -(-lim["max_batch"] // d) * d, lim["prefill_chunk"]
    slots = (lim["max_loras"] + 1, lim["max_lora_rank"])
    kw = dict(table_pages=table, page_size=page, dtype=dtype, lora_slots=slots, absorbed=True,
              record_routing=lim["record_routing"])
    ref_pages = max(num_pages // d, table + 1)  # one cache shard's pages (as `serve`'s one-device reference)

    def step(m, n, tokens, axes, pages):
        return lambda: ap.serve_step(config, m, rows=n, tokens=tokens, num_pages=pages, cache_axes=axes, **kw)

    prefill, decode = step(mesh, d * lim["prefill_batch"], chunk, cache_axes, num_pages)(), \
        step(mesh, rows, 1, cache_axes, num_pages)()
    logprobs, update = ap.grpo_steps(run, mesh)
    params, opt_state, frozen = update.args[:3]
    lora_slots = abstract_slots(config, *slots, dtype=dtype)
    resident = {"weights": shard_bytes(frozen), "adapters+adam": shard_bytes((params, opt_state)),
                "lora slots": shard_bytes(aot.placed(lora_slots, mesh, slot_spec)),
                "cache": shard_bytes(prefill.args[1])}
    programs = [Planned(prefill, step(one, d * lim["prefill_batch"], chunk, (), ref_pages)),
                Planned(decode, step(one, rows, 1, (), ref_pages)),
                Planned(logprobs, lambda: ap.grpo_steps(run, one)[0]),
                Planned(update, lambda: ap.grpo_steps(run, one)[1])]
    n = math.prod(shape.values())
    tokens = (num_pages - d) * page
    samples = g.prompts_per_step * g.group_size
    note = (f"{g.prompts_per_step} prompts x {g.group_size} samples of up to {g.max_tokens} tokens in data.seq_len "
            f"{run.data.seq_len}; {tokens:,} cache tokens; update micro-batch {samples // run.train.grad_accum} x "
            f"{run.data.seq_len}, {run.train.grad_accum} accumulated")
    return Deployment(name or f"{Path(config_path).stem}-{n}x{target.upper()}", target, n,
                      _layout(shape, mesh, samples // run.train.grad_accum, cache_axes), programs, resident, note,
                      mem_fraction=mem_fraction, cache_tokens=tokens)


def dpo(target: str, config_path: str | os.PathLike = DPO, *, shape: dict[str, int] | None = None,
        layers: int | None = None, hosts: int = 1, name: str | None = None,
        mem_fraction: float = MEM_FRACTION) -> Deployment:
    """`train.finetune --config CONFIG` with `train.method: dpo` on its mesh (or `shape`): one step
    (`ap.dpo_update_step`: the policy's forward and backward and the adapter-off reference's forward over the same
    weights)."""
    run = _run_config(config_path, layers)
    shape = shape or dict(run.train.mesh)
    mesh, one = _meshes(target, shape, hosts)
    program = ap.dpo_update_step(run, mesh)
    params, opt_state, frozen = program.args[:3]
    n = math.prod(shape.values())
    pairs = run.train.batch_size // run.train.grad_accum
    return Deployment(name or f"{Path(config_path).stem}-{n}x{target.upper()}", target, n,
                      _layout(shape, mesh, 2 * pairs), [Planned(program, lambda: ap.dpo_update_step(run, one))],
                      {"weights": shard_bytes(frozen), "adapters+adam": shard_bytes((params, opt_state))},
                      f"micro-batch {pairs} pairs (2 x {pairs} rows) x {run.data.seq_len} tokens, "
                      f"{run.train.grad_accum} accumulated", mem_fraction=mem_fraction)


def long_prompt(target: str, layers: int | None = None, mem_fraction: float = MEM_FRACTION) -> Deployment:
    """One 262,144-token prompt at the default serve flags: its pages fit a cache shard, its prefill step fits."""
    dep = serve(target, _shape(SERVE_MESH), layers=layers, mem_fraction=mem_fraction,
                name=f"serve-262k-prompt-8x{target.upper()}")
    prefill = dep.programs[0].program
    pages = prefill.args[1]
    shards = pages.shape[1] // pages.sharding.shard_shape(pages.shape)[1]
    per_shard, page_size = pages.shape[1] // shards, pages.shape[2]
    need = -(-262_144 // page_size)
    fits = f"holds {per_shard - 1} pages >= {need}" if per_shard - 1 >= need else f"only {per_shard - 1} < {need}"
    dep.note = "; ".join(filter(None, [dep.note, f"262,144-token prompt: its cache shard {fits}, prefilled in "
                                                 f"{262_144 // prefill.args[2].shape[1]} chunks of this step"]))
    dep.programs = dep.programs[:1]
    return dep


def ragged_decode(target: str, layers: int | None = None, mem_fraction: float = MEM_FRACTION, batch: int = 64,
                  long: int = 262_144, short: int = 1024) -> Deployment:
    """A decode step over one `long` row and batch - 1 `short` rows, with ONE cache replicated on every device
    (`--cache-axes none`) holding exactly their pages: cache + temporaries against sum(row lengths) x bytes per
    token (the split-KV MLA kernel reads each row's own pages)."""
    config = Small4Config.from_yaml(MODEL)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    page_size, dtype = 16, "bfloat16"  # the serve defaults
    lengths = [long] + [short] * (batch - 1)
    pages = sum(-(-n // page_size) for n in lengths) + 1  # + the null page
    table = -(-min(config.max_position_embeddings, MAX_CONTEXT) // page_size)
    shape = _shape(SERVE_MESH)
    mesh, one = _meshes(target, shape)
    kw = dict(absorbed=True, rows=batch, tokens=1, table_pages=table, num_pages=pages, page_size=page_size,
              dtype=dtype, cache_axes=())
    program = ap.serve_step(config, mesh, **kw)
    cache = shard_bytes(program.args[1])
    per_token = cache_bytes_per_token_per_layer(config, dtype) * config.num_hidden_layers
    bound = sum(lengths) * per_token

    def check(m: aot.Memory) -> str:
        held = cache + m.temp
        return (f"cache + temp {held / 2**30:.2f} GiB = {held / bound:.2f}x the bound sum(lengths) x {per_token} B = "
                f"{bound / 2**30:.2f} GiB ({sum(lengths)} tokens; {batch} x {long} would be "
                f"{batch * long * per_token / 2**30:.1f} GiB)")

    return Deployment(f"decode-ragged-{batch}-8x{target.upper()}", target, 8, _layout(shape, mesh, batch, ()),
                      [Planned(program, lambda: ap.serve_step(config, one, **kw))],
                      {"weights": shard_bytes(program.args[0]), "cache": cache}, check=check,
                      mem_fraction=mem_fraction)


def _shape(text: str) -> dict[str, int]:
    return parse_mesh(text)


PRESETS: dict[str, Callable[[int | None, float], Deployment]] = {
    "serve-119b-bf16-8xH100": lambda layers, f: serve("h100", _shape(SERVE_MESH), layers=layers, mem_fraction=f,
                                                      name="serve-119b-bf16-8xH100"),
    "serve-119b-bf16-8xH200": lambda layers, f: serve("h200", _shape(SERVE_MESH), layers=layers, mem_fraction=f,
                                                      name="serve-119b-bf16-8xH200"),
    "serve-119b-fp8-1xH200": lambda layers, f: serve("h200", _shape("data=1,expert=1,tensor=1"), layers=layers,
                                                     quantize="fp8", mem_fraction=f, name="serve-119b-fp8-1xH200"),
    "serve-119b-int4-1xH100": lambda layers, f: serve("h100", _shape("data=1,expert=1,tensor=1"), layers=layers,
                                                      quantize="int4", mem_fraction=f, name="serve-119b-int4-1xH100"),
    "finetune-small4-8xH100": lambda layers, f: finetune("h100", layers=layers, name="finetune-small4-8xH100",
                                                      mem_fraction=f),
    "finetune-small4-8xH200": lambda layers, f: finetune("h200", layers=layers, name="finetune-small4-8xH200",
                                                      mem_fraction=f),
    "grpo-small4-8xH100": lambda layers, f: grpo("h100", layers=layers, name="grpo-small4-8xH100", mem_fraction=f),
    "dpo-small4-8xH100": lambda layers, f: dpo("h100", layers=layers, name="dpo-small4-8xH100", mem_fraction=f),
    "serve-262k-prompt-8xH100": lambda layers, f: long_prompt("h100", layers, f),
    "decode-ragged-64-8xH100": lambda layers, f: ragged_decode("h100", layers, f),
}


# ----------------------------------------------------------------------------------------------------------------------
# Rows.
def memory_columns(dep: Deployment, program: ap.Program, c: aot.Compiled, ref: aot.Compiled | None) -> dict:
    """Resident items, temporaries, need vs limit, headroom (module docstring)."""
    m = c.memory
    device = aot.device_memory_bytes(dep.target)
    limit = int(dep.mem_fraction * device)
    unused = max(0, sum(dep.resident.values()) - m.argument)
    need = m.peak + unused
    return dict(**dep.resident, argument=m.argument, output=m.output, alias=m.alias, temp=m.temp,
                unused_resident=unused, need=need, limit=limit, device=device, fits=need <= limit,
                headroom=limit - need)


def cost_columns(dep: Deployment, program: ap.Program, c: aot.Compiled, ref: aot.Compiled | None) -> dict:
    """FLOPs and HBM bytes per step and device, and their ratio to the ideal (one device's total / devices)."""
    cost = c.cost
    out = dict(flops=cost.flops, hbm_bytes=cost.bytes, kernels=cost.kernel_calls)
    if ref is not None:
        total = ref.cost
        out.update(ideal_flops=total.flops / dep.devices, ideal_hbm_bytes=total.bytes / dep.devices,
                   flops_ratio=cost.flops * dep.devices / max(total.flops, 1.0),
                   hbm_ratio=cost.bytes * dep.devices / max(total.bytes, 1.0))
    return out


def per_token_columns(dep: Deployment, program: ap.Program, c: aot.Compiled, ref: aot.Compiled | None) -> dict:
    """For a serving deployment's decode step, per device and token at batch 1 and at the planned batch
    (`small4_jax.tools.token_cost`): bytes read (weights, cache), collectives per layer and per token, and the floor
    (bytes / HBM bandwidth + collectives x `token_cost.COLLECTIVE_LATENCY_S`)."""
    return dep.per_token(program, c) if dep.per_token is not None else {}


# A column builder: (deployment, program, compiled on the deployment's mesh, compiled on one device or None) -> fields.
ROW_COLUMNS: list[Callable[..., dict]] = [memory_columns, cost_columns, per_token_columns]


def program_row(dep: Deployment, planned: Planned, *, ideal: bool = True, compiled: aot.Compiled | None = None, reference: aot.Compiled | None = None) -> dict:
    """One row of the table: the program compiled for the deployment (and on one device for the ideal)."""
    def error(e):
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    try:
        c = compiled or planned.program.compile()
    except Exception as e:  # noqa: BLE001 - report it in the table, keep going
        return dict(deployment=dep.name, layout=dep.layout, program=planned.program.name, error=error(e))
    ref, unplanned = reference, ""
    try:
        ref = ref or (planned.reference().compile() if ideal and planned.reference else None)
    except Exception as e:  # noqa: BLE001 - the program's row without its ideal (e.g. XLA at one device's batch)
        unplanned = f"no ideal: the one-device program did not compile ({error(e)[:120]})"
    row = dict(deployment=dep.name, layout=dep.layout, program=planned.program.name, devices=dep.devices,
               cache_tokens=dep.cache_tokens)
    for column in ROW_COLUMNS:
        row.update(column(dep, planned.program, c, ref))
    checked = dep.check(c.memory) if dep.check is not None else ""
    row.update(seconds=round(c.seconds + (ref.seconds if ref else 0.0), 1),
               note="; ".join(filter(None, [dep.note, checked, unplanned, *c.notes])))
    return row


def table(rows: list[dict]) -> str:
    gib = lambda n: f"{n / 2**30:.1f}" if n else "-"  # noqa: E731
    head = ("| deployment | layout | program | weights GiB | cache GiB (tokens) | adapters GiB | draft GiB | temp GiB | "
            "need GiB | limit GiB (device) | headroom GiB | TFLOP / device (x ideal) | HBM GB / device (x ideal) | "
            "kernels | per token, batch 1 / planned: GB read, collectives per layer, floor ms |")
    out = [head, "|" + "---|" * 15]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['deployment']} | {r['layout']} | {r['program']} | compile error: {r['error']} |")
            continue
        ratio = lambda key: f" ({r[key]:.2f}x)" if key in r else ""  # noqa: E731
        tokens = f" ({r['cache_tokens'] / 1e6:.2f} M)" if r.get("cache_tokens") else ""
        adapters = r.get("lora slots", 0) + r.get("adapters+adam", 0)
        draft = r.get("draft", 0) + r.get("draft cache", 0)
        out.append(f"| {r['deployment']} | {r['layout']} | {r['program']} | {gib(r['weights'])} | "
                   f"{gib(r.get('cache', 0))}{tokens} | {gib(adapters)} | {gib(draft)} | {gib(r['temp'])} | "
                   f"{gib(r['need'])} | {gib(r['limit'])} ({gib(r['device'])}) | "
                   f"{gib(r['headroom'])}{'' if r['fits'] else ' (does NOT fit)'} | {r['flops'] / 1e12:.2f}"
                   f"{ratio('flops_ratio')} | {r['hbm_bytes'] / 1e9:.1f}{ratio('hbm_ratio')} | {r['kernels']} | "
                   f"{_per_token_text(r)} |")
    return "\n".join(out)


def _per_token_text(r: dict) -> str:
    parts = []
    for key in ("per_token_batch_1", "per_token_planned_batch"):
        t = r.get(key)
        if t:
            parts.append(f"{t['batch']} x {t['context']:,}: {t['read'] / 1e9:.2f} GB, {t['collectives_per_layer']}, "
                         f"{t['floor_ms']:.2f} ms")
    return " / ".join(parts) or "-"


# ----------------------------------------------------------------------------------------------------------------------
# Command line.
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every bad flag of the planner
        raise Small4Error(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m small4_jax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=aot.TARGETS, help="the GPUs: h100 (80 GB) or h200 (141 GB)")
    p.add_argument("--devices", type=int, help="GPUs in the job (the mesh's sizes multiply to it)")
    p.add_argument("--hosts", type=int, default=1, help="hosts the devices are spread over (default 1)")
    p.add_argument("--mesh", help=f"mesh over {', '.join(MESH_AXES)} (default data=1,expert=DEVICES,tensor=1)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="model config YAML to take the dimensions from (default configs/small4-119b.yaml)")
    src.add_argument("--checkpoint", help="checkpoint directory (config.json / params.json) to take them from")
    p.add_argument("--quantize", help="weight format as infer.serve takes it (fp8, int8, int4, int4-all)")
    p.add_argument("--max-model-len", type=int, help="longest sequence (infer.serve's flag)")
    p.add_argument("--max-batch", type=int, help="requests decoded together (infer.serve's flag)")
    p.add_argument("--prefill-chunk", type=int, help="infer.serve's flag")
    p.add_argument("--prefill-batch", type=int, help="infer.serve's flag")
    p.add_argument("--page-size", type=int, help="infer.serve's flag")
    p.add_argument("--cache-axes", help="mesh axes the cache is sharded over (default: the engine's; 'none')")
    p.add_argument("--shard-latent-proj", action="store_true", help=SHARD_LATENT_PROJ_HELP)
    p.add_argument("--lora", metavar="N:RANK", help="multi-LoRA serving: N adapter slots of rank <= RANK")
    p.add_argument("--lora-targets", help="modules the adapters may target (lora.targets spellings, comma-separated; "
                                          "default all)")
    p.add_argument("--speculative", metavar="eagle", help="speculative decoding with an EAGLE draft")
    p.add_argument("--draft", help="the EAGLE draft's directory, for its config (default: one decoder layer of the "
                                   "model's dims)")
    p.add_argument("--finetune", metavar="CONFIG", help="also plan train.finetune's step for this run config")
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), help="plan documented deployments instead")
    p.add_argument("--layers", type=int, help="compile this many layers instead of the model's (quick look)")
    p.add_argument("--mem-fraction", type=float, default=MEM_FRACTION, help="XLA_PYTHON_CLIENT_MEM_FRACTION")
    p.add_argument("--no-ideal", action="store_true", help="skip the one-device compiles (no x-ideal columns)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    a = p.parse_args(argv)
    if a.preset:
        return a
    if a.gpu is None or a.devices is None:
        raise Small4Error("--gpu and --devices are required (or --preset)")
    for flag in ("devices", "hosts", "max_model_len", "max_batch", "prefill_chunk", "prefill_batch", "page_size",
                 "layers"):
        v = getattr(a, flag)
        if v is not None and v <= 0:
            raise Small4Error(f"--{flag.replace('_', '-')} {v}: expected a positive integer")
    if a.lora is not None:
        n, colon, rank = a.lora.partition(":")
        if not (colon and n.isdigit() and rank.isdigit() and int(n) > 0 and int(rank) > 0):
            raise Small4Error(f"--lora {a.lora}: expected N:RANK (adapter slots and their largest rank), e.g. 4:16")
        a.lora = (int(n), int(rank))
    if a.speculative is not None and a.speculative != "eagle":
        raise Small4Error(f"--speculative {a.speculative}: the planner counts an EAGLE draft (--speculative eagle); "
                          "n-gram drafts hold no device memory")
    if a.devices % a.hosts:
        raise Small4Error(f"--hosts {a.hosts} does not divide --devices {a.devices}")
    a.shape = parse_mesh(a.mesh or f"data=1,expert={a.devices},tensor=1")
    if math.prod(a.shape.values()) != a.devices:
        raise Small4Error(f"--mesh {mesh_text(a.shape)} spans {math.prod(a.shape.values())} devices, not "
                          f"--devices {a.devices}")
    for path, flag in ((a.finetune, "--finetune"), (a.config, "--config"), (a.checkpoint, "--checkpoint"),
                       (a.draft, "--draft")):
        if path is not None and not Path(path).exists():
            raise Small4Error(f"{flag} {path}: no such file or directory")
    return a


def deployments(a: argparse.Namespace) -> list[Deployment]:
    if a.preset:
        return [PRESETS[name](a.layers, a.mem_fraction) for name in a.preset]
    config = load_config(a.config or a.checkpoint) if (a.config or a.checkpoint) else None
    flags = []
    for flag in ("max_model_len", "max_batch", "prefill_chunk", "prefill_batch", "page_size"):
        if getattr(a, flag) is not None:
            flags += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    cache_axes = None
    if a.cache_axes is not None:
        cache_axes = tuple(x.strip() for x in a.cache_axes.split(",") if x.strip() not in ("", "none"))
        for x in cache_axes:
            if x not in a.shape:
                raise Small4Error(f"--cache-axes: {x!r} is not an axis of the mesh {mesh_text(a.shape)}")
        cache_axes = tuple(x for x in cache_axes if a.shape[x] > 1)
    targets = None if a.lora_targets is None else tuple(t.strip() for t in a.lora_targets.split(",") if t.strip())
    out = [serve(a.gpu, a.shape, config=config, layers=a.layers, quantize=a.quantize, mem_fraction=a.mem_fraction,
                 hosts=a.hosts, engine_flags=tuple(flags), cache_axes=cache_axes, lora=a.lora, lora_targets=targets,
                 eagle=a.speculative == "eagle", draft_path=a.draft, shard_latent_proj=a.shard_latent_proj)]
    if a.finetune:
        out.append(finetune(a.gpu, a.finetune, shape=a.shape, layers=a.layers, hosts=a.hosts,
                            mem_fraction=a.mem_fraction))
    return out


def main(argv=None) -> int:
    try:
        a = parse_args(argv)
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok, why = aot.available()
    if not ok:
        print(f"error: deviceless GPU compile unavailable: {why}", file=sys.stderr)
        return 2
    rows = []
    t0 = time.perf_counter()
    try:
        for dep in deployments(a):
            for planned in dep.programs:
                rows.append(program_row(dep, planned, ideal=not a.no_ideal))
            print(f"# {dep.name}: planned ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    depth = f"{a.layers} layers (NOT the deployment)" if a.layers else "full depth"
    print(f"# per-device memory and work from compiled programs (jax {jax.__version__}, {depth}, limit = "
          f"{a.mem_fraction} x device memory)")
    print(table(rows))
    for r in rows:
        if r.get("note"):
            print(f"# {r['deployment']} / {r['program']}: {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
