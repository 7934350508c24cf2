"""The prefix cache's keys and hit verification (`infer.engine.page_pool`), pure Python."""

import hashlib

import numpy as np
import pytest

import infer.engine.page_pool as pp
from infer.engine.page_pool import PagePool, chain_hashes, page_key, prefix_context

SIZE = 4


def _cache(pool, tokens, context=pp.ROOT_CONTEXT):
    """Allocate and register the full pages of `tokens` as the engine does; returns the page ids."""
    n = len(tokens) // SIZE
    keys = chain_hashes(tokens, SIZE, n, context=context)
    pages = pool.allocate(n)
    for i, page in enumerate(pages):
        pool.register(page, keys[i], keys[i - 1] if i else context, tokens[i * SIZE : (i + 1) * SIZE])
    return pages


def test_keys_are_blake2b_chained_over_parent_and_tokens():
    tokens = list(range(100, 112))
    keys = chain_hashes(tokens, SIZE, 3)
    parent = pp.ROOT_CONTEXT
    for i, key in enumerate(keys):  # independent recomputation of the chain
        data = parent + np.asarray(tokens[i * SIZE : (i + 1) * SIZE], np.int64).tobytes()
        assert key == hashlib.blake2b(data, digest_size=32).digest()
        parent = key
    assert chain_hashes(tokens, SIZE, 3, start=keys[:1]) == keys  # continuing a chain = computing it whole
    # a change in page 0 changes every later key; the same page after a different prefix gets a different key
    other = chain_hashes([0] + tokens[1:], SIZE, 3)
    assert all(a != b for a, b in zip(keys, other))


def test_context_separates_adapters_images_and_salts():
    contexts = [prefix_context(), prefix_context(adapter="a"), prefix_context(adapter="b"),
                prefix_context(image_hashes=["x"]), prefix_context(image_hashes=["y"]),
                prefix_context(image_hashes=["x", "y"]), prefix_context(cache_salt="tenant-1"),
                prefix_context(adapter="a", cache_salt="tenant-1")]
    assert len(set(contexts)) == len(contexts)
    assert prefix_context(adapter="a") == prefix_context(adapter="a")
    pool = PagePool(16, SIZE)
    tokens = list(range(50, 58))
    _cache(pool, tokens, prefix_context(cache_salt="s1"))
    for ctx in contexts:
        assert pool.match(chain_hashes(tokens, SIZE, 2, context=ctx), tokens, ctx) == []
    ctx = prefix_context(cache_salt="s1")
    assert len(pool.match(chain_hashes(tokens, SIZE, 2, context=ctx), tokens, ctx)) == 2


def test_a_key_collision_is_refused_on_the_hit(monkeypatch):
    # a broken digest that ignores the tokens: every sequence gets the same chain of keys
    monkeypatch.setattr(pp, "page_key", lambda parent, tokens: hashlib.blake2b(parent, digest_size=32).digest())
    pool = PagePool(16, SIZE)
    victim = [7, 7, 7, 7, 8, 8, 8, 8]
    pages = _cache(pool, victim)
    pool.release(pages)  # idle in the cache
    assert pool.match(chain_hashes(victim, SIZE, 2), victim) == pages  # a true hit is served
    pool.release(pages)
    # another prompt finds the victim's keys but must not get its pages
    attacker = [9, 9, 9, 9, 8, 8, 8, 8]
    keys = chain_hashes(attacker, SIZE, 2)
    assert pool.match(keys, attacker) == []
    # a collision in the second page only: the first (genuinely equal) page is served, the second is not
    half = [7, 7, 7, 7, 1, 2, 3, 4]
    assert pool.match(chain_hashes(half, SIZE, 2), half) == pages[:1]
    assert pool.available() == 16 - 1 - 1  # the one matched page is owned again


def test_page_key_is_not_pythons_hash():
    # Python hashes -1 and -2 alike; those tuples collided in the old keys
    assert hash((None, (-1,))) == hash((None, (-2,)))
    assert page_key(pp.ROOT_CONTEXT, [-1]) != page_key(pp.ROOT_CONTEXT, [-2])


def test_sharded_pool_keeps_each_shard_to_its_own_pages():
    """shards=3 over 12 pages: ids 0-3, 4-7, 8-11, each range with its own null page; allocation, eviction and
    prefix hits stay inside the shard asked for."""
    pool = PagePool(12, SIZE, shards=3)
    assert pool.capacity == 9 and pool.available() == 9 and [pool.available(s) for s in range(3)] == [3, 3, 3]
    assert pool.allocate(3, shard=1) == [5, 6, 7] and pool.allocate(1, shard=1) is None
    assert [pool.local(p) for p in (5, 6, 7)] == [1, 2, 3] and pool.shard_of(7) == 1
    tokens = list(range(20, 28))
    keys = chain_hashes(tokens, SIZE, 2)
    pages = pool.allocate(2, shard=2)
    assert pages == [9, 10]
    for i, page in enumerate(pages):
        pool.register(page, keys[i], keys[i - 1] if i else pp.ROOT_CONTEXT, tokens[i * SIZE : (i + 1) * SIZE])
    pool.release(pages)  # idle, cached on shard 2
    assert pool.peek(keys, tokens, shard=2) == 2 and pool.peek(keys, tokens, shard=0) == 0
    assert pool.match(keys, tokens, shard=0) == []  # another shard's cache is not this one's
    assert pool.match(keys, tokens, shard=2) == [9, 10]
    pool.release([9, 10])
    assert pool.allocate(3, shard=2) == [11, 9, 10]  # the free page first, then the cached ones evicted
    assert pool.peek(keys, tokens, shard=2) == 0 and pool.cached() == 0
    pool.release([5, 6, 7, 11, 9, 10])
    assert pool.in_use() == 0
    with pytest.raises(ValueError, match="do not split into 5 equal shards"):
        PagePool(12, SIZE, shards=5)
