"""Compile for H100 / H200 GPUs on a machine without one (deviceless ahead-of-time compilation).

With jax's CUDA plugin and ptxas installed at jaxlib's version (`python -m small4_jax.aot --install-plugin`),
`jax.experimental.topologies` hands out compile-only GPU devices described by an XLA `GpuTargetConfigProto`
(`assets/h100.txtpb`, `assets/h200.txtpb`: shared memory and registers per block, SM count, memory size). A
program lowered for a mesh of those devices and compiled runs XLA's real GPU pipeline (Pallas -> Triton IR -> PTX
-> ptxas for sm_90a, with the target's limits), and `memory_analysis()` gives its per-device bytes. This is how CI
checks, without a GPU, that every GPU program of ours compiles and how much memory it needs.

    mesh = aot.gpu_mesh("h200", {"data": 1, "expert": 8, "tensor": 1})
    x = aot.spec((4096, 4096), jnp.bfloat16, mesh, P("expert", None))
    c = aot.compile_for(f, x, mesh=mesh)
    c.memory.temp, c.uses_triton, c.seconds

Nothing here runs a program: arguments are `jax.ShapeDtypeStruct`s. Use it with `JAX_PLATFORMS=cpu` (the plugin
still registers its compiler); tests mark such checks `@pytest.mark.gpu_compile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from small4_jax.parallel.sharding import spec_for

TARGETS = ("h100", "h200")
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
TRITON_MARKER = "__gpu$xla.gpu.triton"  # custom-call target of a Pallas Triton kernel in lowered text
RAGGED_A2A_MARKER = "custom_call @ragged_all_to_all"  # jax.lax.ragged_all_to_all in lowered text


class AotUnavailable(RuntimeError):
    """Deviceless GPU compilation is not possible here (the CUDA plugin or ptxas is missing)."""


def target_config(target: str) -> str:
    """The `GpuTargetConfigProto` text of an H100 ("h100", SXM 80 GB) or H200 ("h200", 141 GB)."""
    if target not in TARGETS:
        raise ValueError(f"unknown GPU target {target!r}; expected one of {TARGETS}")
    return (_ASSETS / f"{target}.txtpb").read_text()


def device_memory_bytes(target: str) -> int:
    """The target's device memory (`device_memory_size` of its target config)."""
    for line in target_config(target).splitlines():
        line = line.strip()
        if line.startswith("device_memory_size:"):
            return int(line.split(":")[1])
    raise ValueError(f"{target}.txtpb has no device_memory_size")


