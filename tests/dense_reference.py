"""The contiguous-cache decoder, kept as the tests' reference: one request over a dense latent `KVCache` with
`Small4ForCausalLM.step` (expanded MLA: the model's own forward, checked against transformers in test_generate.py).
`small4_jax.decode.generation.generate` and the serving engine run the paged, absorbed steps; tests compare them
with this loop.

The prompt is read in chunks whose lengths are powers of two (its binary decomposition: 100 = 64 + 32 + 4), so a
new prompt length reuses the chunk programs already compiled (CI time)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from small4_jax.decode.sampling import SamplingParams, sample
from small4_jax.errors import InputError
from small4_jax.nn.model import KVCache, Small4ForCausalLM
from small4_jax.nn.vision import input_embeddings

CACHE_BUCKET = 128  # cache lengths are rounded up to this, so nearby request sizes share compiled steps


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _prefill(graphdef, state, ids, cache, key, temperature, top_k, top_p, embeds=None, *, greedy):
    model = nnx.merge(graphdef, state)
    logits, cache = model.step(ids, cache, input_embeds=embeds)
    token = sample(logits[:, -1], key, temperature, top_k, top_p, greedy=greedy)
    return token, cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _extend(graphdef, state, ids, cache, embeds=None):
    """Write a chunk of prompt into the cache (no sampling: not the prompt's last chunk)."""
    model = nnx.merge(graphdef, state)
    return model.step(ids, cache, input_embeds=embeds)[1]


def _chunks(n: int) -> list[int]:
    """n as powers of two, largest first (its binary decomposition)."""
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _decode(graphdef, state, token, cache, key, temperature, top_k, top_p, *, greedy):
    model = nnx.merge(graphdef, state)
    logits, cache = model.step(token[:, None], cache)
    token = sample(logits[:, -1], key, temperature, top_k, top_p, greedy=greedy)
    return token, cache


def dense_generate(
    model: Small4ForCausalLM,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    images: Sequence = (),
) -> list[int]:
    """Generate up to `max_new_tokens` ids after `prompt_ids`; stops after emitting any of `stop_ids` (included).

    `on_token(id)` is called as each id arrives (for streaming). `images`: preprocessed images [C, H, W] whose
    features fill the prompt's [IMG] tokens, in order (small4_jax.nn.vision; encode them with infer.chat.encode_chat).
    """
    prompt = [int(t) for t in prompt_ids]
    context = model.config.max_position_embeddings
    if not prompt:
        raise InputError("empty prompt: give at least one token")
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if len(prompt) >= context:
        raise InputError(
            f"prompt has {len(prompt)} tokens but the model's context is {context} (max_position_embeddings); "
            "shorten the prompt"
        )
    vocab = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise InputError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    total = len(prompt) + max_new_tokens
    cache_len = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, max(context, total))
    graphdef, state = nnx.split(model)
    cache = KVCache.create(model.config, 1, cache_len, model.dtype)
    temperature = jnp.float32(sampling.temperature)
    top_k, top_p = jnp.int32(sampling.top_k), jnp.float32(sampling.top_p)
    key = jax.random.key(seed)
    stop = set(int(s) for s in stop_ids)

    key, sub = jax.random.split(key)
    ids = jnp.asarray([prompt], jnp.int32)
    embeds = None
    vision = model.config.vision
    if len(images) or (vision is not None and vision.image_token_id in prompt):  # [IMG] slots need their images
        embeds = input_embeddings(model, ids, images)
    start = 0
    for n in _chunks(len(prompt)):
        piece = ids[:, start : start + n]
        piece_embeds = None if embeds is None else embeds[:, start : start + n]
        start += n
        if start < len(prompt):
            cache = _extend(graphdef, state, piece, cache, piece_embeds)
        else:
            token, cache = _prefill(graphdef, state, piece, cache, sub, temperature, top_k, top_p, piece_embeds,
                                    greedy=sampling.greedy)
    out: list[int] = []
    while True:
        t = int(token[0])
        out.append(t)
        if on_token is not None:
            on_token(t)
        if t in stop or len(out) >= max_new_tokens:
            return out
        key, sub = jax.random.split(key)
        token, cache = _decode(graphdef, state, token, cache, sub, temperature, top_k, top_p, greedy=sampling.greedy)
