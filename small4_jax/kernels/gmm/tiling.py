"""Block sizes of the grouped-matmul kernels, chosen from static shapes: decode tiles and prefill tiles.

Decode (few rows per group, bandwidth-bound: the cost is streaming each touched expert's weights once) uses narrow
row tiles (16, Triton's smallest dot) and splits K across programs so that a handful of experts still fills the
GPU. One group of at most 64 rows (a dense projection read in place at decode, `moe.AtLayer.matmul`) gets one row
tile covering them all, so its weight is streamed once, and the same split of K. Prefill (hundreds of rows per
group, compute-bound) uses 128x128 output tiles.

These numbers are starting points written without a GPU at hand: they respect Triton's constraints (powers of two,
every dot dimension >= 16) but have not been tuned. `benchmarks/moe_gmm.py` is where they get measured.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_MIN = 16  # Triton's smallest dot dimension
_DECODE_ROWS_PER_GROUP = 64  # below this average, a call is bandwidth-bound: use the decode tiling
_TARGET_PROGRAMS = 528  # ~4 programs per SM on a 132-SM Hopper part, for choosing split-K at decode
_ONE_GROUP_PARTIAL_ROWS = 256  # one group at decode: at most this many rows of float32 split-K partials


@dataclasses.dataclass(frozen=True)
class GmmTiling:
    """Block sizes and Triton launch parameters. `split_k` > 1 splits the K loop across programs (gmm only)."""

    block_m: int
    block_k: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n", "split_k"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"GmmTiling.{name} = {v}: must be a power of two")
        for name in ("block_m", "block_k", "block_n"):
            if getattr(self, name) < _MIN:
                raise ValueError(f"GmmTiling.{name} = {getattr(self, name)}: must be >= {_MIN} (Triton dot)")


def _pow2_at_most(cap: int, dim: int) -> int:
    """The smallest power of two covering `dim`, capped at `cap`, at least 16."""
    p = _MIN
    while p < dim and p < cap:
        p *= 2
    return p


def is_decode(m: int, num_groups: int) -> bool:
    return m < _DECODE_ROWS_PER_GROUP * num_groups


def gmm_tiling(m: int, k: int, n: int, num_groups: int, dtype) -> GmmTiling:
    """Tiling for gmm of lhs [m, k] by rhs [num_groups, k, n] (the transposed-rhs call uses the same)."""
    wide = jnp.dtype(dtype).itemsize >= 4
    one_tile = num_groups == 1 and m <= _DECODE_ROWS_PER_GROUP  # a dense projection at decode (moe.AtLayer.matmul)
    if is_decode(m, num_groups) or one_tile:
        # One group: all its rows in one row tile, so the weight is streamed once (16-row tiles would read it
        # ceil(m / 16) times); 64 rows keep the accumulator at 32 registers a thread. Its K split is capped at
        # split x rows <= 256: the float32 partials [split, m, n] (written, then summed by XLA) stay within 1/8 of a
        # bf16 weight of K = 4096 rows.
        bm = _pow2_at_most(_DECODE_ROWS_PER_GROUP, m) if one_tile else 16
        bk = _pow2_at_most(64 if wide else 128, k)
        bn = _pow2_at_most(64, n)
        programs = max(1, min(m, num_groups)) * -(-n // bn)
        split = 1
        while (programs * split < _TARGET_PROGRAMS and k // (2 * split * bk) >= 2
               and not (one_tile and 2 * split * bm > _ONE_GROUP_PARTIAL_ROWS)):
            split *= 2
        return GmmTiling(block_m=bm, block_k=bk, block_n=bn, split_k=split, num_warps=4, num_stages=4)
    return GmmTiling(
        block_m=_pow2_at_most(128, m), block_k=_pow2_at_most(32 if wide else 64, k), block_n=_pow2_at_most(128, n),
        split_k=1, num_warps=8, num_stages=3,
    )


def tgmm_tiling(m: int, k: int, n: int, num_groups: int, dtype) -> GmmTiling:
    """Tiling for tgmm (per-group lhs^T @ rhs -> [num_groups, k, n]); block_m is the row chunk of its inner loop."""
    wide = jnp.dtype(dtype).itemsize >= 4
    bm = 16 if is_decode(m, num_groups) else (32 if wide else 64)
    return GmmTiling(block_m=bm, block_k=_pow2_at_most(64, k), block_n=_pow2_at_most(64 if wide else 128, n),
                     num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------------------------------------------------
# The target's limits, and what a tiling asks of them.
@dataclasses.dataclass(frozen=True)
class GpuLimits:
    """Per-block limits of a GPU (fields of XLA's `GpuTargetConfigProto`, `small4_jax/assets/*.txtpb`)."""

    shared_memory_per_block: int  # bytes a block may opt in to (shared_memory_per_block_optin)
    registers_per_block: int
    threads_per_block: int
    block_dim_limit_y: int = 65535  # grid dims 1 and 2 (column tiles, K splits); dim 0 allows 2^31 - 1
    block_dim_limit_z: int = 65535
    registers_per_thread: int = 255  # NVIDIA's per-thread cap (sm_50 and later)

    @classmethod
    def from_target_config(cls, text: str) -> GpuLimits:
        fields = {}
        for line in text.splitlines():
            key, _, value = line.strip().partition(":")
            if value.strip().isdigit():
                fields.setdefault(key, int(value))
        return cls(fields["shared_memory_per_block_optin"], fields["registers_per_block_limit"],
                   fields["threads_per_block_limit"], fields["block_dim_limit_y"], fields["block_dim_limit_z"])


HOPPER = GpuLimits(shared_memory_per_block=232448, registers_per_block=65536, threads_per_block=1024)  # H100, H200
_ACC_REGISTERS = 128  # float32 accumulator registers per thread we allow: the rest holds operands and addresses


def resources(t: GmmTiling, dtype, kind: str = "gmm") -> dict[str, int]:
    """What one program of the kernel asks for, as Triton lays it out:

    shared_memory  num_stages pipelined copies of both operand tiles (gmm: [bm, bk] and [bk, bn]; tgmm: [bm, bk]
                   and [bm, bn]): the figure Triton requests (tests/test_gpu_compile.py checks it against the
                   compiler's own "requested N" on an oversized tiling)
    acc_registers  float32 accumulator elements per thread ([bm, bn] for gmm, [bk, bn] for tgmm)
    threads        32 * num_warps
    """
    size = jnp.dtype(dtype).itemsize
    threads = 32 * t.num_warps
    if kind == "gmm":
        operands, acc = t.block_m * t.block_k + t.block_k * t.block_n, t.block_m * t.block_n
    elif kind == "tgmm":
        operands, acc = t.block_m * t.block_k + t.block_m * t.block_n, t.block_k * t.block_n
    else:
        raise ValueError(f"kind must be 'gmm' or 'tgmm', got {kind!r}")
    return {"shared_memory": t.num_stages * operands * size, "acc_registers": -(-acc // threads),
            "threads": threads}


def check_tiling(t: GmmTiling, dtype, limits: GpuLimits = HOPPER, kind: str = "gmm", *, m: int | None = None,
                 n: int | None = None) -> list[str]:
    """The limits `t` would break on `limits` (empty when it fits). With m and n, also the grid's limits."""
    r = resources(t, dtype, kind)
    bad = []
    if r["shared_memory"] > limits.shared_memory_per_block:
        bad.append(f"shared memory {r['shared_memory']} B > {limits.shared_memory_per_block} B per block")
    if r["threads"] > limits.threads_per_block:
        bad.append(f"{r['threads']} threads > {limits.threads_per_block} per block")
    if r["acc_registers"] > min(_ACC_REGISTERS, limits.registers_per_thread):
        bad.append(f"{r['acc_registers']} accumulator registers per thread > {_ACC_REGISTERS}")
    if r["threads"] * limits.registers_per_thread > limits.registers_per_block and \
            r["threads"] * (r["acc_registers"] + 64) > limits.registers_per_block:
        bad.append(f"{r['threads']} threads x {r['acc_registers'] + 64} registers > {limits.registers_per_block}")
    if kind == "gmm" and n is not None and -(-n // t.block_n) > limits.block_dim_limit_y:
        bad.append(f"{-(-n // t.block_n)} column tiles > grid limit {limits.block_dim_limit_y}")
    if kind == "gmm" and t.split_k > limits.block_dim_limit_z:
        bad.append(f"split_k {t.split_k} > grid limit {limits.block_dim_limit_z}")
    return bad
