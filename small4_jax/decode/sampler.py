"""Per-row next-token sampling for a batch of independent requests: the one sampler of the serving engine.

Each row's logits go through, in order:
1. `logit_bias` (OpenAI): a per-row sparse list of (token id, value) added to the logits;
2. `repetition_penalty` (HF / vLLM): logits of tokens seen in the prompt or the output are divided by it when
   positive and multiplied by it when negative (1 = off);
3. `frequency_penalty` and `presence_penalty` (OpenAI): minus frequency * count - presence * (count > 0), with
   count the token's occurrences in the output so far;
4. the structured-output mask: a per-row bitmask [B, ceil(V/32)] int32 (bit j of word w allows token 32w + j,
   llguidance's layout); disallowed tokens get -inf;
5. temperature (0 = greedy: argmax of the result of 1-4), then top-k, top-p and min-p.
`adjusted_logits` (1-4) and `filtered_logits` (5) are public: `sampling_logits` composes them into the exact
distribution a row's token is drawn from (softmax of it), which rejection sampling (speculative decoding) needs.

Every setting is a traced array with one value per row, so requests with different settings share one compiled
step and changing them never recompiles. A row's random key is `fold_in(key(seed), counter)` where the counter is
the number of tokens the request has generated: a seeded request draws the same tokens whatever else is in the
batch. Logprobs are those of the model's distribution (raw logits, before any processing), as OpenAI-compatible
servers report them.

The output counts live on the device in a `TokenHistory` ([slots, V], one slot per running request, owned by the
engine): `sample_rows` adds each accepted token to its row's slot, so no per-step host transfer grows with the
output length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGIT_BIAS = 300  # entries of logit_bias per request (OpenAI's limit)


def mask_words(vocab: int) -> int:
    """int32 words of a row's token bitmask."""
    return (vocab + 31) // 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Sampling settings of each row: arrays [B] unless noted.

    temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off), seed and counter (int32);
    presence_penalty, frequency_penalty (0 = off), repetition_penalty (1 = off);
    bias_ids, bias_values [B, MAX_LOGIT_BIAS] (value 0 = unused entry);
    mask [B, ceil(V/32)] int32 allowed-token bitmask (all bits set = unconstrained);
    slot: the row's slot in the `TokenHistory`; accept: 1 where the sampled token joins the output (0 for padding
    rows and prefill rows that have not reached the end of their prompt).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    counter: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array
    mask: jax.Array
    slot: jax.Array
    accept: jax.Array

    @classmethod
    def from_lists(cls, temperature, top_k, top_p, min_p, seed, counter, *, vocab: int, presence=None,
                   frequency=None, repetition=None, logit_bias=None, mask=None, slot=None, accept=None) -> RowSampling:
        """Settings from per-row lists; logit_bias is a list of {token id: value} (or None) per row, mask an
        array [B, ceil(V/32)] or None (unconstrained); the rest default to off, slot 0, accept 1."""
        f32, i32 = np.float32, np.int32
        b = len(temperature)
        bias_ids = np.zeros((b, MAX_LOGIT_BIAS), i32)
        bias_values = np.zeros((b, MAX_LOGIT_BIAS), f32)
        for i, entries in enumerate(logit_bias or ()):
            if entries:
                bias_ids[i, : len(entries)] = list(entries.keys())
                bias_values[i, : len(entries)] = list(entries.values())
        if mask is None:
            mask = np.full((b, mask_words(vocab)), -1, i32)
        return cls(
            temperature=np.asarray(temperature, f32), top_k=np.asarray(top_k, i32), top_p=np.asarray(top_p, f32),
            min_p=np.asarray(min_p, f32), seed=np.asarray(seed, np.uint32).view(i32), counter=np.asarray(counter, i32),
            presence_penalty=np.asarray(presence if presence is not None else [0.0] * b, f32),
            frequency_penalty=np.asarray(frequency if frequency is not None else [0.0] * b, f32),
            repetition_penalty=np.asarray(repetition if repetition is not None else [1.0] * b, f32),
            bias_ids=bias_ids, bias_values=bias_values, mask=np.asarray(mask, i32),
            slot=np.asarray(slot if slot is not None else [0] * b, i32),
            accept=np.asarray(accept if accept is not None else [1] * b, i32),
        )

    @classmethod
    def greedy(cls, batch: int, vocab: int) -> RowSampling:
        zeros = [0] * batch
        return cls.from_lists(zeros, zeros, [1.0] * batch, zeros, zeros, zeros, vocab=vocab, accept=zeros)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenHistory:
    """Per-slot token statistics on the device: counts [S, V] int32 (occurrences in the output) and
    prompt [S, V] bool (present in the prompt), for the penalties."""

    counts: jax.Array
    prompt: jax.Array

    @classmethod
    def create(cls, slots: int, vocab: int, sharding=None) -> TokenHistory:
        counts = jnp.zeros((slots, vocab), jnp.int32, device=sharding)
        return cls(counts, jnp.zeros((slots, vocab), jnp.bool_, device=sharding))


