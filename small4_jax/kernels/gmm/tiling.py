"""Block sizes of the grouped-matmul kernels, chosen from static shapes: decode tiles and prefill tiles.

Decode (few rows per group, bandwidth-bound: the cost is streaming each touched expert's weights once) uses narrow
row tiles (16, Triton's smallest dot) and splits K across programs so that a handful of experts still fills the
GPU. Prefill (hundreds of rows per group, compute-bound) uses 128x128 output tiles.

These numbers are starting points written without a GPU at hand: they respect Triton's constraints (powers of two,
every dot dimension >= 16) but have not been tuned. `benchmarks/moe_gmm.py` is where they get measured.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_MIN = 16  # Triton's smallest dot dimension
_DECODE_ROWS_PER_GROUP = 64  # below this average, a call is bandwidth-bound: use the decode tiling
_TARGET_PROGRAMS = 528  # ~4 programs per SM on a 132-SM Hopper part, for choosing split-K at decode


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
    if is_decode(m, num_groups):
        bk = _pow2_at_most(64 if wide else 128, k)
        bn = _pow2_at_most(64, n)
        programs = max(1, min(m, num_groups)) * -(-n // bn)
        split = 1
        while programs * split < _TARGET_PROGRAMS and k // (2 * split * bk) >= 2:
            split *= 2
        return GmmTiling(block_m=16, block_k=bk, block_n=bn, split_k=split, num_warps=4, num_stages=4)
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
