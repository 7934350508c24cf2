"""Page bookkeeping for the paged latent cache: a free list, reference counts and the prefix cache.

A sequence owns a list of page ids. A page that is full of prompt (or generated) tokens can be registered under
the hash of its tokens and of every token before it (a hash chain, one link per page), so a later sequence that
starts with the same tokens reuses the page instead of recomputing it. Pages are reference counted; a registered
page whose count drops to zero is not freed but kept in an LRU list, and is recycled only when no free page is
left. Page 0 is the null page (`small4_jax.paged.NULL_PAGE`) and is never handed out.

Pure Python, no JAX: the engine calls it between steps, on one thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from small4_jax.paged import NULL_PAGE


def chain_hashes(tokens: Sequence[int], page_size: int, num_pages: int, start: Sequence[int] = ()) -> list[int]:
    """Hashes of the first `num_pages` full pages of `tokens`, continuing the chain `start` (already hashed)."""
    out = list(start)
    prev = out[-1] if out else None
    for i in range(len(out), num_pages):
        prev = hash((prev, tuple(tokens[i * page_size : (i + 1) * page_size])))
        out.append(prev)
    return out


class PagePool:
    """Allocates pages 1 .. num_pages-1, with reference counts and an LRU prefix cache of released full pages."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered pages with no owner, oldest first

    # ---- queries -------------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Pages a sequence can ever use (all but the null page)."""
        return self.num_pages - 1

    def available(self) -> int:
        """Pages that can be allocated now (free, or cached without an owner)."""
        return len(self._free) + len(self._idle)

    def in_use(self) -> int:
        """Pages owned by at least one sequence."""
        return self.capacity - self.available()

    def cached(self) -> int:
        """Pages registered in the prefix cache (owned or not)."""
        return len(self._by_hash)

    # ---- allocation ----------------------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages, or None (and nothing allocated) when fewer are available."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._idle.popitem(last=False)  # evict the least recently released cached page
                del self._by_hash[self._hash_of.pop(page)]
            self._refs[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unreferenced pages become free, or idle if they are cached."""
        for page in pages:
            assert page != NULL_PAGE and self._refs[page] > 0, f"page {page} released too often"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    # ---- prefix cache --------------------------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference to the cached pages of the longest prefix of `hashes` found; returns their ids."""
        out = []
        if not self.prefix_caching:
            return out
        for h in hashes:
            page = self._by_hash.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
            out.append(page)
        return out

    def register(self, page: int, h: int) -> None:
        """Record that `page` (owned, full, never written again) holds the tokens of hash `h`."""
        if not self.prefix_caching or h in self._by_hash or page in self._hash_of:
            return
        self._by_hash[h] = page
        self._hash_of[page] = h