@jax.jit
def set_slot(history: TokenHistory, slot, counts, prompt) -> TokenHistory:
    """Overwrite one slot (a request admitted with penalties): counts [V] int32 and prompt [V] bool."""
    return TokenHistory(history.counts.at[slot].set(counts), history.prompt.at[slot].set(prompt))


def allowed_by_mask(mask: jax.Array, vocab: int) -> jax.Array:
    """Bitmask [B, ceil(V/32)] int32 -> allowed [B, V] bool."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    return bits.reshape(mask.shape[0], -1)[:, :vocab].astype(jnp.bool_)


def adjusted_logits(logits: jax.Array, p: RowSampling, counts: jax.Array, prompt: jax.Array) -> jax.Array:
    """Steps 1-4 of the module docstring: logits [B, V] float32 with logit bias, penalties and the mask applied.
    counts [B, V] int32 and prompt [B, V] bool are the rows' history (`TokenHistory` rows at their slots)."""
    logits = jnp.asarray(logits, jnp.float32)
    b, vocab = logits.shape
    rows = jnp.arange(b)[:, None]
    logits = logits.at[rows, p.bias_ids].add(p.bias_values)
    seen = prompt | (counts > 0)
    rp = p.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - p.frequency_penalty[:, None] * counts - p.presence_penalty[:, None] * (counts > 0)
    return jnp.where(allowed_by_mask(p.mask, vocab), logits, -jnp.inf)


