"""Per-device memory of the documented deployments, from compiled GPU programs (deviceless, `small4_jax/tools/aot.py`).

    JAX_PLATFORMS=cpu python benchmarks/memory_plan.py                  # every deployment, full depth (minutes)
    JAX_PLATFORMS=cpu python benchmarks/memory_plan.py --only serve-119b-bf16-8xH200 --layers 2   # quick look

Each deployment is a row of `DEPLOYMENTS`, built by a small function that returns the programs that run on it (the
largest of each kind) and what stays resident beside them. A program's per-device need is XLA's memory analysis of
the compiled program: arguments + outputs not aliased to arguments + temporaries, plus resident bytes the program
does not take (weights jit dropped as unused, e.g. the vision tower in a text step); a deployment needs the largest of
its programs. It fits when that is within the allocator's limit: XLA_PYTHON_CLIENT_MEM_FRACTION (0.92, what
launch/slurm and launch/k8s set) of the device's memory. Headroom is limit - need.

Deployments (add one by writing a function and listing it in DEPLOYMENTS):
    serve-119b-bf16-8xH100 / 8xH200   `infer.serve` at its default flags with the README's mesh (data=1, expert=8):
        weights, the paged cache the engine allocates by default (90% of what the allocator has free after the
        weights, `Engine.__init__`), and the largest prefill step ([prefill_batch, prefill_chunk]) and decode step
        ([max_batch, 1]), both over the widest page table (max_model_len / page_size pages); and the vision
        encoder + projector on one 1540 x 1540 image (12,100 patches, flash attention with image segments), which
        runs before a prompt with images is prefilled.
    serve-119b-fp8-1xH200 / serve-119b-int4-1xH100   the same on ONE GPU with `--quantize fp8` (the release's FP8
        weights kept, small4_jax.quant.formats) / `--quantize int4` (routed experts int4 in groups of 128, dense linears
        int8 per channel: quant.POLICIES): the whole model on one device.
    finetune-small4-8xH100 / 8xH200   `train.finetune --config configs/finetune-small4.yaml` on its mesh: frozen
        bf16 base, fp32 adapters + AdamW state, one train step (grad_accum x micro-batch x seq_len, remat as set).
    serve-262k-prompt-8xH100   one 262,144-token prompt at the default serve flags: the cache the engine allocates
        holds its 16,384 pages, and the prefill step that reads the whole prefix (its last chunks: [prefill_batch,
        prefill_chunk] over the 16,384-page table; absorbed MLA over the pages, no prefix re-expansion) fits.
    decode-ragged-64-8xH100   a decode step at batch 64 with one 262,144-token row and 63 rows of 1,024 (serve mesh):
        the cache holds exactly those rows' pages, and cache + temporaries are printed beside the bound
        sum(row lengths) x cache bytes per token (within 2x), not 64 x 256K (the attention reads each row's own
        pages: the split-KV kernel, kernels/mla_decode).

`--layers N` compiles N layers instead of the config's (quick, not the deployment). moe_impl is "auto" (the Pallas
kernel on these GPUs). `jax.lax.ragged_dot` is no memory rescue: compiled for a GPU (jax 0.10.2) it computes every
expert for every row, with [rows, E, N] temporaries (8.0 GiB at 8192 rows x 4096 -> 4096 and 128 experts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from small4_jax.tools import aot  # noqa: E402
from small4_jax.tools import aot_programs as ap  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "configs" / "small4-119b.yaml"
FINETUNE = ROOT / "configs" / "finetune-small4.yaml"
SERVE_MESH = "data=1,expert=8,tensor=1"  # the README's serving command
MEM_FRACTION = 0.92  # XLA_PYTHON_CLIENT_MEM_FRACTION in launch/slurm/*.sbatch and launch/k8s


@dataclasses.dataclass
class Plan:
    """One deployment: the programs that run on it; `resident` names what their arguments hold (for the table)."""

    name: str
    target: str
    programs: list[ap.Program]
    resident: dict[str, int]  # e.g. {"weights": bytes, "cache": bytes} per device
    note: str = ""
    check: Callable[[aot.Memory], str] | None = None  # a line on the compiled memory, added to the note


def _shard_bytes(tree) -> int:
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _mesh_shape(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


def serve_plan(target: str, layers: int | None, mem_fraction: float, quantize: str | None = None,
               mesh_text: str = SERVE_MESH) -> Plan:
    """`infer.serve --checkpoint DIR --mesh MESH [--quantize Q]` at the default engine flags (bf16 unless Q)."""
    from infer.engine.engine import MAX_CONTEXT, free_device_memory_after, pages_for_memory
    from infer.serve import parse_args
    from small4_jax.config import Small4Config

    args = parse_args(["--config", str(MODEL), "--mesh", mesh_text] + (["--quantize", quantize] if quantize else []))
    config = Small4Config.from_yaml(MODEL)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    dtype = args.dtype or "bfloat16"
    shape = _mesh_shape(mesh_text)
    n = int(np.prod(list(shape.values())))
    mesh = aot.gpu_mesh(target, shape, topology=None if n == 8 else f"1x1x{n}")
    weights = _shard_bytes(ap.abstract_placed_model(config, mesh, dtype, quantize)[1])
    limit = int(mem_fraction * aot.device_memory_bytes(target))
    max_len = args.max_model_len or min(config.max_position_embeddings, MAX_CONTEXT)
    table = -(-max_len // args.page_size)
    num_pages = args.num_pages or pages_for_memory(config, dtype, free_device_memory_after(limit, weights),
                                                   args.page_size)
    note = ""
    if num_pages - 1 < table:
        note = f"the engine refuses to start: {num_pages - 1} pages < one {max_len}-token sequence ({table} pages)"
        num_pages = table + 1
    common = dict(table_pages=table, num_pages=num_pages, page_size=args.page_size, dtype=dtype, quantize=quantize)
    programs = [
        ap.serve_step(config, mesh, absorbed=True, rows=args.prefill_batch, tokens=args.prefill_chunk, **common),
        ap.serve_step(config, mesh, absorbed=True, rows=args.max_batch, tokens=1, **common),
    ]
    if config.vision is not None:  # a prompt's images are encoded (one 1540 x 1540 image: 12,100 patches) first
        programs.append(ap.vision_encode(config, mesh, ((1540, 1540),), dtype=dtype))
    cache = _shard_bytes(programs[0].args[1])
    note = "; ".join(filter(None, [note, f"{(num_pages - 1) * args.page_size} cache tokens"]))
    return Plan(f"serve-119b-{quantize or 'bf16'}-{n}x{target.upper()}", target, programs,
                {"weights": weights, "cache": cache}, note)


def finetune_plan(target: str, layers: int | None, mem_fraction: float) -> Plan:
    """`train.finetune --config configs/finetune-small4.yaml`: one step at the config's batch, on its mesh."""
    from train.config import load

    run = load(FINETUNE)
    if layers:
        run = dataclasses.replace(run, model=run.model.replace(num_hidden_layers=layers))
    mesh = aot.gpu_mesh(target, dict(run.train.mesh))
    program = ap.lora_train_step(run, mesh)
    params, opt_state, _, frozen = program.args[:4]
    return Plan(f"finetune-small4-8x{target.upper()}", target, [program],
                {"weights": _shard_bytes(frozen), "adapters+adam": _shard_bytes((params, opt_state))})