@functools.cache
def gpu_devices(target: str = "h200", topology: str = "1x1x8") -> tuple:
    """Compile-only devices of `topology` (partitions x hosts x devices per host, e.g. "1x1x8", "2x1x8")."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target), topology=topology)
    except Exception as e:  # noqa: BLE001 - the plugin's errors vary by version; the message is what matters
        raise AotUnavailable(f"no deviceless CUDA compiler: {type(e).__name__}: {e}. "
                             "Install it with `python -m small4_jax.aot --install-plugin`, and run with "
                             "JAX_PLATFORMS=cpu on a machine without a GPU.") from e
    return tuple(topo.devices)


@functools.cache
def available() -> tuple[bool, str]:
    """(True, "") when programs can be compiled for GPUs here, else (False, why not)."""
    try:
        mesh = gpu_mesh("h100", {"x": 1}, topology="1x1x1")
        compile_for(lambda a: a * 2, spec((8,), np.float32, mesh, PartitionSpec()), mesh=mesh)
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def gpu_mesh(target: str, shape: dict[str, int], topology: str | None = None) -> Mesh:
    """A mesh with axes `shape` (e.g. {"data": 1, "expert": 8, "tensor": 1}) over compile-only GPU devices.

    topology defaults to one host holding prod(shape) devices; give "2x1x8" style strings for several hosts.
    """
    n = int(np.prod(list(shape.values())))
    devices = gpu_devices(target, topology or f"1x1x{n}")
    if len(devices) != n:
        raise ValueError(f"mesh {shape} needs {n} devices; topology {topology} has {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return Mesh(np.array(devices).reshape(tuple(shape.values())), tuple(shape), axis_types=auto)


def spec(shape: Sequence[int], dtype, mesh: Mesh, pspec: PartitionSpec | None = None) -> jax.ShapeDtypeStruct:
    """An abstract argument placed on `mesh` (replicated when pspec is None)."""
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype) if not hasattr(dtype, "dtype") else dtype,
                                sharding=NamedSharding(mesh, pspec or PartitionSpec()))


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of a compiled program (XLA's memory analysis)."""

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to arguments + temporaries: what the program holds at once, at most."""
        return self.argument + self.output - self.alias + self.temp


@dataclasses.dataclass
class Compiled:
    compiled: object  # jax.stages.Compiled
    text: str  # the lowered StableHLO
    memory: Memory
    seconds: float  # lower + compile wall time
    notes: list[str] = dataclasses.field(default_factory=list)  # how the compile deviated from a GPU's, if at all

    @property
    def uses_triton(self) -> bool:
        """Whether a Pallas Triton kernel is part of the program."""
        return TRITON_MARKER in self.text

    @property
    def triton_calls(self) -> int:
        """How many Pallas Triton kernel calls the program makes (call sites in the lowered text)."""
        return self.text.count(TRITON_MARKER)

    @property
    def uses_ragged_all_to_all(self) -> bool:
        """Whether the program exchanges rows with the real `ragged_all_to_all` (not the dense CPU stand-in)."""
        return RAGGED_A2A_MARKER in self.text

    @property
    def cost(self) -> Cost:
        """Per-device FLOPs and HBM bytes of one run (`cost_of` the compiled module)."""
        return cost_of(self.compiled)

    def written_arrays(self, min_bytes: int = 1) -> list[WrittenArray]:
        """The arrays the compiled program writes to device memory (`written_arrays` of its optimised HLO)."""
        return written_arrays(self.compiled.as_text(), min_bytes)


@dataclasses.dataclass(frozen=True)
class Cost:
    """One device's work in one run of a compiled program (`hlo_cost` of its optimised, partitioned module)."""

    flops: float  # of XLA's dots and convolutions, each times the runs of the loop holding it
    bytes: float  # read and written by the kernels XLA launches (operands + results of each), times their runs
    kernel_calls: int  # Pallas (Triton) kernel launches per run: in neither figure but for the bytes they write


def cost_of(compiled) -> Cost:
    """`hlo_cost` of a compiled program: what ONE device of its mesh runs (the module is SPMD-partitioned)."""
    return hlo_cost(compiled.as_text())


@dataclasses.dataclass(frozen=True)
class WrittenArray:
    """One output of an instruction of a compiled program that lands in device memory."""

    name: str  # the instruction
    op: str  # its opcode: fusion, copy, custom-call, ...
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    computation: str  # the computation it runs in
    # Times one run of the program writes it: 1 in the entry computation; in a while loop's body (e.g. a layer scan),
    # the loop's known trip count (times that of the computation holding the loop); None when XLA does not know it.
    writes: int | None


_ELEMENT_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "bf16": 16,
                 "f16": 16, "s16": 16, "u16": 16, "f32": 32, "s32": 32, "u32": 32, "f64": 64, "s64": 64, "u64": 64}
# Instructions that name, alias or route buffers other instructions wrote: they write nothing themselves.
_NO_WRITE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "while", "conditional", "call",
             "after-all", "opt-barrier"}


@dataclasses.dataclass
class _Module:
    """An optimised HLO module's text, parsed: its computations' instruction lines, which ones are fused or applied
    (inlined into another's kernel), and how many times one run of the program runs each (`runs`)."""

    computations: dict[str, list[str]]
    inlined: set[str]
    loops: dict[str, tuple[str, int | None]]  # while body / condition -> (computation holding it, trip count)
    callers: dict[str, str]  # fused / called computation -> the computation of the instruction that calls it

    def runs(self, computation: str, depth: int = 0) -> int | None:
        """Times one run of the program runs `computation`: 1 for the entry; a loop's body its known trip count times
        its holder's; a fused computation its caller's; None when a loop's trip count is unknown."""
        if depth > 32:
            return None
        if computation in self.loops:
            holder, trips = self.loops[computation]
            outer = self.runs(holder, depth + 1)
            return None if trips is None or outer is None else trips * outer
        if computation in self.callers:
            return self.runs(self.callers[computation], depth + 1)
        return 1


