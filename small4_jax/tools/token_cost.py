"""Per-token accounting of a compiled decode step: what each device reads, which collectives it waits for, and the
floor those imply on a GPU. The latency planner's row (`decode_row`; `python -m small4_jax.tools.token_cost`).

    bytes read per device   the step's arguments as the compiled program holds them (each weight's shard from the
                            input shardings), read once per token, except the routed experts (the expected share a
                            batch of B tokens routes to: U(B) / E with U(B) = E (1 - (1 - k / E)^B)) and the embedding
                            table (B rows); plus the cache rows the batch's sequences hold on the device
    collectives             every collective of the compiled HLO (`aot.collectives`), with its run count: those in
                            the layer scan's loop body run once per layer, the rest once per token
    floor                   bytes / HBM bandwidth + collectives x a per-collective latency (`COLLECTIVE_LATENCY_S`)

Why not XLA's cost analysis: a deviceless (compile-only) CUDA executable returns none (`compiled.cost_analysis()`
is None for the compile-only GPU client in jax 0.10.2), and where it exists it counts a custom call's operands
whole, i.e. every expert of the whole layer stack for the grouped-matmul kernel, which reads only the routed ones.
The argument shardings are exact; a program that gathers weights it should read locally shows up in the
collectives (their bytes), not in this count.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
from flax import nnx

from infer.cli import SHARD_LATENT_PROJ_HELP
from small4_jax.config import load_config
from small4_jax.nn.paged import cache_width
from small4_jax.parallel.sharding import parse_mesh
from small4_jax.tools import aot
from small4_jax.tools.aot_programs import serve_step

HBM_BYTES_PER_S = {"h100": 3.35e12, "h200": 4.8e12}  # spec sheet (PERFORMANCE.md)
COLLECTIVE_LATENCY_S = 5e-6  # per collective on 8 GPUs of one NVLink node: the middle of the 3-10 us range (issue 21)
_IMAGE_MODULES = ("vision_tower", "multi_modal_projector")
_EXPERT_LEAVES = ("gate_up", "down", "gate_up_scale", "down_scale", "gate_up_act_scale", "down_act_scale")


def routed_share(num_experts: int, top_k: int, tokens: int) -> float:
    """The expected fraction of experts `tokens` tokens route to: U(B) / E, U(B) = E (1 - (1 - k / E)^B)."""
    return 1.0 - (1.0 - top_k / num_experts) ** tokens


def _shard_bytes(leaf) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def weight_reads(state, config, tokens: int) -> tuple[int, int]:
    """(bytes one device reads of the weights in one decode step of `tokens` tokens, bytes one device would read
    if it held every weight whole): the denominators' "weights" is the second over the device count. The vision
    tower and projector are not counted: a decode step reads only the text model."""
    share = routed_share(config.n_routed_experts, config.num_experts_per_tok, tokens)
    device = whole = 0
    for path, value in nnx.to_flat_state(state):
        leaf = value.get_raw_value() if hasattr(value, "get_raw_value") else value
        names = [str(p) for p in path]
        if names[0] in _IMAGE_MODULES:  # a text decode step never reads them (jit drops them)
            continue
        full = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        part = _shard_bytes(leaf)
        if len(names) >= 2 and names[-2] == "experts" and names[-1] in _EXPERT_LEAVES:
            full, part = full * share, part * share
        elif "embed_tokens" in names:  # a lookup: the rows of the step's tokens
            row = full / leaf.shape[0]
            full = part = row * tokens
        device += part
        whole += full
    return int(device), int(whole)


@dataclasses.dataclass
class TokenCost:
    """One row of the latency plan: a decode step of `batch` sequences of `context` tokens on `mesh`."""

    target: str
    mesh: str
    context_axes: str
    batch: int
    context: int
    weights_read: int  # bytes per device per step
    weights_ideal: int  # the weights one device would read whole / devices
    cache_read: int  # bytes per device per step (the cache rows the batch holds there)
    cache_ideal: int  # the batch's cache / devices
    collectives_per_layer: int
    collectives_per_token: int  # all of them: per layer x layers + the rest
    collective_bytes: int  # per token, one device's results
    layers: int
    shard_latent_proj: bool = False  # the latent projections split over `tensor` (`--shard-latent-proj`)

    @property
    def read(self) -> int:
        return self.weights_read + self.cache_read

    @property
    def ratio(self) -> float:
        """What a device reads over (weights / devices + its cache share): 1.0 is a perfect split."""
        return self.read / (self.weights_ideal + self.cache_ideal)

    def floor_s(self) -> float:
        return self.read / HBM_BYTES_PER_S[self.target] + self.collectives_per_token * COLLECTIVE_LATENCY_S

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), read=self.read, ratio=round(self.ratio, 3),
                    floor_ms=round(self.floor_s() * 1e3, 3),
                    tokens_per_s=round(self.batch / self.floor_s(), 1))


def per_layer_collectives(hlo_text: str, layers: int) -> tuple[int, int, int]:
    """(collectives each layer runs, collectives per token, their bytes per token) of a compiled decode step whose
    layers run in one scan of `layers` iterations (`aot.collectives`)."""
    found = aot.collectives(hlo_text)
    per_layer = sum(1 for c in found if c.runs == layers and layers > 1)
    total = sum(c.runs or 1 for c in found)
    return per_layer, total, sum(c.bytes * (c.runs or 1) for c in found)


def decode_row(config, target: str, mesh_shape: dict[str, int], *, batch: int = 1, context: int = 4096,
               quantize: str | None = "fp8", context_axes: tuple[str, ...] = (), cache_axes: tuple[str, ...] = (),
               page_size: int = 64, dtype="bfloat16", shard_latent_proj: bool = False) -> tuple[TokenCost, aot.Compiled]:
    """Compile the engine's decode step deviceless for `target` on `mesh_shape` (batch rows at `context` tokens each,
    the cache's pages sharded over `context_axes` by position or over `cache_axes` by row; `shard_latent_proj`: the
    latent projections split over `tensor`, `sharding.spec_for`) and account for it."""
    mesh = aot.gpu_mesh(target, mesh_shape)
    shards = math.prod(mesh_shape[a] for a in tuple(context_axes) + tuple(cache_axes))
    pages_per_seq = math.ceil(context / page_size)
    table = -(-pages_per_seq // shards) * shards if context_axes else pages_per_seq
    rows = batch
    num_pages = shards * (math.ceil(rows * pages_per_seq / shards) + 1)
    program = serve_step(config, mesh, absorbed=True, rows=rows, tokens=1, table_pages=table, num_pages=num_pages,
                         page_size=page_size, dtype=dtype, quantize=quantize, context_axes=tuple(context_axes),
                         cache_axes=tuple(cache_axes), shard_latent_proj=shard_latent_proj)
    return account(config, target, mesh_shape, program, program.compile(), batch=batch, context=context,
                   context_axes=context_axes, cache_axes=cache_axes, dtype=dtype,
                   shard_latent_proj=shard_latent_proj)


def account(config, target: str, mesh_shape: dict[str, int], program, compiled: aot.Compiled, *, batch: int,
            context: int, context_axes: tuple[str, ...] = (), cache_axes: tuple[str, ...] = (), dtype="bfloat16",
            shard_latent_proj: bool = False) -> tuple[TokenCost, aot.Compiled]:
    """The row of a compiled decode step (`aot_programs.serve_step` with `batch` rows, its weights the program's
    first argument): each row at `context` tokens, the cache split over `context_axes` / `cache_axes`. The planner
    accounts for its own decode step with this (`small4_jax.plan`)."""
    devices = math.prod(mesh_shape.values())
    shards = math.prod(mesh_shape[a] for a in tuple(context_axes) + tuple(cache_axes))
    weights_read, whole = weight_reads(program.args[0], config, batch)
    cache_bytes = batch * context * config.num_hidden_layers * cache_width(config) * np.dtype(dtype).itemsize
    # cache rows per device: split over the cache's shards (by position or by row), replicated over the other axes
    per_layer, total, coll_bytes = per_layer_collectives(compiled.compiled.as_text(), config.num_hidden_layers)
    text = ",".join(f"{k}={v}" for k, v in mesh_shape.items())
    return TokenCost(target, text, ",".join(context_axes), batch, context, weights_read, whole // devices,
                     cache_bytes // shards, cache_bytes // devices, per_layer, total, coll_bytes,
                     config.num_hidden_layers, shard_latent_proj), compiled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m small4_jax.tools.token_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/small4-119b.yaml")
    p.add_argument("--target", choices=sorted(HBM_BYTES_PER_S), default="h100")
    p.add_argument("--mesh", default="tensor=8")
    p.add_argument("--context-axes", default="", help="mesh axes one sequence's cache is split over by position")
    p.add_argument("--cache-axes", default="", help="mesh axes the rows' caches are split over (data parallel)")
    p.add_argument("--shard-latent-proj", action="store_true", help=SHARD_LATENT_PROJ_HELP)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--quantize", default="fp8")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (compile time); figures scale per layer")
    a = p.parse_args(argv)
    if os.environ.get("JAX_PLATFORMS") != "cpu":  # the compile-only CUDA client registers on the CPU platform
        args = sys.argv[1:] if argv is None else argv
        return subprocess.call([sys.executable, "-m", "small4_jax.tools.token_cost", *args],
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    config = load_config(a.config)
    config = dataclasses.replace(config, vision=None, **({"num_hidden_layers": a.layers} if a.layers else {}))
    axes = tuple(x for x in a.context_axes.split(",") if x)
    cache_axes = tuple(x for x in a.cache_axes.split(",") if x)
    for b in a.batch:
        row, compiled = decode_row(config, a.target, parse_mesh(a.mesh), batch=b, context=a.context,
                                   quantize=None if a.quantize == "none" else a.quantize, context_axes=axes,
                                   cache_axes=cache_axes, shard_latent_proj=a.shard_latent_proj)
        d = row.as_dict()
        d["temp_gib"] = round(compiled.memory.temp / 2**30, 3)
        d["argument_gib"] = round(compiled.memory.argument / 2**30, 3)
        print(d, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
