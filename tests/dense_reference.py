"""The contiguous-cache decoder, kept as the tests' reference: greedy decoding of one request over a dense latent
`KVCache` with `Small4ForCausalLM.step` (expanded MLA: the model's own forward, checked against transformers in
test_generate.py). `small4_jax.decode.generation.generate` and the serving engine run the paged, absorbed steps;
tests compare them with this loop.

The prompt is read in chunks whose lengths are powers of two (its binary decomposition: 100 = 64 + 32 + 4), and the
cache is a multiple of 128 rows, so a new prompt length reuses the programs already compiled (CI time)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from small4_jax.decode.generation import check_request
from small4_jax.decode.sampling import SamplingParams
from small4_jax.nn.model import KVCache
from small4_jax.nn.vision import input_embeddings


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step(graphdef, state, ids, cache, embeds=None):
    """(argmax of the last position's logits, cache) after writing ids [1, T] into the cache."""
    logits, cache = nnx.merge(graphdef, state).step(ids, cache, input_embeds=embeds)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def dense_generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
                   images: Sequence = (), sampling: SamplingParams = SamplingParams()) -> list[int]:
    """Greedy tokens after `prompt_ids` (as `generation.generate` with a greedy `sampling`), stopping after any of
    `stop_ids` (included); `images` fill the prompt's [IMG] rows."""
    assert sampling.greedy, "the reference decodes greedily"
    prompt = [int(t) for t in prompt_ids]
    max_new_tokens = check_request(model, prompt, max_new_tokens)
    total = len(prompt) + max_new_tokens
    cache = KVCache.create(model.config, 1, -(-total // 128) * 128, model.dtype)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray([prompt], jnp.int32)
    vision = model.config.vision
    embeds = input_embeddings(model, ids, images) if len(images) or (
        vision is not None and vision.image_token_id in prompt) else None
    start = 0
    for b in range(len(prompt).bit_length() - 1, -1, -1):  # chunks of 2^b tokens, largest first
        if len(prompt) >> b & 1:
            end = start + (1 << b)
            token, cache = _step(graphdef, state, ids[:, start:end], cache,
                                 None if embeds is None else embeds[:, start:end])
            start = end
    out = []
    while True:
        out.append(int(token[0]))
        if out[-1] in set(stop_ids) or len(out) >= max_new_tokens:
            return out
        token, cache = _step(graphdef, state, token[:, None], cache)
