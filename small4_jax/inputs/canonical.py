"""Canonical tokenisation for Tekken (tiktoken-style byte-level BPE behind a pre-tokenisation regex).

A token sequence is *canonical* when it is what the tokenizer's own `encode` gives for its text. Grammar-constrained
decoding admits every tokenisation of an allowed text; this module decides, token by token and for a whole
vocabulary at once, which next tokens keep the output canonical.

Two facts make that cheap and exact:
- BPE runs inside each pre-token chunk of the regex, so a canonical sequence has a token boundary at every chunk
  boundary and no token crosses one; which chunk a junction falls into depends only on the characters' classes for
  the regex, so a candidate's effect on the chunking is decided per class string (few thousand distinct ones in a
  131K vocabulary), not per token.
- Inside a chunk, a BPE sequence is canonical iff every adjacent pair is (the bigram property of BPE; Vieira et al.,
  "Language Models over Canonical Byte-Pair Encodings", ICML 2025; GitHub's `bpe` crate's token-pair
  compatibility). A pair is checked by unwinding both tokens' merges along the junction (`pair_valid`), vectorised
  over all second tokens.

The state of a text being written is its *tail*: the text since the last chunk start no continuation can move,
with its tokens. `Canon.allowed(tail, tail_ids, candidates, encode)` says which next tokens keep the text a
canonical prefix, `advance` moves the tail on, `end_ok` says whether the text may end there; tests compare them
with the tokenizer's `encode` on random texts, perturbed tokenisations included.
Tokens that are not valid UTF-8 on their own (pieces of a character) are never allowed: the text stays whole
characters at every step (a character whose canonical encoding needs byte pieces cannot be produced).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

_INF = np.int32(2**31 - 1)


def bpe_merge(piece: bytes, ranks: dict, limit: int | None = None) -> list[bytes]:
    """tiktoken's byte-pair merge of one chunk: repeatedly merge the adjacent pair whose concatenation has the
    lowest rank (leftmost on ties), using only ranks below `limit`."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (limit is None or r < limit) and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