def _parse_module(hlo_text: str) -> _Module:
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
        if head:
            current = head.group(1)
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    inlined = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo_text))
    loops, callers = {}, {}
    for holder, lines in computations.items():
        for line in lines:
            loop = re.search(r" while\(.*condition=%([\w.\-]+), body=%([\w.\-]+)", line)
            if loop:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                n = int(trips.group(1)) if trips else None
                loops[loop.group(2)] = (holder, n)
                loops[loop.group(1)] = (holder, None if n is None else n + 1)
            for called in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
                callers.setdefault(called, holder)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            for called in re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else ():
                callers.setdefault(called, holder)
    return _Module(computations, inlined, loops, callers)


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(text)
            if dtype in _ELEMENT_BITS]


def _nbytes(arrays) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * _ELEMENT_BITS[dtype] // 8 for dtype, shape in arrays)


def hlo_cost(hlo_text: str) -> Cost:
    """FLOPs and bytes of one run of an optimised HLO module, counting each loop body as many times as it runs.

    XLA's own `HloCostAnalysis` counts a while body once (a scan over 36 layers as one layer, a chunked loss as one
    chunk), and a deviceless GPU executable does not answer `cost_analysis()` at all, so this reads the module's
    text. FLOPs: 2 x result elements x contracted size of every dot (in fused computations too; a convolution as
    the dot it is), times its computation's runs (`_Module.runs`; a loop of unknown trip count counts once).
    Element-wise arithmetic is left out (it is memory-bound: its cost is in bytes). Bytes: the operands and results
    of every kernel XLA launches (each instruction of an unfused computation that is not a buffer alias,
    `_NO_WRITE`), an in-place update (dynamic-update-slice, scatter) as its update read and written, times its runs.
    Pallas kernels (custom calls) count their launches and the bytes they write, not their FLOPs nor what they read
    (a page table's rows of the cache, one layer of a stack: known only to the kernel)."""
    module = _parse_module(hlo_text)
    roots = {}  # computation -> the opcode of its root instruction
    for computation, lines in module.computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m and line.lstrip().startswith("ROOT "):
                roots[computation] = m.group(3)
    flops = moved = 0.0
    kernels = 0
    for computation, lines in module.computations.items():
        runs = module.runs(computation) or 1
        shapes: dict[str, list] = {}
        fused = computation in module.inlined
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, result, op, rest = m.groups()
            shapes[name] = _arrays(result)
            if op in ("dot", "convolution"):
                operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
                lhs = shapes.get(operands[0], [(None, ())])[0][1] if operands else ()
                out = shapes[name][0][1] if shapes[name] else ()
                if op == "dot":
                    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                    contracted = [int(d) for d in dims.group(1).split(",") if d] if dims else []
                    k = int(np.prod([lhs[d] for d in contracted], dtype=np.int64)) if lhs else 1
                else:  # the kernel's spatial window x input features, read off the rhs
                    rhs = shapes.get(operands[1], [(None, ())])[0][1] if len(operands) > 1 else ()
                    k = int(np.prod(rhs, dtype=np.int64)) // max(out[-1] if out else 1, 1)
                flops += 2.0 * int(np.prod(out, dtype=np.int64)) * k * runs
            if fused or op in _NO_WRITE or op.endswith("-start"):  # an async pair counts at its -done
                continue
            result = _nbytes(shapes[name])
            if op == "custom-call" and TRITON_MARKER.split("$")[-1] in line:
                kernels += runs
                moved += result * runs  # what a Pallas kernel reads depends on the data: not counted
                continue
            operands = [_nbytes(shapes.get(o, [])) for o in re.findall(r"%([\w.\-]+)", rest.split("), ", 1)[0])]
            called = re.search(r"calls=%([\w.\-]+)", rest)
            root = roots.get(called.group(1)) if called and op == "fusion" else op
            if root in ("dynamic-update-slice", "scatter") and result in operands:  # in place: the update moves
                operands.remove(result)
                moved += 2 * sum(operands) * runs
            else:
                moved += (result + sum(operands)) * runs
    return Cost(flops, moved, kernels)


