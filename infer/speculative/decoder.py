"""Speculative decoding for the serving engine: a drafter proposes k tokens per row, one batched target step verifies.

    --speculative ngram            prompt lookup: the continuation of the latest earlier occurrence of the row's last
                                   n tokens (n from `ngram_max` down to `ngram_min`); no draft model
    --speculative eagle:DIR        Mistral's EAGLE draft head (`small4_jax/nn/eagle.py`), sharing the target's
                                   embeddings and lm_head and reading its final hidden states
    --num-draft-tokens k           tokens proposed per row and step (default 4)

Each speculative decode step, for every generating row (`decode`):
1. room = min(k, tokens left before max_tokens / max_model_len); the row gets cache pages for 1 + room new rows
   (preempting younger requests exactly as a plain decode step does);
2. the drafter proposes up to `room` tokens d_1..d_n (fewer where it has nothing: n-gram without a match);
   structured-output rows cut their drafts to what the grammar allows (`draft_masks`);
3. one target step over [last token, d_1 .. d_n] (T = k + 1, padded; absorbed MLA on the paged cache, every
   position's logits) and `batch_sampling.verify_rows` (a grammar row's position j masked by its grammar's state
   after d_1..d_j): greedy rows accept while d_j is the argmax, sampled rows by
   rejection sampling against the one sampler's processed distribution; each row gains its accepted drafts plus
   the target's own next token;
4. rollback: the row's computed length becomes old + 1 + accepted, so the cache rows written for rejected drafts
   are dead (never attended: the causal mask stops at the sequence length; overwritten by the next step), and the
   pages beyond what the row now needs go back to the pool.

On a sharded cache (`cache_axes`) the verify step is the engine's layout: each shard's rows in its block of the
batch, attending over that shard's own pages (`Engine.to_shards`), logits handed back in request order; a row's
pages all come from its shard, so rollback returns them there. With `context_axes` the verify step attends over
the position-split cache as decode does. An EAGLE draft's own cache is sharded the same way, by row or by position
(`infer/speculative/eagle_drafter.py`).

Tokens are handed to the engine's `accept` one position at a time, so stop ids, stop strings, max_tokens, logprobs
and streaming behave exactly as without speculation (a row that stops mid-draft drops the rest).
Counters for /metrics: draft tokens proposed, accepted, verify rows; acceptance rate = accepted / proposed, mean
accepted length = (accepted + rows) / rows tokens per row and step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.engine.engine import MAX_TOP_LOGPROBS
from infer.speculative.eagle_drafter import EagleDrafter
from infer.structured import fill_masks
from small4_jax.decode.sampler import mask_words, verify_rows
from small4_jax.errors import InputError
from small4_jax.nn.paged import forward

METHODS = ("ngram", "eagle")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """What drafts and how far: `method` "ngram" or "eagle" (with `path`, the draft checkpoint directory)."""

    method: str
    path: str | None = None
    num_draft_tokens: int = 4
    ngram_max: int = 4
    ngram_min: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"--speculative {self.method!r}: expected one of 'ngram', 'eagle:DIR'")
        if self.method == "eagle" and not self.path:
            raise InputError("--speculative eagle needs the draft directory: eagle:DIR")
        if self.method == "ngram" and self.path:
            raise InputError(f"--speculative ngram takes no directory, got ngram:{self.path}")
        k = self.num_draft_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"--num-draft-tokens must be a positive integer, got {k!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InputError(f"ngram sizes must satisfy 1 <= ngram_min <= ngram_max, got {self.ngram_min}, "
                             f"{self.ngram_max}")

    def check_files(self) -> None:
        """The EAGLE draft directory exists and holds a config (checked before a model is built)."""
        if self.method != "eagle":
            return
        d = Path(self.path)
        if not d.is_dir():
            raise InputError(f"--speculative eagle:{self.path}: not a directory")
        if not any((d / n).is_file() for n in ("params.json", "config.json")):
            raise InputError(f"--speculative eagle:{self.path}: no params.json or config.json (expected an EAGLE "
                             "draft checkpoint directory)")

    @classmethod
    def parse(cls, text: str, num_draft_tokens: int = 4) -> SpeculativeConfig:
        """'ngram' or 'eagle:DIR' (the --speculative flag)."""
        method, _, path = text.partition(":")
        return cls(method.strip().lower(), path or None, num_draft_tokens)

    def build(self, engine) -> Speculator:
        """The engine's speculative step for this config (`Engine` calls it; the engine does not import this package)."""
        return Speculator(self, engine)


