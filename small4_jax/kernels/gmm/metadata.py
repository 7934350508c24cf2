"""Tile-to-group bookkeeping for the grouped matmul, computed on device from the group sizes (no host sync).

The M rows are cut into segments that partition [0, M):

    segment 0              rows before the window (groups < group_offset)      -> written as zeros
    segments 1..L          the L local groups, in order                          -> lhs @ rhs[group]
    segment L+1            rows after the window, including rows past the sum    -> written as zeros

A work item is one (segment, row tile) pair with a non-empty intersection; row tiles are block_m rows. Consecutive
non-empty segments share at most one tile, so there are at most tiles_m + (L + 2) - 1 work items: that static bound
sizes the kernel's grid, and the items past `num_work` exit at once. Two items that share a tile write disjoint rows
(masked stores), so no output tile needs a second pass or an atomic, and every output row is written exactly once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
    seg_start: jax.Array  # [L + 2] int32: first row of each segment (within [0, M])
    seg_end: jax.Array  # [L + 2] int32: one past its last row
    seg_group: jax.Array  # [L + 2] int32: local group of the segment, -1 for the two zero segments
    work_seg: jax.Array  # [W] int32: segment of work item w
    work_tile: jax.Array  # [W] int32: row tile of work item w
    num_work: jax.Array  # [1] int32: number of valid work items


def num_work_items(num_rows: int, num_groups: int, block_m: int) -> int:
    """The static grid bound: tiles_m + (num_groups + 2) - 1."""
    return -(-num_rows // block_m) + num_groups + 1


def local_offsets(group_sizes: jax.Array, group_offset, num_groups: int, num_rows: int) -> jax.Array:
    """Row offsets [num_groups + 1] of the window's groups, clipped to [0, num_rows].

    Local group j owns rows [out[j], out[j+1]). The caller guarantees group_offset + num_groups <= len(group_sizes).
    """
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes.astype(jnp.int32))])
    window = jax.lax.dynamic_slice(offsets, (jnp.asarray(group_offset, jnp.int32),), (num_groups + 1,))
    return jnp.clip(window, 0, num_rows)


def make_group_metadata(
    group_sizes: jax.Array, group_offset, num_groups: int, num_rows: int, block_m: int
) -> GroupMetadata:
    local = local_offsets(group_sizes, group_offset, num_groups, num_rows)
    m = jnp.int32(num_rows)
    zero = jnp.zeros((1,), jnp.int32)
    seg_start = jnp.concatenate([zero, local])  # [L + 2]
    seg_end = jnp.concatenate([local, m[None]])
    seg_group = jnp.concatenate([-1 - zero, jnp.arange(num_groups, dtype=jnp.int32), -1 - zero])
    nonempty = seg_end > seg_start
    first_tile = seg_start // block_m
    tiles = jnp.where(nonempty, (seg_end - 1) // block_m - first_tile + 1, 0)
    ends = jnp.cumsum(tiles)
    w = jnp.arange(num_work_items(num_rows, num_groups, block_m), dtype=jnp.int32)
    seg = jnp.minimum(jnp.searchsorted(ends, w, side="right"), num_groups + 1).astype(jnp.int32)
    tile = first_tile[seg] + w - (ends - tiles)[seg]
    valid = w < ends[-1]
    return GroupMetadata(
        seg_start=seg_start,
        seg_end=seg_end,
        seg_group=seg_group,
        work_seg=jnp.where(valid, seg, 0),
        work_tile=jnp.where(valid, tile, 0),
        num_work=ends[-1:].astype(jnp.int32),
    )