def filtered_logits(logits: jax.Array, p: RowSampling) -> jax.Array:
    """Step 5: logits [B, V] / temperature with everything outside top-k, top-p and min-p set to -inf."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    # top-k: keep logits >= the k-th largest (k = 0 keeps everything)
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    keep = scaled >= kth
    # top-p: the smallest prefix of the (top-k) sorted distribution whose mass reaches top_p
    sorted_probs = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    cutoff = jnp.min(jnp.where(mass_before < p.top_p[:, None], sorted_desc, jnp.inf), axis=-1, keepdims=True)
    keep &= scaled >= cutoff
    # min-p: keep tokens whose probability is at least min_p times the largest one
    keep &= scaled >= sorted_desc[:, :1] + jnp.log(p.min_p)[:, None]
    return jnp.where(keep, scaled, -jnp.inf)


def sampling_logits(logits: jax.Array, p: RowSampling, counts: jax.Array, prompt: jax.Array) -> jax.Array:
    """The processed distribution of each sampled row (temperature > 0): its tokens are drawn from softmax of
    this. Greedy rows take the argmax of `adjusted_logits` instead."""
    return filtered_logits(adjusted_logits(logits.astype(jnp.float32), p, counts, prompt), p)


def sample_rows(logits: jax.Array, p: RowSampling, history: TokenHistory, num_top: int):
    """logits [B, V] -> (tokens [B] int32, their logprobs [B], top ids [B, num_top], top logprobs [B, num_top],
    history with the accepted tokens counted)."""
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    counts, prompt = history.counts[p.slot], history.prompt[p.slot]
    adjusted = adjusted_logits(logits, p, counts, prompt)
    greedy = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)

    def draw(_):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s.astype(jnp.uint32)), c))(p.seed, p.counter)
        sampled = jax.vmap(jax.random.categorical)(keys, filtered_logits(adjusted, p)).astype(jnp.int32)
        return jnp.where(p.temperature > 0, sampled, greedy)

    tokens = jax.lax.cond(jnp.any(p.temperature > 0), draw, lambda _: greedy, None)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    history = TokenHistory(history.counts.at[p.slot, tokens].add(p.accept), history.prompt)
    return tokens, chosen, top_ids.astype(jnp.int32), top_logprobs, history


def verify_rows(logits: jax.Array, drafts: jax.Array, num_drafts: jax.Array, p: RowSampling, history: TokenHistory,
                num_top: int):
    """Speculative verification: accept a prefix of each row's draft tokens so the output keeps the target's law.

    logits [B, T, V]: the target's logits after the last accepted token (position 0) and after each of the T - 1
    draft tokens drafts [B, T - 1]; num_drafts [B]: how many of them are real (the rest is padding). Position j is
    processed exactly as `sample_rows` would after d_1..d_j joined the output (its penalties count them; the
    structured-output mask is p.mask [B, W] for position 0 only, or [B, T, W] with position j's own mask, the
    grammar's state after d_1..d_j: `infer.speculative.decoder.draft_masks`). Drafters are
    deterministic (the draft distribution q is one-hot on the proposed token), so the rejection-sampling rule of
    Leviathan et al. / Chen et al. becomes: accept d_j with probability p_j(d_j), p_j the softmax of
    `sampling_logits`; at the first rejection draw from the residual max(p_j - q_j, 0), i.e. p_j without d_j
    renormalised; if every draft is accepted draw the bonus token from p_T. Greedy rows (temperature 0) accept d_j
    iff it is the argmax, so their output is exactly the non-speculative greedy output. Position j of a row uses the
    key fold_in(key(seed), counter + j), split into the acceptance coin and the draw.

    Returns (num_accepted [B], tokens [B, T], their logprobs [B, T], top ids [B, T, num_top], top logprobs
    [B, T, num_top], history with the row's accepted drafts and own token counted); tokens[:, :num_accepted] are the
    accepted drafts, tokens[:, num_accepted] the target's own token, later positions are meaningless. Logprobs are
    those of the raw model distribution, as in `sample_rows`.
    """
    b, t, vocab = logits.shape
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    j = jnp.arange(t, dtype=jnp.int32)[None, :]
    d = jnp.concatenate([drafts.astype(jnp.int32), jnp.zeros((b, 1), jnp.int32)], axis=1)  # [B, T]
    real = j < num_drafts[:, None]
    # the rows' history at each position: d_1..d_j counted (padding drafts never are)
    seen = jax.nn.one_hot(jnp.where(real, d, vocab), vocab, dtype=jnp.int32)  # [B, T, V]
    counts = history.counts[p.slot][:, None] + jnp.cumsum(seen, axis=1) - seen
    prompt = jnp.broadcast_to(history.prompt[p.slot][:, None], (b, t, vocab))
    per_position = p.mask.ndim == 3
    rows = jax.tree.map(lambda x: jnp.repeat(x, t, axis=0), dataclasses.replace(p, mask=p.mask[:, 0])
                        if per_position else p)
    rows = dataclasses.replace(rows, counter=rows.counter + jnp.tile(jnp.arange(t, dtype=jnp.int32), b),
                               mask=p.mask.reshape(b * t, -1) if per_position else rows.mask)
    adjusted = adjusted_logits(logits.reshape(b * t, vocab), rows, counts.reshape(b * t, vocab),
                               prompt.reshape(b * t, vocab))
    greedy = jnp.argmax(adjusted, axis=-1).astype(jnp.int32).reshape(b, t)

    def draw(_):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s.astype(jnp.uint32)), c))(rows.seed,
                                                                                                   rows.counter)
        keys = jax.vmap(jax.random.split)(keys)  # [B*T, 2]
        coin = jax.vmap(jax.random.uniform)(keys[:, 0]).reshape(b, t)
        filtered = filtered_logits(adjusted, rows).reshape(b, t, vocab)
        p_draft = jnp.take_along_axis(jax.nn.softmax(filtered, axis=-1), d[..., None], axis=-1)[..., 0]
        residual = jnp.where(real[..., None] & (jnp.arange(vocab) == d[..., None]), -jnp.inf, filtered)
        drawn = jax.vmap(jax.random.categorical)(keys[:, 1], residual.reshape(b * t, vocab)).reshape(b, t)
        hot = (p.temperature > 0)[:, None]
        return jnp.where(hot, coin < p_draft, d == greedy), jnp.where(hot, drawn.astype(jnp.int32), greedy)

    accept, own = jax.lax.cond(jnp.any(p.temperature > 0), draw, lambda _: (d == greedy, greedy), None)
    accept &= real
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    tokens = jnp.where(j < num_accepted[:, None], d, own)
    chosen = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    joined = (j <= num_accepted[:, None]) & (p.accept[:, None] > 0)
    slots = jnp.broadcast_to(p.slot[:, None], (b, t))
    history = TokenHistory(history.counts.at[slots, tokens].add(joined.astype(jnp.int32)), history.prompt)
    return num_accepted, tokens, chosen, top_ids.astype(jnp.int32), top_logprobs, history
