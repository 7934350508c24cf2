"""Absorbed MLA attention over the paged cache (`small4_jax.kernels.mla_decode`): the ragged split-KV Pallas kernel
(interpret mode) and the blockwise XLA loop against the materialising reference, and the kernel compiled for sm_90a.

Every case draws fresh random inputs (the seed is in the failure message): rows of very different lengths
(one page, many pages, a partial last page), pages scattered over the cache in random order with a null-page tail
in the table, T = 1 (decode) and T > 1 (a prefill chunk / verify step, causal inside the chunk), per-query scales,
fp32 (< 1e-5 relative) and bf16 (< 2e-2). A float64 numpy loop written here checks the reference itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from small4_jax.kernels.mla_decode import mla_blockwise, mla_pallas, mla_reference, work_items

NH, R, DR, PAGE, LAYERS, NUM_PAGES = 4, 32, 16, 4, 2, 48
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _case(seed, lengths, t, dtype=jnp.float32, width=None):
    """Random queries, a random cache, and page tables placing each row's keys on random distinct pages."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    width = width or max(-(-n // PAGE) for n in lengths) + 1
    pages = rng.standard_normal((LAYERS, NUM_PAGES, PAGE, R + DR))
    table = np.zeros((b, width), np.int32)  # 0: the null page
    free = list(rng.permutation(np.arange(1, NUM_PAGES)))
    for i, n in enumerate(lengths):
        for k in range(-(-n // PAGE)):
            table[i, k] = free.pop()
    seq_index = np.stack([np.arange(n - t, n) for n in lengths]).astype(np.int32)  # the last t tokens of each row
    q = rng.standard_normal((b, t, NH, R))
    q_pe = rng.standard_normal((b, t, NH, DR))
    scale = rng.uniform(0.1, 0.4, (b, t))
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return (cast(q), cast(q_pe), cast(pages), 1, jnp.asarray(table), jnp.asarray(seq_index),
            jnp.asarray(scale, jnp.float32))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _numpy(q, q_pe, pages, layer, table, seq_index, scale):
    q, q_pe, pages = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, q_pe, pages))
    table, seq_index, scale = np.asarray(table), np.asarray(seq_index), np.asarray(scale, np.float64)
    b, t, nh, r = q.shape
    out = np.zeros((b, t, nh, r))
    for i in range(b):
        keys = pages[layer, table[i]].reshape(-1, pages.shape[-1])
        for j in range(t):
            k = keys[: seq_index[i, j] + 1]
            s = (q[i, j] @ k[:, :r].T + q_pe[i, j] @ k[:, r:].T) * scale[i, j]  # [nh, K]
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, j] = (p / p.sum(-1, keepdims=True)) @ k[:, :r]
    return out


LENGTHS = [[37, 1, 9, 16], [5], [64, 3]]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_reference_equals_numpy(lengths):
    args = _case(1, lengths, t=2 if min(lengths) >= 2 else 1)
    assert _rel(mla_reference(*args), _numpy(*args)) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t", [1, 3])
def test_kernel_equals_reference_on_ragged_rows(t, dtype):
    seed = int(np.random.default_rng().integers(1 << 30))
    args = _case(seed, [37, 3, 9, 16, 58], t, dtype)
    ref = mla_reference(*args)
    for kv_splits, min_split in ((0, 4), (6, 4), (40, 8)):  # one item per row; a few spans; more items than spans
        out = mla_pallas(*args, kv_splits=kv_splits, min_split=min_split, block_m=16, interpret=True)
        assert _rel(out, ref) < TOL[dtype], (seed, kv_splits)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t", [1, 4])
def test_blockwise_equals_reference_on_ragged_rows(t, dtype):
    seed = int(np.random.default_rng().integers(1 << 30))
    args = _case(seed, [37, 4, 9, 16, 58], t, dtype, width=20)  # a wide table: most of it null pages
    ref = mla_reference(*args)
    for block_pages in (1, 3, 16):
        assert _rel(mla_blockwise(*args, block_pages=block_pages), ref) < TOL[dtype], (seed, block_pages)


