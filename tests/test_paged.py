"""The paged latent cache and absorbed-MLA decode (`small4_jax.nn.paged`) against the model's un-absorbed forward.

The reference is `Small4ForCausalLM.__call__` (itself checked against transformers in test_model_parity.py) run
on the whole sequence at explicit positions; ours prefills part of it through scattered pages (expanded MLA, or the
absorbed path) and decodes the rest one token at a time (absorbed MLA over the pages: the blockwise XLA loop, or the
Pallas kernel in interpret mode). Error metric: max|ours - ref| / max|ref| per position.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from small4_jax.nn import paged
from small4_jax.config import Small4Config
from small4_jax.nn.model import init_model

PAGE = 4
REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _slots(table, idx):
    return np.stack([table[0, idx // PAGE], idx % PAGE], -1)[None].astype(np.int32)


@pytest.mark.parametrize("q_lora,start,impl", [
    (True, 0, "auto"), (True, 600, "auto"), (True, 262_130, "auto"), (False, 0, "auto"), (False, 600, "auto"),
    (False, 262_130, "auto"), (True, 262_130, "pallas"), (False, 600, "pallas"),
])
def test_absorbed_decode_equals_unabsorbed_forward(q_lora, start, impl, adapters=False):
    config = Small4Config.from_yaml(TINY)  # original_max_position_embeddings 512
    if not q_lora:
        config = config.replace(q_lora_rank=None)
    model = init_model(config, seed=1)
    if adapters:  # LoRA on every attention projection, kv_b_proj included (folded into the absorbed query)
        from small4_jax.lora import adapters as lora

        lora.apply_lora(model, lora.LoRAConfig(targets=["attention"], rank=4, alpha=8.0))
        for _, b in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            if b.shape[0] == 4:  # lora_b [r, out]: zero at init; give the adapters an effect
                b.set_value(jax.random.normal(jax.random.key(b.shape[1]), b.shape) * 0.05)
    n_prefill, n = 7, 12
    rng = np.random.default_rng(start)
    ids = rng.integers(3, config.vocab_size, (1, n)).astype(np.int32)
    pos = (start + np.arange(n))[None].astype(np.int32)
    assert pos.max() < 262_144
    ref = np.asarray(model(ids, positions=pos))[0]  # [n, V]

    graphdef, state = nnx.split(model)
    pages = paged.PagedCache.create(config, num_pages=9, page_size=PAGE).pages
    table = np.array([[5, 2, 7, 0]], np.int32)  # scattered pages; the tail is the null page
    idx = np.arange(n_prefill)
    logits, pages = paged.logits_step(
        graphdef, state, pages, ids[:, :n_prefill], pos[:, :n_prefill], idx[None].astype(np.int32),
        _slots(table, idx), table, np.array([n_prefill - 1], np.int32), absorbed=False)
    errors = [_rel(logits[0], ref[n_prefill - 1])]
    for t in range(n_prefill, n):
        i = np.array([t])
        logits, pages = paged.logits_step(
            graphdef, state, pages, ids[:, t:t + 1], pos[:, t:t + 1], i[None].astype(np.int32), _slots(table, i),
            table, np.array([0], np.int32), absorbed=True, impl=impl)
        errors.append(_rel(logits[0], ref[t]))
    assert max(errors) < 1e-5, errors
    # what the cache holds: the normalised latent and the RoPE'd key, 48 = kv_lora_rank + qk_rope_head_dim values
    assert pages.shape == (config.num_hidden_layers, 9, PAGE, config.kv_lora_rank + config.qk_rope_head_dim)
    assert not np.asarray(pages[:, [1, 3, 4, 6, 8]]).any()  # pages outside the table are untouched


def test_absorbed_decode_with_lora_adapters():
    test_absorbed_decode_equals_unabsorbed_forward(True, 600, "auto", adapters=True)


def test_absorbed_prefill_equals_expanded_prefill():
    config = Small4Config.from_yaml(TINY)
    model = init_model(config, seed=2)
    graphdef, state = nnx.split(model)
    ids = np.arange(3, 13, dtype=np.int32)[None]
    pos = (1000 + np.arange(10))[None].astype(np.int32)
    table = np.array([[1, 2, 3]], np.int32)
    idx = np.arange(10)
    out = {}
    for absorbed, impl in ((False, "auto"), (True, "xla"), (True, "pallas"), (True, "reference")):
        pages = paged.PagedCache.create(config, num_pages=4, page_size=PAGE).pages
        out[impl] = paged.logits_step(graphdef, state, pages, ids, pos, idx[None].astype(np.int32),
                                      _slots(table, idx), table, np.array([9], np.int32), absorbed=absorbed, impl=impl)
    for impl in ("xla", "pallas", "reference"):  # the absorbed paths against the expanded reference
        assert _rel(out[impl][0], out["auto"][0]) < 1e-5, impl
        # layer 0 writes identical rows; later layers' rows differ by rounding only
        np.testing.assert_array_equal(np.asarray(out[impl][1][0]), np.asarray(out["auto"][1][0]))
        assert _rel(out[impl][1], out["auto"][1]) < 1e-5, impl


def test_cache_size_of_small4_119b_from_the_config():
    """320 values x dtype bytes per token per layer, computed from the preset (nothing allocated)."""
    from infer.engine.engine import cache_report

    config = Small4Config.from_yaml(REPO / "configs" / "small4-119b.yaml")
    assert paged.cache_width(config) == 320
    assert paged.cache_bytes_per_token_per_layer(config, "bfloat16") == 640
    assert paged.cache_bytes_per_token_per_layer(config, "float32") == 1280
    report = cache_report(config, "bfloat16", 80 * 2**30, page_size=64, num_pages=3641)
    assert "320 values x 2 bytes = 640 B per token per layer, 22.5 KiB per token over 36 layers" in report
    assert "3640 pages of 64 tokens = 232960 cache tokens fit in 80.00 GiB" in report
    from infer.engine.engine import pages_for_memory

    assert pages_for_memory(config, "bfloat16", 5.625 * 2**30, page_size=64) == 262_144 // 64  # 256K = 5.63 GiB


def test_cache_can_be_sharded_replicated_on_a_mesh():
    from small4_jax.parallel.sharding import make_mesh

    mesh = make_mesh({"data": 1, "expert": 8, "tensor": 1})
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    cache = paged.PagedCache.create(Small4Config.from_yaml(TINY), 3, PAGE, sharding=sharding)
    assert cache.pages.sharding == sharding and cache.num_pages == 3 and cache.page_size == PAGE


@pytest.mark.parametrize("t", [1, 3])
def test_ragged_batch_at_long_positions_equals_the_expanded_reference(t):
    """Three rows holding 5, 23 and 41 keys (one, six and eleven scattered pages) at positions up to 262,130,
    stepping t new tokens each (decode; a verify step): the blockwise loop and the split-KV kernel (interpret mode)
    give the logits and cache rows of the expanded reference."""
    config = Small4Config.from_yaml(TINY)
    graphdef, state = nnx.split(init_model(config, seed=3))
    rng = np.random.default_rng(7)
    lengths = [5, 23, 41]
    starts = [262_131 - 41, 600, 262_131 - 5]  # the last token of some rows sits at 262,130
    width = 12
    table = np.zeros((3, width), np.int32)
    free = list(rng.permutation(np.arange(1, 25)))
    for b, n in enumerate(lengths):
        for k in range(-(-n // PAGE)):
            table[b, k] = free.pop()
    base = paged.PagedCache.create(config, num_pages=25, page_size=PAGE).pages
    base = base.at[:, 1:].set(rng.standard_normal(base[:, 1:].shape).astype(np.float32) * 0.5)  # earlier keys
    seq = np.stack([np.arange(n - t, n) for n in lengths]).astype(np.int32)
    pos = np.stack([s + np.arange(n - t, n) for s, n in zip(starts, lengths)]).astype(np.int32)
    ids = rng.integers(3, config.vocab_size, (3, t)).astype(np.int32)
    slots = np.stack([np.stack([table[b, seq[b] // PAGE], seq[b] % PAGE], -1) for b in range(3)]).astype(np.int32)
    index = np.broadcast_to(np.arange(t, dtype=np.int32), (3, t))
    out = {}
    for absorbed, impl in ((False, "auto"), (True, "xla"), (True, "pallas")):
        out[impl] = paged.logits_step(graphdef, state, jax.numpy.array(base), ids, pos, seq, slots, table, index,
                                      absorbed=absorbed, impl=impl)
    for impl in ("xla", "pallas"):
        assert _rel(out[impl][0], out["auto"][0]) < 1e-5, impl
        assert _rel(out[impl][1], out["auto"][1]) < 1e-5, impl