# ----------------------------------------------------------------------------------------------------------------------
# Drafters. Each proposes, for rows `reqs`, up to rooms[i] tokens continuing reqs[i].tokens (deterministically: the
# draft distribution is one-hot, see `verify_rows`).
def ngram_lookup(tokens: np.ndarray, room: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Prompt lookup: for n = ngram_max .. ngram_min, find the latest earlier occurrence of the last n tokens and
    return (up to `room` of) the tokens that followed it; [] when no suffix recurs."""
    size = len(tokens)
    if room <= 0:
        return []
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        suffix = tokens[size - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: size - 1], n)  # starts 0 .. size - 1 - n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start: start + room].tolist()
    return []


class NgramDrafter:
    """Draft-free prompt lookup (`ngram_lookup`) over each row's prompt and output.

    Each request's tokens are kept in a growing numpy array (only the new tokens are copied per step), so the host
    cost per step is the vectorised search, not a list conversion of the whole sequence."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}

    def _tokens(self, r) -> np.ndarray:
        buf, n = self._arrays.get(r.id, (np.zeros(0, np.int32), 0))
        total = len(r.tokens)
        if total > len(buf):
            grown = np.zeros(max(2 * len(buf), total, 64), np.int32)
            grown[:n] = buf[:n]
            buf = grown
        if total > n:
            buf[n:total] = r.tokens[n:total]
        self._arrays[r.id] = (buf, total)
        return buf[:total]

    def propose(self, engine, reqs, rooms) -> list[list[int]]:
        c = self.config
        live = {r.id for r in engine.running}
        for rid in [rid for rid in self._arrays if rid not in live]:
            del self._arrays[rid]
        return [ngram_lookup(self._tokens(r), room, c.ngram_max, c.ngram_min) for r, room in zip(reqs, rooms)]


def make_drafter(config: SpeculativeConfig, engine):
    if config.method == "ngram":
        return NgramDrafter(config)
    return EagleDrafter(config, engine)


# ----------------------------------------------------------------------------------------------------------------------
# The verify step.
@functools.partial(jax.jit, static_argnames=("graphdef", "with_hidden", "cache_axes", "context_axes"),
                   donate_argnames=("pages",))
def verify_forward(graphdef, state, pages, ids, positions, seq_index, slots, page_table, *, with_hidden: bool = False,
                   cache_axes: tuple[str, ...] = (), context_axes: tuple[str, ...] = ()):
    """The target over ids [B, T] = [last token, drafts] on the paged cache (absorbed MLA, as decode), logits at
    every position: (logits [B, T, V], pages[, final-normed hidden [B, T, H]]). cache_axes: a sharded cache's axes
    (rows in shard blocks, page ids each shard's own: `paged.forward`); context_axes: one sequence's pages split
    by position (`paged.absorbed_attention`)."""
    model = nnx.merge(graphdef, state)
    b, t = ids.shape
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return forward(model, pages, ids, positions, seq_index, slots, page_table, index, absorbed=True,
                   with_hidden=with_hidden, cache_axes=cache_axes, context_axes=context_axes)


def draft_masks(tokenizer, reqs, drafts: np.ndarray, num_drafts: np.ndarray, mask: np.ndarray,
                on_error=None) -> int:
    """Structured-output rows in a verify step: cut each row's drafts to what its grammar allows and write the
    token mask of every verify position into mask [B, T, W] (position j: the matcher's state after d_1..d_j, so
    verification masks each position as plain decoding would after those tokens). The matchers are walked forward
    through the drafts and rolled back, so they end as they began; `Engine.accept` consumes what is accepted.

    Rows without a matcher are left alone (all bits set). num_drafts is lowered in place where a draft is not
    allowed (the grammar rejects it, or a token before it already ends the output); returns the masked rows'
    number of positions (the mask work done).

    A grammar that raises fails its own row only when `on_error(i, exception)` is given: the rows are then redone
    one at a time, a failing row's drafts are dropped and its mask left all-ones (the caller fails that request),
    and the other rows are masked as usual. Without `on_error` the exception propagates."""
    rows = [(i, r.matcher) for i, r in enumerate(reqs) if r.matcher is not None]
    try:
        return _walk_drafts(tokenizer, reqs, rows, drafts, num_drafts, mask)
    except Exception:
        if on_error is None:
            raise
    done = 0
    for i, m in rows:
        try:
            done += _walk_drafts(tokenizer, reqs, [(i, m)], drafts, num_drafts, mask)
        except Exception as e:
            num_drafts[i] = 0
            mask[i] = -1
            on_error(i, e)
    return done


def _walk_drafts(tokenizer, reqs, rows, drafts, num_drafts, mask) -> int:
    """draft_masks for the (row, matcher) pairs `rows`; each matcher is rolled back to where it began even when a
    mask or a consume raises."""
    flat = mask.reshape(-1, mask.shape[-1])  # a view: position j of row i is flat row i * T + j
    t = mask.shape[1]
    for i, m in rows:
        n = int(num_drafts[i])
        if n:
            n = m.validate_tokens(drafts[i, :n].tolist())
            ends = [j for j in range(n) if int(drafts[i, j]) in reqs[i].stop_ids]
            num_drafts[i] = min([n] + [j + 1 for j in ends])  # nothing is drafted past a stop token
    consumed = dict.fromkeys((i for i, _ in rows), 0)
    done = 0
    try:
        for j in range(int(max([num_drafts[i] for i, _ in rows], default=0)) + 1):
            at = [(m, i * t + j) for i, m in rows if num_drafts[i] >= j]
            if j:
                for m, row in at:
                    if not m.consume_token(int(drafts[row // t, j - 1])):
                        raise RuntimeError(f"structured output: a validated draft was refused: {m.get_error()}")
                    consumed[row // t] += 1
            fill_masks(tokenizer, [(m, row) for m, row in at if not m.is_stopped()], flat)  # stopped: nothing follows
            done += len(at)
    finally:
        for i, m in rows:
            if consumed[i]:
                m.rollback(consumed[i])
    return done


_verify = jax.jit(verify_rows, static_argnames=("num_top",), donate_argnames=("history",))


class Speculator:
    """The engine's speculative decode step (`decode`) and its counters."""

    def __init__(self, config: SpeculativeConfig, engine):
        self.config = config
        self.k = config.num_draft_tokens
        self.drafter = make_drafter(config, engine)
        self.stats = dict(spec_draft_tokens=0, spec_accepted_tokens=0, spec_verify_rows=0)

    def metrics(self) -> dict:
        s = self.stats
        rate = s["spec_accepted_tokens"] / s["spec_draft_tokens"] if s["spec_draft_tokens"] else 0.0
        length = (s["spec_accepted_tokens"] + s["spec_verify_rows"]) / s["spec_verify_rows"] if s["spec_verify_rows"] \
            else 0.0
        return dict(s, spec_acceptance_rate=rate, spec_mean_accepted_length=length)

    def prefilled(self, engine, reqs, ends) -> None:
        if hasattr(self.drafter, "prefilled"):
            self.drafter.prefilled(engine, reqs, ends)

    def warmup(self, engine) -> None:
        t = self.k + 1
        for w in engine.page_buckets:
            for b in engine.batch_buckets:
                zeros = np.zeros((b, t), np.int32)
                self._run(engine, zeros, zeros, np.zeros((b, t, 2), np.int32), np.zeros((b, w), np.int32),
                          np.zeros((b, self.k), np.int32), np.zeros((b,), np.int32), [], b)
        if hasattr(self.drafter, "warmup"):
            self.drafter.warmup(engine)

    def _run(self, engine, ids, seq_index, slots, table, drafts, num_drafts, reqs, rows):
        """The verify forward, then `verify_rows` with the rows' settings (built while the device runs). On a sharded
        cache the forward runs with each shard's rows in its block (`Engine.to_shards`) and its logits come back in
        request order, so verification, drafts and rollback never see the layout."""
        (ids, seq_index), slots, table, perm = engine.to_shards(reqs, rows, (ids, seq_index), slots, table)
        engine.set_adapters(reqs, rows, perm)
        with jax.set_mesh(engine.mesh) if engine.mesh is not None else contextlib.nullcontext():
            out = verify_forward(engine.graphdef, engine.state, engine.pages, ids, seq_index, seq_index, slots, table,
                                 with_hidden=getattr(self.drafter, "needs_hidden", False),
                                 cache_axes=engine.cache_axes, context_axes=engine.context_axes)
            engine.pages = out[1]
            logits, hidden = out[0], (out[2] if len(out) > 2 else None)
            if perm is not None:
                inv = np.argsort(perm)
                logits, hidden = logits[inv], (None if hidden is None else hidden[inv])
            mask = np.full((rows, self.k + 1, mask_words(engine.config.vocab_size)), -1, np.int32)
            if any(r.matcher is not None for r in reqs):
                t0 = time.perf_counter()
                engine.stats["masked_tokens"] += draft_masks(
                    engine.tokenizer, reqs, drafts, num_drafts, mask,
                    on_error=lambda i, e: engine.fail(reqs[i], "structured output mask", e))
                engine.stats["mask_seconds"] += time.perf_counter() - t0
            sampling = engine.row_sampling(reqs, rows, [1] * len(reqs), mask=mask)
            *result, engine.history = _verify(logits, drafts, num_drafts, sampling, engine.history,
                                              num_top=MAX_TOP_LOGPROBS)
        return jax.device_get(result), hidden

    def decode(self, engine, reqs: list) -> None:
        """One speculative step for the generating rows `reqs` (see the module docstring)."""
        size = engine.page_size
        rooms = {}
        for r in list(reqs):
            if r not in engine.running:
                continue
            room = min(self.k, r.options.max_tokens - r.generated - 1, engine.max_model_len - len(r.tokens) - 1)
            rooms[r.id] = max(room, 0)
            if not engine.ensure_pages(r, r.num_computed + 1 + rooms[r.id]):
                reqs.remove(r)
        reqs = [r for r in reqs if r in engine.running]
        if not reqs:
            return
        drafts = self.drafter.propose(engine, reqs, [rooms[r.id] for r in reqs])
        rows, t = engine.padded_rows(reqs, engine.batch_buckets), self.k + 1
        ids = np.zeros((rows, t), np.int32)
        seq_index = np.zeros((rows, t), np.int32)
        slots = np.zeros((rows, t, 2), np.int32)  # padding writes go to the null page
        draft_ids = np.zeros((rows, self.k), np.int32)
        num_drafts = np.zeros((rows,), np.int32)
        for i, (r, d) in enumerate(zip(reqs, drafts)):
            d = d[: rooms[r.id]]
            n, start = len(d), r.num_computed
            ids[i, : n + 1] = [r.tokens[start], *d]
            seq_index[i] = start + n
            seq_index[i, : n + 1] = np.arange(start, start + n + 1)
            slots[i, : n + 1, 0] = [r.pages[p // size] for p in range(start, start + n + 1)]
            slots[i, : n + 1, 1] = np.arange(start, start + n + 1) % size
            draft_ids[i, :n] = d
            num_drafts[i] = n
        table = engine.page_table(reqs, rows, max(len(r.pages) for r in reqs))
        (accepted, tokens, logprobs, top_ids, top_lp), hidden = self._run(
            engine, ids, seq_index, slots, table, draft_ids, num_drafts, reqs, rows)
        engine.stats["decode_steps"] += 1
        self.stats["spec_verify_rows"] += len(reqs)
        self.stats["spec_draft_tokens"] += int(num_drafts.sum())
        self.stats["spec_accepted_tokens"] += int(accepted[: len(reqs)].sum())
        for i, r in enumerate(reqs):
            r.num_computed += 1 + int(accepted[i])
            engine.register_pages(r)
        if hidden is not None:
            self.drafter.verified(engine, reqs, tokens, accepted, hidden)
        for j in range(int(accepted[: len(reqs)].max()) + 1):
            idx = [i for i, r in enumerate(reqs) if accepted[i] >= j and r in engine.running]
            if idx:
                engine.accept([reqs[i] for i in idx], (tokens[idx, j], logprobs[idx, j], top_ids[idx, j],
                                                        top_lp[idx, j]))
        for r in reqs:  # roll back: pages past what the row now holds go back to the pool
            if r in engine.running:
                keep = math.ceil(len(r.tokens) / size)
                if len(r.pages) > keep:
                    engine.pool.release(r.pages[keep:])
                    del r.pages[keep:]

