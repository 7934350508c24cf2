"""Autoregressive generation for one prompt, on the serving engine's steps: the paged latent cache and absorbed MLA
(`small4_jax.nn.paged.logits_step`), then the engine's per-row sampler (`decode.sampler.sample_rows`).

The prompt is read in chunks of `PREFILL_CHUNK` tokens (the last one padded, its padding rows written to the null
page), then one token per step. Every step has one of two shapes ([1, PREFILL_CHUNK] and [1, 1] tokens) over a page
table of a power-of-two number of pages that holds prompt and output, so a new prompt length compiles nothing once
a generation of that table width has run; the jitted steps are module-level and take the model's graph definition
as a static argument, so every call with the same model structure reuses them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from small4_jax.decode.sampler import RowSampling, TokenHistory, sample_rows
from small4_jax.decode.sampling import SamplingParams
from small4_jax.errors import InputError
from small4_jax.nn.model import Small4ForCausalLM
from small4_jax.nn.paged import PagedCache, logits_step
from small4_jax.nn.vision import input_embeddings

PAGE_SIZE = 16  # tokens per cache page
PREFILL_CHUNK = 64  # prompt tokens per prefill step
MIN_PAGES = 8  # the smallest page table (128 tokens)

_sample = jax.jit(sample_rows, static_argnames=("num_top",), donate_argnames=("history",))


def table_pages(tokens: int, context: int) -> int:
    """Pages of the page table for `tokens` tokens: a power of two (at least MIN_PAGES), at most the context's."""
    need = max(MIN_PAGES, 1 << (math.ceil(tokens / PAGE_SIZE) - 1).bit_length())
    return min(need, max(math.ceil(context / PAGE_SIZE), math.ceil(tokens / PAGE_SIZE)))


def check_request(model: Small4ForCausalLM, prompt: list[int], max_new_tokens: int) -> int:
    """max_new_tokens within the context; InputError for an empty prompt, a bad id or no room."""
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
    return min(max_new_tokens, context - len(prompt))


def _step_inputs(tokens: Sequence[int], start: int, width: int):
    """ids, seq_index [1, width] and slots [1, width, 2] of tokens at sequence positions start.. (padding: the
    null page, seq_index of the last token), and the last token's index in the chunk."""
    n = len(tokens)
    ids = np.zeros((1, width), np.int32)
    seq_index = np.full((1, width), start + n - 1, np.int32)
    slots = np.zeros((1, width, 2), np.int32)
    at = np.arange(start, start + n)
    ids[0, :n], seq_index[0, :n] = tokens, at
    slots[0, :n, 0], slots[0, :n, 1] = 1 + at // PAGE_SIZE, at % PAGE_SIZE  # page k of the sequence is page k + 1
    return ids, seq_index, slots, np.asarray([n - 1], np.int32)


def generate(
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
    Sampled tokens (temperature > 0) are drawn as the serving engine draws a request's with this `seed`.
    """
    prompt = [int(t) for t in prompt_ids]
    max_new_tokens = check_request(model, prompt, max_new_tokens)
    config, vocab = model.config, model.config.vocab_size
    width = table_pages(len(prompt) + max_new_tokens, config.max_position_embeddings)
    graphdef, state = nnx.split(model)
    pages = PagedCache.create(config, width + 1, PAGE_SIZE, model.dtype).pages  # page 0: the null page
    table = np.arange(1, width + 1, dtype=np.int32)[None]
    history = TokenHistory.create(1, vocab)
    row = functools.partial(RowSampling.from_lists, [sampling.temperature], [sampling.top_k], [sampling.top_p],
                            [0.0], [seed], vocab=vocab)
    embeds = None
    vision = config.vision
    if len(images) or (vision is not None and vision.image_token_id in prompt):  # [IMG] slots need their images
        embeds = input_embeddings(model, np.asarray([prompt], np.int32), images)
    for start in range(0, len(prompt), PREFILL_CHUNK):
        chunk = prompt[start : start + PREFILL_CHUNK]
        ids, seq_index, slots, last = _step_inputs(chunk, start, PREFILL_CHUNK)
        extra = {}
        if embeds is not None:
            part = embeds[:, start : start + len(chunk)]
            extra["input_embeds"] = jnp.pad(part, ((0, 0), (0, PREFILL_CHUNK - len(chunk)), (0, 0)))
        logits, pages = logits_step(graphdef, state, pages, ids, seq_index, seq_index, slots, table, last, **extra)
    out: list[int] = []
    stop = {int(s) for s in stop_ids}
    while True:
        token, *_, history = _sample(logits, row([len(out)]), history, num_top=1)
        t = int(token[0])
        out.append(t)
        if on_token is not None:
            on_token(t)
        if t in stop or len(out) >= max_new_tokens:
            return out
        ids, seq_index, slots, last = _step_inputs([t], len(prompt) + len(out) - 1, 1)
        logits, pages = logits_step(graphdef, state, pages, ids, seq_index, seq_index, slots, table, last)
