"""The EAGLE drafter of `infer/speculative/decoder.py`: Mistral's EAGLE head (`small4_jax/nn/eagle.py`) on its own paged cache.

The draft's cache rows live in a second page array [L_draft, num_pages, page_size, R + r] addressed by the SAME page
ids and slots as the target's (a request's pages hold both), so admission, preemption, rollback and freeing need
nothing extra. Draft row i is computed from (t_{i+1}, h_i), h_i the target's final-normed hidden state at i.

Per request, the drafter keeps the target hidden states whose draft rows are not written yet ("pending"): always the
positions num_computed - c .. num_computed - 1 (1 <= c <= k + 1), in a device buffer [slots, k + 1, H] indexed by
the request's engine slot:
- after the last prefill chunk: c = 1, the last prompt position (the chunk's other rows are drafted at once, as are
  all rows of earlier chunks, whose next tokens are known);
- after a verify step that accepted a drafts: c = a + 1, the verified positions.
`propose` first writes the pending rows (one draft step over T = k + 1 positions; its last output proposes d_1),
then runs k - 1 single-token draft steps, each fed the previous step's token and output state. Drafts are greedy
(argmax of the draft's logits), which `verify_rows` treats as a one-hot draft distribution.

The target's hidden states come from the engine's own steps: prefill runs `hidden_step` (the same forward, also
returning the final-normed hidden states), and verify asks `verify_forward` for them (`needs_hidden`).

On a sharded cache (`cache_axes`) the draft's pages are sharded as the target's (a request's draft rows live on its
shard) and every draft step runs in the engine's layout (`Engine.to_shards`: each shard's rows in its block, page
ids the shard's own); drafts come back in request order. With `context_axes` (one sequence's pages split by
position) the draft's pages are split the same way, since they share the page ids: its rows are written on the
shard owning their positions and its attention merges the shards' partial results, as the target's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from small4_jax.ckpt.eagle import load_eagle
from small4_jax.nn.eagle import as_model
from small4_jax.nn.paged import PagedCache, cache_spec, forward


def _draft_forward(target, draft, pages, ids, hidden, positions, seq_index, slots, table, logit_index, cache_axes,
                   context_axes):
    """One draft step: (greedy token [B], state g [B, H] at logit_index, pages)."""
    view = as_model(draft, target)
    embeds = draft.fuse(target.embed_tokens(ids), hidden)
    logits, pages, g = forward(view, pages, ids, positions, seq_index, slots, table, logit_index, absorbed=True,
                               with_hidden=True, input_embeds=embeds, cache_axes=cache_axes,
                               context_axes=context_axes)
    g_last = jnp.take_along_axis(g, logit_index[:, None, None], axis=1)[:, 0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), g_last, pages


_STATIC = ("target_def", "draft_def", "cache_axes", "context_axes")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("pages",))
def draft_rows(target_def, target_state, draft_def, draft_state, pages, ids, hidden, seq_index, slots, table,
               cache_axes=(), context_axes=()):
    """Write draft rows for ids/hidden [B, T(, H)] at seq_index/slots (prefill); returns pages."""
    target, draft = nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state)
    index = jnp.zeros((ids.shape[0],), jnp.int32)
    return _draft_forward(target, draft, pages, ids, hidden, seq_index, seq_index, slots, table, index, cache_axes,
                          context_axes)[2]


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("pages",))
def propose_step(target_def, target_state, draft_def, draft_state, pages, buffer, ids, buffer_slot, seq_index, slots,
                 table, last, step_index, step_slots, cache_axes=(), context_axes=()):
    """Catch up the pending rows (ids [B, T], hidden buffer[buffer_slot], seq_index/slots [B, T], logits at `last`),
    then k - 1 greedy steps at step_index [B, k - 1] writing step_slots [B, k - 1, 2]. Returns (drafts [B, k], pages).
    """
    target, draft = nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state)
    hidden = buffer[buffer_slot]  # [B, T, H]
    token, g, pages = _draft_forward(target, draft, pages, ids, hidden, seq_index, seq_index, slots, table, last,
                                     cache_axes, context_axes)
    drafts = [token]
    zero = jnp.zeros_like(last)
    for s in range(step_index.shape[1]):
        pos = step_index[:, s : s + 1]
        token, g, pages = _draft_forward(target, draft, pages, token[:, None], g[:, None], pos, pos,
                                         step_slots[:, s : s + 1], table, zero, cache_axes, context_axes)
        drafts.append(token)
    return jnp.stack(drafts, axis=1), pages


@functools.partial(jax.jit, donate_argnames=("buffer",))
def put_pending(buffer, buffer_slot, rows, start, *, hidden):
    """buffer[buffer_slot[i], j] = hidden[rows[i], start[i] + j] for j < buffer width (clipped to hidden)."""
    width = buffer.shape[1]
    cols = jnp.clip(start[:, None] + jnp.arange(width)[None, :], 0, hidden.shape[1] - 1)
    return buffer.at[buffer_slot].set(hidden[rows[:, None], cols].astype(buffer.dtype))


@functools.partial(jax.jit, static_argnames=("graphdef", "absorbed", "cache_axes", "context_axes"),
                   donate_argnames=("pages",))
def hidden_step(graphdef, state, pages, ids, positions, seq_index, slots, page_table, logit_index, *, absorbed,
                input_embeds=None, cache_axes=(), context_axes=()):
    """`paged.logits_step` that also returns the final-normed hidden states of every token."""
    model = nnx.merge(graphdef, state)
    return forward(model, pages, ids, positions, seq_index, slots, page_table, logit_index, absorbed=absorbed,
                   with_hidden=True, input_embeds=input_embeds, cache_axes=cache_axes, context_axes=context_axes)


class EagleDrafter:
    needs_hidden = True

    def __init__(self, config, engine):
        self.k = config.num_draft_tokens
        # the engine loaded and placed it before sizing its cache (`Engine._load_draft`)
        draft = getattr(engine, "draft", None)
        self.draft = draft if draft is not None else load_eagle(config.path, engine.model)
        self.draft_def, self.draft_state = nnx.split(self.draft)
        sharding = pages_sharding = None
        if engine.mesh is not None:
            sharding = jax.sharding.NamedSharding(engine.mesh, jax.sharding.PartitionSpec())
            pages_sharding = jax.sharding.NamedSharding(engine.mesh, cache_spec(engine.cache_axes,
                                                                                engine.context_axes))
        num_pages, page_size = engine.pages.shape[1], engine.pages.shape[2]
        self.pages = PagedCache.create(self.draft.config, num_pages, page_size, engine.cache_dtype,
                                       pages_sharding).pages
        self.buffer = jnp.zeros((engine.max_batch + 1, self.k + 1, engine.config.hidden_size), engine.model.dtype,
                                device=sharding)
        self.pending: dict[str, int] = {}
        self._stash = None
        self._axes = dict(cache_axes=engine.cache_axes, context_axes=engine.context_axes)
        engine.logits_step = self._prefill_forward

    def _mesh(self, engine):
        return jax.set_mesh(engine.mesh) if engine.mesh is not None else contextlib.nullcontext()

    # ---- prefill ---------------------------------------------------------------------------------------------------
    def _prefill_forward(self, graphdef, state, pages, ids, positions, seq_index, slots, page_table, logit_index, *,
                         absorbed, input_embeds=None, cache_axes=(), context_axes=()):
        logits, pages, hidden = hidden_step(graphdef, state, pages, ids, positions, seq_index, slots, page_table,
                                            logit_index, absorbed=absorbed, input_embeds=input_embeds,
                                            cache_axes=cache_axes, context_axes=context_axes)
        self._stash = (hidden, np.asarray(seq_index), np.asarray(slots), np.asarray(page_table))
        return logits, pages

    def prefilled(self, engine, reqs, ends) -> None:
        """Draft rows of the chunk just prefilled (all but a final chunk's last row, which becomes pending). The
        stashed step inputs are in the step's layout (on a sharded cache: shard blocks, each shard's page ids)."""
        hidden, seq_index, slots, table = self._stash
        self._stash = None
        rows, chunk = seq_index.shape
        at = np.arange(len(reqs)) if engine.cache_shards == 1 else np.argsort(engine.shard_layout(reqs, rows))
        ids = np.zeros((rows, chunk), np.int32)
        write = np.zeros_like(slots)
        pend_rows, pend_slot, pend_start = [], [], []
        for q, (r, end) in enumerate(zip(reqs, ends)):
            i = int(at[q])  # the request's row of the step
            if r not in engine.running:
                continue
            start = int(seq_index[i, 0])
            n = end - start
            if len(r.tokens) == end + 1:  # final chunk: the last row waits for the first propose
                n -= 1
                self.pending[r.id] = 1
                pend_rows.append(i)
                pend_slot.append(r.slot)
                pend_start.append(end - 1 - start)
            ids[i, :n] = r.tokens[start + 1 : start + 1 + n]
            write[i, :n] = slots[i, :n]
        with self._mesh(engine):
            self.pages = draft_rows(engine.graphdef, engine.state, self.draft_def, self.draft_state, self.pages, ids,
                                    hidden, seq_index, write, table, **self._axes)
            if pend_rows:
                self.buffer = put_pending(self.buffer, *self._padded(engine, rows, pend_slot, pend_rows, pend_start),
                                          hidden=hidden)

    # ---- decode ----------------------------------------------------------------------------------------------------
    def propose(self, engine, reqs, rooms) -> list[list[int]]:
        size, k = engine.page_size, self.k
        rows, t = engine.padded_rows(reqs, engine.batch_buckets), k + 1
        ids = np.zeros((rows, t), np.int32)
        seq_index = np.zeros((rows, t), np.int32)
        slots = np.zeros((rows, t, 2), np.int32)
        last = np.zeros((rows,), np.int32)
        buffer_slot = np.full((rows,), engine.max_batch, np.int32)
        step_index = np.zeros((rows, max(k - 1, 0)), np.int32)
        step_slots = np.zeros((rows, max(k - 1, 0), 2), np.int32)
        for i, (r, room) in enumerate(zip(reqs, rooms)):
            c = self.pending.get(r.id, 0)
            n_done = r.num_computed
            start = n_done - c
            if c:
                ids[i, :c] = r.tokens[start + 1 : n_done + 1]
                pos = np.arange(start, n_done)
                seq_index[i] = n_done - 1
                seq_index[i, :c] = pos
                slots[i, :c, 0] = [r.pages[p // size] for p in pos]
                slots[i, :c, 1] = pos % size
                last[i] = c - 1
                buffer_slot[i] = r.slot
            self.pending[r.id] = 0
            for s in range(k - 1):
                p = n_done + s
                step_index[i, s] = p
                if s < room - 1:
                    step_slots[i, s] = (r.pages[p // size], p % size)
        table = engine.page_table(reqs, rows, max(len(r.pages) for r in reqs))
        (ids, seq_index, last, buffer_slot, step_index, step_slots), slots, table, perm = engine.to_shards(
            reqs, rows, (ids, seq_index, last, buffer_slot, step_index, step_slots), slots, table)
        if perm is not None or engine.context_shards > 1:  # each shard's own page ids, as `to_shards` made slots
            step_slots = step_slots.copy()
            step_slots[..., 0] %= engine.pool.per_shard
        with self._mesh(engine):
            drafts, self.pages = propose_step(engine.graphdef, engine.state, self.draft_def, self.draft_state,
                                              self.pages, self.buffer, ids, buffer_slot, seq_index, slots, table,
                                              last, step_index, step_slots, **self._axes)
        drafts = np.asarray(jax.device_get(drafts))
        if perm is not None:
            drafts = drafts[np.argsort(perm)]
        return [drafts[i, :room].tolist() for i, room in enumerate(rooms)]

    def verified(self, engine, reqs, tokens, accepted, hidden) -> None:
        """The verified positions (last token + accepted drafts) become pending, their hidden states buffered."""
        n = len(reqs)
        for i, r in enumerate(reqs):
            self.pending[r.id] = int(accepted[i]) + 1
        with self._mesh(engine):
            self.buffer = put_pending(self.buffer, *self._padded(engine, hidden.shape[0], [r.slot for r in reqs],
                                                                 range(n), [0] * n), hidden=hidden)
        running = {r.id for r in engine.running}
        self.pending = {i: c for i, c in self.pending.items() if i in running}

    @staticmethod
    def _padded(engine, rows, slots, src_rows, starts):
        """(buffer slots, source rows, starts) padded to `rows` entries (padding writes the padding slot), so the
        copy compiles once per batch shape, not once per number of rows."""
        pad = rows - len(slots)
        return (np.asarray(list(slots) + [engine.max_batch] * pad, np.int32),
                np.asarray(list(src_rows) + [0] * pad, np.int32), np.asarray(list(starts) + [0] * pad, np.int32))

    def warmup(self, engine) -> None:
        """Compile the draft's steps for every batch and prefill shape (the target's are the engine's)."""
        k, hdim, c = self.k, engine.config.hidden_size, engine.context_shards
        widths = sorted({-(-w // c) * c for w in engine.page_buckets})  # `to_shards` pads a split table to c columns
        with self._mesh(engine):
            for width, b in itertools.product(widths, engine.batch_buckets):
                zeros = np.zeros((b, k + 1), np.int32)
                _, self.pages = propose_step(
                    engine.graphdef, engine.state, self.draft_def, self.draft_state, self.pages, self.buffer, zeros,
                    np.full((b,), engine.max_batch, np.int32), zeros, np.zeros((b, k + 1, 2), np.int32),
                    np.zeros((b, width), np.int32), np.zeros((b,), np.int32), np.zeros((b, max(k - 1, 0)), np.int32),
                    np.zeros((b, max(k - 1, 0), 2), np.int32), **self._axes)
                hidden = jnp.zeros((b, k + 1, hdim), self.buffer.dtype)
                self.buffer = put_pending(self.buffer, *self._padded(engine, b, [], [], []), hidden=hidden)
            for width, p in itertools.product(widths, engine.prefill_buckets):
                zeros = np.zeros((p, engine.prefill_chunk), np.int32)
                hidden = jnp.zeros((p, engine.prefill_chunk, hdim), self.buffer.dtype)
                self.pages = draft_rows(engine.graphdef, engine.state, self.draft_def, self.draft_state, self.pages,
                                        zeros, hidden, zeros, np.zeros((p, engine.prefill_chunk, 2), np.int32),
                                        np.zeros((p, width), np.int32), **self._axes)
                self.buffer = put_pending(self.buffer, *self._padded(engine, p, [], [], []), hidden=hidden)