def written_arrays(hlo_text: str, min_bytes: int = 1) -> list[WrittenArray]:
    """The arrays of at least `min_bytes` that a compiled (optimised, scheduled) HLO module writes: every array
    output of an instruction in a computation that runs as a sequence of kernels (the entry, while bodies and
    conditions, branches), not inside a fusion (whose values stay in registers / shared memory) and not a buffer
    alias (`_NO_WRITE`). A per-layer weight slice found here in a scan's while body is copied every iteration.

    An asynchronous pair (`fusion-start` / `fusion-done`, `copy-start` / `copy-done`, ...; XLA of jaxlib 0.11 runs a
    scan's dynamic-slice copies so) writes its output once: it is counted at the `-done`, whose value is that output.
    The `-start`'s tuple only names the operands, the output in flight and a context."""
    module = _parse_module(hlo_text)
    out = []
    for computation, lines in module.computations.items():
        if computation in module.inlined:
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m or m.group(3) in _NO_WRITE or m.group(3).endswith("-start"):
                continue
            for dtype, shape in _arrays(m.group(2)):
                size = _nbytes([(dtype, shape)])
                if size >= min_bytes:
                    out.append(WrittenArray(m.group(1), m.group(3), shape, dtype, size, computation,
                                            module.runs(computation)))
    return out


COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                  "collective-permute", "collective-broadcast")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its op (async pairs counted once, by their `-done`), the bytes of its
    result on one device, the instruction and computation, and how many times one run of the program runs it
    (a layer scan's trip count inside the loop; None when XLA does not know it)."""

    op: str
    bytes: int
    name: str
    computation: str
    runs: int | None
    groups: str  # the replica groups text (which mesh axes it spans)


_GROUPS = r"replica_groups=(\S+(?: \{[^}]*\})?)"


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled (optimised) HLO module: synchronous ones (`all-reduce(`, ...) and the `-done`
    halves of asynchronous pairs (`all-reduce-start` / `-done`: one collective), in the entry, loop bodies and
    async wrappers, each with its run count (`Collective.runs`)."""
    module = _parse_module(hlo_text)
    ops = "|".join(re.escape(op) for op in COLLECTIVE_OPS)
    pattern = re.compile(rf"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ({ops})(-done)?\(")
    out = []
    for computation, lines in module.computations.items():
        for line in lines:
            m = pattern.match(line)
            if not m:
                continue
            groups = ""
            if m.group(4):  # the -done half: its start names the replica groups
                start = re.search(r"\(%([\w.\-]+)\)", line[m.end() - 1:])
                starter = next((s for s in lines if start and re.match(rf"\s*%{re.escape(start.group(1))} = ", s)),
                               "")
                g = re.search(_GROUPS, starter)
            else:
                g = re.search(_GROUPS, line)
            groups = g.group(1).rstrip(",") if g else ""
            out.append(Collective(m.group(3), _nbytes(_arrays(m.group(2))), m.group(1), computation,
                                  module.runs(computation), groups))
    return out


def _default_device(mesh: Mesh):
    # jax >= 0.11 resolves some placements against the default device: make it one of the target devices.
    return jax.default_device(mesh.devices.flat[0])


_CUDA_LIBRARIES = "Error loading CUDA libraries"
# A deviceless compile for the H100 target rewrites some sorts to CUB radix sorts, whose scratch size XLA then asks
# the CUDA runtime for: without a GPU that fails with "Error loading CUDA libraries" (the H200 target has no CUB data
# and falls back to XLA's own sort with a warning). Such programs are compiled again with XLA's sort.
_NO_CUB_SORT = {"xla_gpu_enable_cub_radix_sort": False}


def compile_for(fn: Callable, *args, mesh: Mesh, compiler_options: dict | None = None, **jit_kwargs) -> Compiled:
    """Lower `jax.jit(fn, **jit_kwargs)` on abstract `args` placed on `mesh` and compile it for the mesh's GPUs.

    `compiler_options`: XLA debug options for this program only (e.g. {"xla_gpu_enable_triton_gemm": False}), as
    `jax.stages.Lowered.compile(compiler_options=...)` takes them; an option this XLA lacks is an error.
    When XLA needs the CUDA runtime for a CUB sort (module comment above `_NO_CUB_SORT`), the program is compiled
    with XLA's own sort instead and `Compiled.notes` says so (memory then lacks the CUB sort's small scratch).
    """
    t0 = time.perf_counter()
    notes = []
    options = dict(compiler_options or {})
    with _default_device(mesh), jax.set_mesh(mesh):
        lowered = jax.jit(fn, **jit_kwargs).lower(*args)
        text = lowered.as_text()
        try:
            compiled = lowered.compile(compiler_options=options or None)
        except Exception as e:  # noqa: BLE001 - jax's runtime error type moved between versions
            if _CUDA_LIBRARIES not in str(e):
                raise
            compiled = lowered.compile(compiler_options={**options, **_NO_CUB_SORT})
            notes.append("compiled with XLA's sort: the CUB radix sort needs the CUDA runtime to size its scratch")
    m = compiled.memory_analysis()
    memory = Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                    int(m.temp_size_in_bytes))
    return Compiled(compiled, text, memory, time.perf_counter() - t0, notes)


def placed(state, mesh: Mesh, spec_fn: Callable | None = None, shard_latent_proj: bool = False):
    """An nnx State (e.g. of `model.abstract_model`) as abstract arguments on `mesh`, each leaf at the sharding
    `spec_fn(path, shape, mesh)` gives it (default `sharding.spec_for`, the rule every loader places weights by, with
    the `shard_latent_proj` layout option)."""
    from flax import nnx

    flat = []
    for path, value in nnx.to_flat_state(state):
        arr = value.get_raw_value() if hasattr(value, "get_raw_value") else value
        pspec = (spec_fn(path, arr.shape, mesh) if spec_fn is not None else
                 spec_for(path, arr.shape, mesh, dtype=arr.dtype, shard_latent_proj=shard_latent_proj))
        s = spec(arr.shape, arr.dtype, mesh, pspec)
        flat.append((path, value.replace(s) if hasattr(value, "replace") else s))
    return nnx.from_flat_state(flat)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


PTXAS = {12: "nvidia-cuda-nvcc-cu12<13", 13: "nvidia-cuda-nvcc>=13,<14"}  # ptxas of each CUDA generation


def install_plugin(cuda: int = 12) -> int:
    """pip-install jax's CUDA `cuda` plugin at this jaxlib's exact version, plus that CUDA generation's ptxas.

    12 is what CI compiles with; 13 is the GPU machines' own generation (`jax-cuda13-plugin`, CUDA 13's ptxas)."""
    import jaxlib

    if cuda not in PTXAS:
        raise ValueError(f"--cuda {cuda}: expected one of {sorted(PTXAS)}")
    v = jaxlib.__version__
    cmd = [sys.executable, "-m", "pip", "install", "-q", f"jax-cuda{cuda}-plugin=={v}", f"jax-cuda{cuda}-pjrt=={v}",
           PTXAS[cuda]]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m small4_jax.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--install-plugin", action="store_true", help="install the CUDA plugin and ptxas for this jaxlib")
    p.add_argument("--cuda", type=int, choices=sorted(PTXAS), default=12,
                   help="the CUDA generation of the plugin --install-plugin installs (default 12; the GPU machines: 13)")
    p.add_argument("--check", action="store_true", help="say whether deviceless GPU compilation works here")
    a = p.parse_args(argv)
    if a.install_plugin:
        rc = install_plugin(a.cuda)
        if rc:
            return rc
    if os.environ.get("JAX_PLATFORMS") != "cpu" or a.install_plugin:
        # The plugin registers when jax is imported, and needs the CPU platform where no GPU driver is present:
        # check in a fresh process.
        return subprocess.call([sys.executable, "-m", "small4_jax.tools.aot", "--check"],
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    ok, why = available()
    print("deviceless GPU compile: " + ("available" if ok else f"unavailable ({why})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
