"""Page bookkeeping for the paged latent cache: a free list, reference counts and the prefix cache.

A sequence owns a list of page ids. A page that is full of prompt (or generated) tokens can be registered under
a key chained over everything that determines its cache rows: the parent page's key, the page's tokens, and the
sequence's context (`prefix_context`: the LoRA adapter serving it, the hashes of the images whose embeddings sit
in its prompt, and a tenant's `cache_salt`). A later sequence that starts with the same tokens in the same context
reuses the page instead of recomputing it. Keys are BLAKE2b digests (not Python's `hash()`, which collides on
purpose-built inputs and differs between processes), and a hit is verified: the pool keeps each cached page's
tokens and parent key and serves the page only when they are equal, so even a digest collision cannot hand one
prompt another's cache. Pages are reference counted; a registered
page whose count drops to zero is not freed but kept in an LRU list, and is recycled only when no free page is
left. Page 0 is the null page (`small4_jax.nn.paged.NULL_PAGE`) and is never handed out.

A sharded cache (`shards` > 1: the pages split over a mesh axis, data-parallel attention) is one pool over the
global page ids 0 .. num_pages-1 in `shards` contiguous ranges of num_pages / shards pages; range s lives on shard s,
and its first page is that shard's null page. A sequence takes all its pages from one shard (`allocate(n, shard)`),
prefix-cache hits are looked up per shard, and `local(page)` is the id within the shard that the shard's attention
reads.

Pure Python, no JAX: the engine calls it between steps, on one thread.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from small4_jax.nn.paged import NULL_PAGE

_ROOT = b"small4-prefix-v1"


def prefix_context(adapter: str | None = None, image_hashes: Sequence[str | bytes] = (),
                   cache_salt: str | None = None) -> bytes:
    """The root of a sequence's key chain: what besides the tokens decides its cache rows.

    adapter: the LoRA adapter's identity (name or content hash; None = the base model).
    image_hashes: digests of the images in the prompt, in order (the image tokens alone do not say which image).
    cache_salt: a tenant's secret; sequences with different salts never share pages.
    """
    h = hashlib.blake2b(_ROOT, digest_size=32)
    for tag, value in ((b"adapter", adapter), (b"salt", cache_salt)):
        if value is not None:
            data = value.encode("utf-8")
            h.update(tag + len(data).to_bytes(8, "little") + data)
    for image in image_hashes:
        data = image.encode("utf-8") if isinstance(image, str) else bytes(image)
        h.update(b"image" + len(data).to_bytes(8, "little") + data)
    return h.digest()


ROOT_CONTEXT = prefix_context()


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """BLAKE2b-256 of (parent key, the page's token ids as int64)."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=32).digest()


def chain_hashes(tokens: Sequence[int], page_size: int, num_pages: int, start: Sequence[bytes] = (),
                 context: bytes = ROOT_CONTEXT) -> list[bytes]:
    """Keys of the first `num_pages` full pages of `tokens`, continuing the chain `start` (already keyed), rooted
    at `context` (`prefix_context`)."""
    out = list(start)
    prev = out[-1] if out else context
    for i in range(len(out), num_pages):
        prev = page_key(prev, tokens[i * page_size : (i + 1) * page_size])
        out.append(prev)
    return out


class PagePool:
    """Allocates pages (all but each shard's null page), with reference counts and an LRU prefix cache of released
    full pages per shard."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True, shards: int = 1,
                 by_position: bool = False):
        if shards < 1 or num_pages % shards:
            raise ValueError(f"{num_pages} pages do not split into {shards} equal shards")
        if num_pages // shards < 2:
            raise ValueError(f"need at least 2 pages per shard (one is the null page), got {num_pages // shards}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.shards = shards
        # by_position (decode context parallelism): page i of every sequence lives on shard i % shards
        # (`allocate_at`), instead of a sequence's pages all on one shard
        self.by_position = by_position
        self.per_shard = num_pages // shards
        # pop() hands out low ids first
        self._free = [list(range((s + 1) * self.per_shard - 1, s * self.per_shard, -1)) for s in range(shards)]
        self._refs = [0] * num_pages
        self._by_hash: dict[tuple[int, bytes], int] = {}  # (shard, key) -> page
        self._hash_of: dict[int, bytes] = {}
        self._content: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # cached page -> (parent key, its tokens)
        # registered pages with no owner, oldest first, per shard
        self._idle: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(shards)]

    # ---- queries -------------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Pages sequences can ever use (all but the null pages)."""
        return self.num_pages - self.shards

    def shard_of(self, page: int) -> int:
        return page // self.per_shard

    def local(self, page: int) -> int:
        """The page's id within its shard (what that shard's attention indexes)."""
        return page % self.per_shard

    def available(self, shard: int | None = None) -> int:
        """Pages that can be allocated now (free, or cached without an owner), on `shard` or on all shards."""
        if shard is None:
            return sum(self.available(s) for s in range(self.shards))
        return len(self._free[shard]) + len(self._idle[shard])

    def in_use(self) -> int:
        """Pages owned by at least one sequence."""
        return self.capacity - self.available()

    def cached(self) -> int:
        """Pages registered in the prefix cache (owned or not)."""
        return len(self._by_hash)

    # ---- allocation ----------------------------------------------------------------------------------------------

    def allocate(self, n: int, shard: int = 0) -> list[int] | None:
        """n fresh pages of `shard`, or None (and nothing allocated) when fewer are available there."""
        if n > self.available(shard):
            return None
        out = []
        free, idle = self._free[shard], self._idle[shard]
        for _ in range(n):
            if free:
                page = free.pop()
            else:
                page, _ = idle.popitem(last=False)  # evict the least recently released cached page
                del self._by_hash[(shard, self._hash_of.pop(page))]
                del self._content[page]
            self._refs[page] = 1
            out.append(page)
        return out

    def allocate_at(self, first: int, n: int) -> list[int] | None:
        """By position: fresh pages for page indices first .. first + n - 1 of a sequence, index i on shard
        i % shards; None (and nothing allocated) when some shard lacks them."""
        need = [0] * self.shards
        for i in range(first, first + n):
            need[i % self.shards] += 1
        if any(k > self.available(s) for s, k in enumerate(need)):
            return None
        return [self.allocate(1, i % self.shards)[0] for i in range(first, first + n)]

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unreferenced pages become free, or idle if they are cached."""
        for page in pages:
            assert page % self.per_shard != NULL_PAGE and self._refs[page] > 0, f"page {page} released too often"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._idle[self.shard_of(page)][page] = None
                else:
                    self._free[self.shard_of(page)].append(page)

    # ---- prefix cache --------------------------------------------------------------------------------------------

    def _matching(self, hashes: Sequence[bytes], tokens: Sequence[int], context: bytes, shard: int) -> list[int]:
        out = []
        if not self.prefix_caching:
            return out
        size = self.page_size
        for i, h in enumerate(hashes):
            page = self._by_hash.get((i % self.shards if self.by_position else shard, h))
            if page is None:
                break
            parent = hashes[i - 1] if i else context
            if self._content[page] != (parent, tuple(tokens[i * size : (i + 1) * size])):
                break  # a digest collision: never serve another sequence's rows
            out.append(page)
        return out

    def peek(self, hashes: Sequence[bytes], tokens: Sequence[int], context: bytes = ROOT_CONTEXT,
             shard: int = 0) -> int:
        """How many pages `match` would serve on `shard` (takes nothing)."""
        return len(self._matching(hashes, tokens, context, shard))

    def match(self, hashes: Sequence[bytes], tokens: Sequence[int], context: bytes = ROOT_CONTEXT,
              shard: int = 0) -> list[int]:
        """Take a reference to the cached pages (on `shard`) of the longest prefix of `hashes` (the chain of `tokens`
        rooted at `context`) found and verified; returns their ids. A page is served only if its parent key and
        tokens are those of the request."""
        out = self._matching(hashes, tokens, context, shard)
        for page in out:
            if self._refs[page] == 0:
                del self._idle[self.shard_of(page)][page]
            self._refs[page] += 1
        return out

    def register(self, page: int, h: bytes, parent: bytes, tokens: Sequence[int]) -> None:
        """Record that `page` (owned, full, never written again) holds `tokens` under key `h`, whose parent key
        (the previous page's, or the context's for the first page) is `parent`."""
        key = (self.shard_of(page), h)
        if not self.prefix_caching or key in self._by_hash or page in self._hash_of:
            return
        self._by_hash[key] = page
        self._hash_of[page] = h
        self._content[page] = (parent, tuple(tokens))