def long_prompt_plan(target: str, layers: int | None, mem_fraction: float) -> Plan:
    """One 262,144-token prompt at the default serve flags: its pages fit the default cache, its prefill step fits."""
    plan = serve_plan(target, layers, mem_fraction)
    prefill = plan.programs[0]
    num_pages = prefill.args[1].shape[1]
    page_size = prefill.args[1].shape[2]
    need = -(-262_144 // page_size)
    fits = f"holds {num_pages - 1} pages >= {need}" if num_pages - 1 >= need else f"only {num_pages - 1} < {need} pages"
    note = "; ".join(filter(None, [plan.note, f"262,144-token prompt: the cache {fits}, prefilled in "
                                              f"{262_144 // prefill.args[2].shape[1]} chunks of this step"]))
    return Plan(f"serve-262k-prompt-8x{target.upper()}", target, [prefill], plan.resident, note)


def ragged_decode_plan(target: str, layers: int | None, mem_fraction: float, batch: int = 64,
                       long: int = 262_144, short: int = 1024) -> Plan:
    """A decode step over one `long` row and batch - 1 `short` rows: the cache holds exactly their pages."""
    from infer.engine.engine import MAX_CONTEXT
    from small4_jax.config import Small4Config
    from small4_jax.nn.paged import cache_bytes_per_token_per_layer

    config = Small4Config.from_yaml(MODEL)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    page_size, dtype = 16, "bfloat16"  # the serve defaults
    lengths = [long] + [short] * (batch - 1)
    pages = sum(-(-n // page_size) for n in lengths) + 1  # + the null page
    table = -(-min(config.max_position_embeddings, MAX_CONTEXT) // page_size)
    mesh = aot.gpu_mesh(target, _mesh_shape(SERVE_MESH))
    program = ap.serve_step(config, mesh, absorbed=True, rows=batch, tokens=1, table_pages=table, num_pages=pages,
                            page_size=page_size, dtype=dtype)
    weights = _shard_bytes(program.args[0])
    cache = _shard_bytes(program.args[1])
    per_token = cache_bytes_per_token_per_layer(config, dtype) * config.num_hidden_layers
    bound = sum(lengths) * per_token
    dense = batch * long * per_token

    def check(m: aot.Memory) -> str:
        held = cache + m.temp
        return (f"cache + temp {held / 2**30:.2f} GiB = {held / bound:.2f}x the bound sum(lengths) x "
                f"{per_token} B = {bound / 2**30:.2f} GiB ({sum(lengths)} tokens; {batch} x {long} would be "
                f"{dense / 2**30:.1f} GiB)")

    return Plan(f"decode-ragged-{batch}-8x{target.upper()}", target, [program], {"weights": weights, "cache": cache},
                check=check)


DEPLOYMENTS: dict[str, Callable[[int | None, float], Plan]] = {
    "serve-119b-bf16-8xH100": lambda layers, f: serve_plan("h100", layers, f),
    "serve-119b-bf16-8xH200": lambda layers, f: serve_plan("h200", layers, f),
    "serve-119b-fp8-1xH200": lambda layers, f: serve_plan("h200", layers, f, "fp8", "data=1,expert=1,tensor=1"),
    "serve-119b-int4-1xH100": lambda layers, f: serve_plan("h100", layers, f, "int4", "data=1,expert=1,tensor=1"),
    "finetune-small4-8xH100": lambda layers, f: finetune_plan("h100", layers, f),
    "finetune-small4-8xH200": lambda layers, f: finetune_plan("h200", layers, f),
    "serve-262k-prompt-8xH100": lambda layers, f: long_prompt_plan("h100", layers, f),
    "decode-ragged-64-8xH100": lambda layers, f: ragged_decode_plan("h100", layers, f),
}


def measure(plan: Plan, mem_fraction: float) -> list[dict]:
    """One row per program of the plan, each compiled for the plan's GPUs."""
    device = aot.device_memory_bytes(plan.target)
    limit = int(mem_fraction * device)
    rows = []
    for program in plan.programs:
        try:
            c = program.compile()
        except Exception as e:  # noqa: BLE001 - report it in the table, keep going
            rows.append(dict(deployment=plan.name, program=program.name, error=f"{type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}"))
            continue
        checked = plan.check(c.memory) if plan.check is not None else ""
        rows.append(row(plan, program.name, c.memory, limit, device, seconds=round(c.seconds, 1),
                        triton=c.uses_triton, note="; ".join(filter(None, [plan.note, checked, *c.notes]))))
    return rows


def row(plan: Plan, program: str, m: aot.Memory, limit: int, device: int, **extra) -> dict:
    """A table row. Need = the program's peak plus resident bytes it does not take as arguments: jit drops unused
    arguments (the vision tower in a text step), but the engine keeps them on the device."""
    unused = max(0, sum(plan.resident.values()) - m.argument)
    need = m.peak + unused
    return dict(deployment=plan.name, program=program, **plan.resident, argument=m.argument, output=m.output,
                alias=m.alias, temp=m.temp, unused_resident=unused, need=need, limit=limit, device=device,
                fits=need <= limit, headroom=limit - need, **extra)


def table(rows: list[dict]) -> str:
    gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
    head = ("| deployment | program | weights GiB | cache GiB | temp GiB | need GiB | limit GiB (device) | fits | "
            "headroom GiB |")
    out = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['deployment']} | {r['program']} | | | | | | compile error | {r['error']} |")
            continue
        cache = r.get("cache", r.get("adapters+adam", 0))
        out.append(f"| {r['deployment']} | {r['program']} | {gib(r['weights'])} | {gib(cache)} | {gib(r['temp'])} | "
                   f"{gib(r['need'])} | {gib(r['limit'])} ({gib(r['device'])}) | {'yes' if r['fits'] else 'NO'} | "
                   f"{gib(r['headroom'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(DEPLOYMENTS), help="deployments to plan (default: all)")
    p.add_argument("--layers", type=int, help="compile this many layers instead of the config's (quick look)")
    p.add_argument("--mem-fraction", type=float, default=MEM_FRACTION, help="XLA_PYTHON_CLIENT_MEM_FRACTION")
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    ok, why = aot.available()
    if not ok:
        print(f"deviceless GPU compile unavailable: {why}", file=sys.stderr)
        return 2
    rows = []
    t0 = time.perf_counter()
    for name in a.only or DEPLOYMENTS:
        plan = DEPLOYMENTS[name](a.layers, a.mem_fraction)
        rows += measure(plan, a.mem_fraction)
        print(f"# {name}: planned ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    depth = f"{a.layers} layers (NOT the deployment)" if a.layers else "full depth"
    print(f"# per-device memory from compiled programs (jax {jax.__version__}, {depth}, limit = "
          f"{a.mem_fraction} x device memory)")
    print(table(rows))
    for r in rows:
        if r.get("note"):
            print(f"# {r['deployment']} / {r['program']}: {r['note']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