def test_work_items_cover_each_row_once_and_follow_its_length():
    seq_index = jnp.asarray([[255], [3], [17], [0]], jnp.int32)  # 256, 4, 18 and 1 keys
    row, start, end = (np.asarray(x) for x in work_items(seq_index, page_size=4, num_work=12, min_split=8))
    for b, n in enumerate([256, 4, 18, 1]):
        mine = sorted(zip(start[row == b], end[row == b]))
        assert mine[0][0] == 0 and mine[-1][1] == n and all(e == s2 for (_, e), (s2, _) in zip(mine, mine[1:]))
        assert all(s % 4 == 0 for s, _ in mine)  # spans start on page boundaries
    assert (row == 0).sum() > (row == 1).sum() == (row == 3).sum() == 1  # the long row gets the spans
    assert ((row == 4) == (start == end)).all()  # unused items: row B, empty span


@pytest.mark.gpu_compile
@pytest.mark.parametrize("batch,t", [(64, 1), (2, 256)])
def test_kernel_compiles_for_sm90a_at_small4_dims(batch, t):
    """Small 4's attention dims (32 heads, latent 256, RoPE key 64, bf16, 16-token pages): a decode step at batch 64
    (split-KV) and a prefill chunk of 256 tokens, for one H100; shared memory and registers are the target's."""
    from small4_jax.tools import aot

    mesh = aot.gpu_mesh("h100", {"data": 1}, topology="1x1x1")
    nh, r, dr, page, num_pages, width = 32, 256, 64, 16, 4096, 16384
    bf = jnp.bfloat16
    args = [aot.spec((batch, t, nh, r), bf, mesh), aot.spec((batch, t, nh, dr), bf, mesh),
            aot.spec((2, num_pages, page, r + dr), bf, mesh), aot.spec((), jnp.int32, mesh),
            aot.spec((batch, width), jnp.int32, mesh), aot.spec((batch, t), jnp.int32, mesh),
            aot.spec((batch, t), jnp.float32, mesh)]
    kv_splits = 64 if t == 1 else 0
    c = aot.compile_for(lambda *a: mla_pallas(*a, kv_splits=kv_splits), *args, mesh=mesh)
    assert c.uses_triton
    # Partial results: (batch + kv_splits) work items x 32 heads x 256 latent values in fp32, whatever the lengths.
    assert c.memory.temp < 2 * (batch + kv_splits) * max(t * nh, 32) * (r + 1) * 4 + 2**20, c.memory


@pytest.mark.gpu_compile
def test_ragged_decode_holds_memory_in_proportion_to_the_rows_lengths():
    """The planner's decode-ragged-64 preset (small4_jax.plan) at one layer: batch 64 = one 262,144-token row + 63
    rows of 1,024 over the full 16,384-page table, one cache replicated on every device; the cache holds just their
    pages and the step's temporaries are small, so cache + temp is within 2x of sum(lengths) x bytes per token
    (64 x 256K would be 31x more)."""
    from small4_jax.tools import plan

    dep = plan.ragged_decode("h100", 1)
    c = dep.programs[0].program.compile()
    assert c.uses_triton and "small4_mla" in c.text
    bound = (262_144 + 63 * 1024) * 640  # bf16, 320 values per token, one layer
    held = dep.resident["cache"] + c.memory.temp
    assert bound <= held < 2 * bound, (held, bound)
    assert "x the bound" in dep.check(c.memory)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("tokens", [1, 256], ids=["decode", "prefill"])
def test_sharded_cache_step_compiles_on_8_h100(tokens):
    """The engine's step with the cache's pages sharded over data=2 (each shard's MLA kernel inside the shard_map)
    and the MoE expert-parallel over expert=4, one layer of Small 4: the kernel compiles there and each device holds
    half the pages."""
    from small4_jax.tools import aot
    from small4_jax.tools import aot_programs as ap
    from small4_jax.config import Small4Config

    config = Small4Config.from_yaml("configs/small4-119b.yaml").replace(num_hidden_layers=1)
    mesh = aot.gpu_mesh("h100", {"data": 2, "expert": 4, "tensor": 1})
    rows = 16 if tokens == 1 else 4
    program = ap.serve_step(config, mesh, absorbed=True, rows=rows, tokens=tokens, table_pages=256, num_pages=2048,
                            cache_axes=("data",))
    c = program.compile()
    assert "small4_mla" in c.text
    pages = program.args[1]
    half = pages.size * pages.dtype.itemsize // 2
    assert c.memory.alias == half, (c.memory, half)  # this device's half of the pages, updated in place