class Canon:
    """Per-tokenizer tables: token bytes/strings, merge splits, class strings of the regex, pair-validity rows."""

    def __init__(self, ranks: dict, pattern: str, num_special: int, vocab_size: int):
        import regex

        self.ranks, self.nspec, self.vocab_size = ranks, num_special, vocab_size
        self.pat = regex.compile(pattern)
        n = len(ranks)
        self.n = n
        self.tbytes = [b""] * n
        for b, r in ranks.items():
            self.tbytes[r] = b
        # split[r] = (left, right) of the merge that made r; (r, r) for single bytes; reachable: BPE(bytes) == [r]
        left = np.arange(n, dtype=np.int32)
        right = np.arange(n, dtype=np.int32)
        self.reachable = np.ones(n, bool)
        for r, b in enumerate(self.tbytes):
            if len(b) < 2:
                continue
            parts = bpe_merge(b, ranks, limit=r)
            if len(parts) != 2:
                self.reachable[r] = False
                continue
            left[r], right[r] = ranks[parts[0]], ranks[parts[1]]
        self.left, self.right = left, right
        merged = np.flatnonzero(left != np.arange(n))
        # pairs (x, y) -> merged rank, grouped by x for dense per-x rows
        order = np.lexsort((right[merged], left[merged]))
        self._pl = left[merged][order]
        self._pr = right[merged][order]
        self._pm = merged[order].astype(np.int32)
        self._row_cache: OrderedDict = OrderedDict()
        # text of each token; None where not valid UTF-8 on its own
        self.tstr: list[str | None] = []
        for b in self.tbytes:
            try:
                self.tstr.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                self.tstr.append(None)
        self.text_ok = np.array([s is not None and s != "" for s in self.tstr]) & self.reachable
        # class strings: each character replaced by a representative with the same answers to the regex's classes
        self._rep: dict = {}
        self._rep_of_key: dict = {}
        keys, self.cstr = {}, []
        ckey = np.full(n, -1, np.int32)
        for r, s in enumerate(self.tstr):
            if s is None:
                continue
            c = self.class_string(s)
            k = keys.get(c)
            if k is None:
                k = keys[c] = len(self.cstr)
                self.cstr.append(c)
            ckey[r] = k
        self.ckey = ckey
        for s in self.tstr[:: max(1, n // 4000)]:  # the classes must be all the regex looks at
            if s is not None and self.chunk_starts(s + " " + s) != self.chunk_starts(self.class_string(s + " " + s)):
                raise ValueError(f"the pre-tokenisation pattern distinguishes characters of {s!r} that the canonical "
                                 "tables treat alike; canonical masks support Tekken's pattern")
        self.ends_ws = np.array([bool(s) and self._class_char(s[-1]).isspace() for s in
                                 (x or "" for x in self.tstr)])
        # one character of every class that is not whitespace: what may follow a text ending in whitespace
        self.followers = [""] + sorted(r for r in set(self._rep_of_key.values()) if not r.isspace())
        self.ws_keys = [k for k, c in enumerate(self.cstr) if c[-1].isspace()]
        self._kind_cache: OrderedDict = OrderedDict()
        self._valid_cache: OrderedDict = OrderedDict()
        self._nmask_cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # ---- regex classes ----------------------------------------------------------------------------------------

    _PROBES = (r"\p{L}", r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", r"\p{N}", r"\s",
               r"[\r\n]", " ", "/")

    def _class_char(self, ch: str) -> str:
        rep = self._rep.get(ch)
        if rep is None:
            import regex

            key = tuple(bool(regex.fullmatch(p, ch)) for p in self._PROBES)
            rep = self._rep_of_key.setdefault(key, ch)
            self._rep[ch] = rep
        return rep

    def class_string(self, s: str) -> str:
        """`s` with every character replaced by its class representative: the regex chunks both the same way."""
        return "".join(self._class_char(ch) for ch in s)

    def chunk_starts(self, s: str) -> list[int]:
        return [m.start() for m in self.pat.finditer(s)]

    # ---- pair validity (inside one chunk) ---------------------------------------------------------------------

    def _row(self, x: int) -> np.ndarray:
        """merged[y] = rank of the merge (x, y), or INF."""
        row = self._row_cache.get(x)
        if row is None:
            lo, hi = np.searchsorted(self._pl, [x, x + 1])
            row = np.full(self.n, _INF, np.int32)
            row[self._pr[lo:hi]] = self._pm[lo:hi]
            self._row_cache[x] = row
            if len(self._row_cache) > 128:  # 0.5 MB each at 131K tokens
                self._row_cache.popitem(last=False)
        else:
            self._row_cache.move_to_end(x)
        return row

    def pair_valid(self, a: int, bs: np.ndarray) -> np.ndarray:
        """Whether BPE(bytes(a) + bytes(b)) == [a, b] for each b in `bs` (inner ranks, both reachable).

        Unwinds the later of the two merges at the junction each round (the first token down its right spine, the
        second down its left spine); a merge across the junction whose rank is below the bound (a merge BPE would
        have made before the pieces on either side were formed) makes the pair invalid."""
        spine = [a]
        while self.right[spine[-1]] != spine[-1]:
            spine.append(int(self.right[spine[-1]]))
        n = self.n
        rows = np.concatenate([self._row(x) for x in spine])  # rows[i * n + y]: rank of the merge (spine[i], y)
        spine = np.asarray(spine, np.int32)
        last = len(spine) - 1
        left = self.left
        bs = np.asarray(bs, np.int32)
        out = np.ones(len(bs), bool)
        idx = np.arange(len(bs))
        pos = np.zeros(len(bs), np.int32)  # the first token is spine[pos]
        t2 = bs.copy()
        limit = np.full(len(bs), _INF, np.int32)  # ranks fit int32; INF is above them all
        while len(idx):
            bad = rows[pos * n + t2] < limit
            l2 = left[t2]
            b2 = l2 == t2  # the second token is a single byte
            b1 = pos == last  # the first token is a single byte
            t1 = spine[pos]
            up1 = (t1 > t2) & ~b1 | b2 & ~b1  # unwind the first token's merge
            live = ~bad & ~(b1 & b2)  # b1 & b2: both are bytes, nothing crosses: valid
            out[idx[bad]] = False
            up2 = ~up1
            limit = np.where(up1, t1, t2 + 1)
            pos = pos + up1
            t2 = np.where(up2, l2, t2)
            idx, pos, t2, limit = idx[live], pos[live], t2[live], limit[live]
        return out

    def valid_after(self, a: int, bs: np.ndarray) -> np.ndarray:
        """`pair_valid(a, bs)`, remembered per `a` (free text asks for most of the vocabulary after each token, and
        frequent tokens come back): only pairs not asked before are computed."""
        bs = np.asarray(bs, np.int32)
        if len(bs) < 1024:
            return self.pair_valid(a, bs)
        with self._lock:
            entry = self._valid_cache.get(a)
            if entry is None:
                entry = self._valid_cache[a] = (np.zeros(self.n, bool), np.zeros(self.n, bool))  # valid, known
                if len(self._valid_cache) > 256:  # 256 KB each
                    self._valid_cache.popitem(last=False)
            else:
                self._valid_cache.move_to_end(a)
        valid, known = entry
        new = bs[~known[bs]]
        if len(new):
            valid[new] = self.pair_valid(a, new)
            known[new] = True
        return valid[bs]

    def new_chunk_mask(self, tail: str) -> np.ndarray:
        """Packed bitmask ([ceil((num_special + n) / 32)] int32, token ids) of the tokens that start a new chunk
        after `tail` (kind N, text not ending in whitespace): canonical whatever `tail`'s tokens are."""
        key = self.class_string(tail)
        with self._lock:
            got = self._nmask_cache.get(key)
        if got is None:
            bits = np.zeros(((self.nspec + self.n + 31) // 32) * 32, bool)
            ok = self.text_ok & ~self.ends_ws
            ok[ok] = self.kinds(tail)[self.ckey[ok]] == self.N
            bits[self.nspec : self.nspec + self.n] = ok
            got = np.packbits(bits, bitorder="little").view(np.int32)
            with self._lock:
                self._nmask_cache[key] = got
                if len(self._nmask_cache) > 1024:
                    self._nmask_cache.popitem(last=False)
        return got

    # ---- one step ----------------------------------------------------------------------------------------------

    N, C, SPAN, RECHUNK = 0, 1, 2, 3

    def kinds(self, tail: str, follower: str = "") -> np.ndarray:
        """For each class string: how a token of that class string joins the chunk `tail` (the text's last chunk).

        N: it starts a new chunk and stays inside it; C: it continues `tail`'s chunk and stays inside it; SPAN: the
        regex would cut it (never canonical); RECHUNK: `tail` itself would be chunked differently (checked exactly).
        With a `follower` character (class strings ending in whitespace only): as they would be were it to follow.
        """
        key = (self.class_string(tail), follower)
        with self._lock:
            got = self._kind_cache.get(key)
            if got is not None:
                self._kind_cache.move_to_end(key)
                return got
        tcls = key[0]
        j = len(tcls)
        base = self.chunk_starts(tcls)
        out = np.full(len(self.cstr), self.SPAN, np.int8)
        for k in self.ws_keys if follower else range(len(self.cstr)):
            c = self.cstr[k]
            starts = self.chunk_starts(tcls + c + follower)
            end = j + len(c)
            if any(j < s < end for s in starts):
                out[k] = self.SPAN
            elif [s for s in starts if s < j] != base:
                out[k] = self.RECHUNK
            else:
                out[k] = self.N if (j in starts or j == 0) else self.C
        with self._lock:
            self._kind_cache[key] = out
            if len(self._kind_cache) > 1024:
                self._kind_cache.popitem(last=False)
        return out

    def allowed(self, tail: str, tail_ids: list[int], cands: np.ndarray, encode) -> np.ndarray:
        """Which candidate tokens t (inner ranks) keep `tail_ids + [t]` a canonical prefix, given that `tail_ids`
        is one for `tail` (the text since the last chunk start that no continuation can move).

        `encode(text) -> inner ranks` is the tokenizer's own encoder. It decides exactly where the chunking is not
        settled by the candidate alone: a text ending in whitespace, whose split the next character decides
        (`\\s+(?!\\S)`), is checked followed by the end and by one character of every other class; a junction that
        re-chunks `tail` is encoded. Everything else is decided per class string and by `pair_valid`."""
        cands = np.asarray(cands, np.int32)
        out = np.zeros(len(cands), bool)
        idx = np.flatnonzero(self.text_ok[cands])
        if tail and tail[-1].isspace() and encode(tail) != list(tail_ids):  # whitespace held for a next word
            for i in idx:
                t = int(cands[i])
                want = [*tail_ids, t]
                text = tail + self.tstr[t]
                if self.ends_ws[t]:
                    out[i] = any(encode(text + x)[: len(want)] == want for x in self.followers)
                else:
                    out[i] = encode(text) == want
            return out
        ws = self.ends_ws[cands[idx]]
        w = idx[ws]
        if len(w):  # the text will end in whitespace: the end or some next character must agree
            k = self.ckey[cands[w]]
            per = np.stack([self.kinds(tail, x)[k] for x in self.followers])
            out[w[(per == self.N).any(0)]] = True
            c = (per == self.C).any(0) & ~out[w]
            if c.any():
                out[w[c]] = self.valid_after(tail_ids[-1], cands[w[c]])
            for i in w[(per == self.RECHUNK).any(0) & ~out[w]]:
                t = int(cands[i])
                want = [*tail_ids, t]
                out[i] = any(encode(tail + self.tstr[t] + x)[: len(want)] == want for x in self.followers)
        idx = idx[~ws]
        kind = self.kinds(tail)[self.ckey[cands[idx]]]
        out[idx[kind == self.N]] = True
        c = idx[kind == self.C]
        if len(c):
            out[c] = self.valid_after(tail_ids[-1], cands[c])
        for i in idx[kind == self.RECHUNK]:
            t = int(cands[i])
            out[i] = encode(tail + self.tstr[t]) == [*tail_ids, t]
        return out

    def advance(self, tail: str, tail_ids: tuple, t: int) -> tuple[str, tuple]:
        """(text, ids) since the last settled chunk start after appending token t: the last chunk's start, or
        where the text ends in whitespace, the start of the chunk holding the first character of that run."""
        text = tail + self.tstr[t]
        ids = (*tail_ids, t)
        starts = self.chunk_starts(text)
        cut = starts[-1]
        if self.ends_ws[t]:
            run = len(text) - len(text.rstrip())  # str.isspace agrees with \\s on every character tested
            cut = max(s for s in starts if s <= len(text) - run)
        bounds, pos = {}, 0
        for i, tok in enumerate(ids):
            bounds[pos] = i
            pos += len(self.tstr[tok])
        for s in sorted((s for s in starts if s <= cut), reverse=True):
            if s in bounds:
                return text[s:], ids[bounds[s]:]
        return text, ids

    def end_ok(self, tail: str, tail_ids: tuple, encode) -> bool:
        """Whether the text may end here (a special token or the end of output): its last chunk is canonical as
        it stands (a text ending in whitespace may have been accepted for the word that was to follow)."""
        return not tail or encode(tail) == list(tail_ids)
