"""The serving engine: continuous batching of many requests over the paged latent cache.

Each `step()`:
1. takes new requests and cancellations from the inbox (thread-safe; `submit` / `cancel` may be called from any
   thread), and admits waiting requests while a batch slot and the pages of their prompt are free, reusing cached
   pages of a shared prompt prefix (`page_pool.PagePool`);
2. runs one chunk of prefill (at most `prefill_chunk` tokens for each of up to `prefill_batch` requests) if any
   request is still reading its prompt, then
3. one decode step for every request that is generating, and samples each row with its own settings.
Both run absorbed MLA over the latent pages in place (`small4_jax.nn.paged`): a chunk costs chunk x prefix in latent
form, never the prefix re-expanded, and a step's attention work follows the keys its rows hold.
Requests join and leave between steps. When a decoding request needs a page and none is left, the most recently
admitted request is preempted: its pages are released and it is re-queued to recompute its tokens later.

Compiled shapes: prefill [p, c] for p in 1, 2, 4 .. prefill_batch and c in `prefill_chunks` (prefill_chunk,
prefill_chunk / 4, ... down to 16: a step takes the smallest that holds its longest row, so a short prompt is not
padded to prefill_chunk), and decode [b, 1] for b in `batch_buckets`, each with a page-table width from
`page_buckets`. The attention loops over the keys held, so the width only sizes the page table sent each step: by
default there is one width (the pages of `max_model_len`) and the engine compiles len(prefill buckets) x
len(prefill_chunks) + len(batch_buckets) programs, never one per request; `warmup()` compiles them all up front.

Output: each request's callback receives `RequestOutput` events (new token ids, new text, logprobs, finish) on the
engine's thread. Text is decoded incrementally when the engine has a tokenizer; stop strings are matched on it and
text that might start a stop string is held back until it is resolved.

The engine works on token ids; chat formatting and output parsing live in `infer/chat.py`, HTTP in `infer/serve.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.engine.page_pool import PagePool, chain_hashes, prefix_context
from infer.structured import fill_masks, new_matcher
from small4_jax.decode.sampler import MAX_LOGIT_BIAS, RowSampling, TokenHistory, mask_words, sample_rows, set_slot
from small4_jax.errors import InputError, Small4Error
from small4_jax.inputs.images import image_hash
from small4_jax.ckpt.eagle import load_eagle
from small4_jax.lora.multi import MultiLoRA, MultiLoRAParam, adapter_rank, read_adapter
from small4_jax.nn import vision
from small4_jax.nn.model import interleave_experts, shard_latent_projections
from small4_jax.nn.paged import (NULL_PAGE, PagedCache, cache_bytes_per_token_per_layer, cache_spec, cache_width,
                                 default_cache_axes, logits_step)
from small4_jax.parallel.placement import place_model
from small4_jax.quant.formats import format_of, is_quantised_dtype

log = logging.getLogger("small4_jax")

MAX_TOP_LOGPROBS = 20
# prompt_logprobs run the model's plain forward over the whole prompt, whose [T, vocab] float32 logits (and their
# log-softmax) are held at once: 4096 x 131072 x 4 B = 2 GiB each at Small 4's vocabulary
MAX_PROMPT_LOGPROBS_TOKENS = 4096
MAX_CONTEXT = 262_144  # Small 4 is served at 256K (ARCHITECTURE.md §6.15)


class QueueFull(Small4Error):
    """The engine's waiting queue is full: retry later (back-pressure)."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Per-request generation settings."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None  # None: drawn by the engine
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # stop ids (included in token_ids), on top of EOS
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n: the chosen token's logprob and the n most likely (n <= 20)
    presence_penalty: float = 0.0  # OpenAI, [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI, [-2, 2]
    repetition_penalty: float = 1.0  # HF / vLLM, > 0 (1: off)
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit, [-100, 100]
    grammar: str | None = None  # an llguidance Lark grammar the output must match (structured output)
    # False: events carry ids only (text ""), for a caller that decodes them itself (the chat parser), so each
    # token is detokenised once and not on the engine's thread; stop strings still need (and turn on) the text
    detokenize: bool = True
    # None: off; n: each prompt token's logprob given the tokens before it (the first: None) and the n most likely,
    # in the request's first event (`RequestOutput.prompt_logprobs`); with it, max_tokens may be 0 (no generation)
    prompt_logprobs: int | None = None

    def __post_init__(self):
        def bad(msg):
            raise InputError(msg)

        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            bad(f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.prompt_logprobs}")
        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < least:
            bad(f"max_tokens must be a positive integer (0 only with prompt_logprobs), got {self.max_tokens!r}")
        # the sampler's rows hold seeds as uint32 and top_k as int32: out of range, they would fail a whole step
        if self.seed is not None and not 0 <= self.seed < 2**32:
            bad(f"seed must be in [0, 2**32), got {self.seed}")
        if self.top_k >= 2**31:
            bad(f"top_k must be < 2**31, got {self.top_k}")
        if not self.temperature >= 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            bad(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad(f"logit_bias has {len(self.logit_bias)} entries, at most {MAX_LOGIT_BIAS} are allowed")
            for k, v in self.logit_bias.items():
                if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                    bad(f"logit_bias keys must be token ids (non-negative integers), got {k!r}")
                if not -100 <= v <= 100:
                    bad(f"logit_bias values must be in [-100, 100], got {v} for token {k}")

    @property
    def penalised(self) -> bool:
        """Whether the request needs its token history (a penalty is on)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), most likely first


@dataclasses.dataclass
class RequestOutput:
    """One event of a request: what is new since the last event, and whether it is finished."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error"
    # SamplingOptions.prompt_logprobs: one entry per prompt token (the first None), in the request's first event
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Engine(record_routing=True), in the finishing event: the expert ids every MoE layer routed each token of the
    # sequence to, [tokens - 1, layers, k] int16 (prompt and generated tokens, in order: all but the last, which
    # the model never read; -1 in dense layers), vLLM's `routed_experts` layout
    routed_experts: np.ndarray | None = None


@dataclasses.dataclass
class _Request:
    id: str
    tokens: list[int]  # prompt + generated
    num_prompt: int
    options: SamplingOptions
    seed: int
    stop_ids: frozenset[int]
    callback: Callable[[RequestOutput], None] | None
    arrival: float
    context: bytes = b""  # root of the prefix-cache key chain (page_pool.prefix_context)
    adapter_slot: int = 0  # multi-LoRA slot of its adapter (0: the base model)
    slot: int = -1  # row of the engine's TokenHistory while running
    shard: int = 0  # the cache shard holding its pages
    matcher: object = None  # llguidance LLMatcher of a structured-output request
    after: str | None = None  # admit only once this request's prompt pages are cached (n > 1 shares them)
    pages: PageList = dataclasses.field(default_factory=lambda: PageList())
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # chain keys of the full pages registered
    num_computed: int = 0  # tokens whose cache rows are written
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    decoder: object = None
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    stop_hit: bool = False  # a stop string ended the text
    first_token_time: float | None = None
    images: object = None  # vision.PackedImages of the prompt's images (None: text only)
    image_features: object = None  # their features [K, H] on the device, while the prompt is being prefilled
    prompt_logprobs: list | None = None  # SamplingOptions.prompt_logprobs, computed while it waits; sent once
    prompt_logprobs_sent: bool = False

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.num_prompt


class PageList(list):
    """A request's cache pages (a list) that remembers the lowest index changed in place since the engine last copied
    it into its page table (`Engine.page_table`): appends need no note (the length says), anything else (`del
    pages[k:]` on a speculative rollback, item assignment, ...) moves `changed_from` down to where it acted."""

    def __init__(self, *args):
        super().__init__(*args)
        self.changed_from = 0  # pages[changed_from:] may differ from the table's copy; set by the engine when copied

    def _changed(self, index=0) -> None:
        if isinstance(index, slice):
            index = index.indices(len(self))[0]
        elif index < 0:
            index += len(self)
        self.changed_from = min(self.changed_from, max(int(index), 0))

    def __setitem__(self, index, value):
        self._changed(index)
        super().__setitem__(index, value)

    def __delitem__(self, index):
        self._changed(index)
        super().__delitem__(index)

    def pop(self, index=-1):
        self._changed(index)
        return super().pop(index)

    def insert(self, index, value):
        self._changed(min(index, len(self)) if index >= 0 else index)
        super().insert(index, value)

    def remove(self, value):
        self._changed(self.index(value))
        super().remove(value)

    def clear(self):
        self._changed(0)
        super().clear()

    def sort(self, *args, **kwargs):
        self._changed(0)
        super().sort(*args, **kwargs)

    def reverse(self):
        self._changed(0)
        super().reverse()


def _buckets(limit: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out + [limit])


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def cache_report(config, dtype, cache_bytes: int | None, page_size: int, num_pages: int, shards: int = 1,
                 draft=None) -> str:
    """One line on what the cache holds per token and how many tokens fit (config arithmetic; allocates nothing).
    cache_bytes: per device; shards: the cache's shards (each with its own null page); draft: an EAGLE draft's
    config (its layers' cache rides on the same pages)."""
    per_layer = cache_bytes_per_token_per_layer(config, dtype)
    layers = config.num_hidden_layers
    per_token = per_layer * layers
    if draft is not None:
        per_token += cache_bytes_per_token_per_layer(draft, dtype) * draft.num_hidden_layers
        layers = f"{layers} + {draft.num_hidden_layers} draft"
    tokens = (num_pages - shards) * page_size
    where = f" in {cache_bytes / 2**30:.2f} GiB" if cache_bytes is not None else ""
    over = f" over {shards} shards" if shards > 1 else ""
    return (
        f"latent cache: {cache_width(config)} values x {jnp.dtype(dtype).itemsize} bytes = {per_layer} B per token "
        f"per layer, {per_token / 1024:.1f} KiB per token over {layers} layers; "
        f"{num_pages - shards} pages of {page_size} tokens = {tokens} cache tokens fit{over}"
        f"{where + ' per device' if where and shards > 1 else where}"
    )


def device_bytes(tree, device) -> int:
    """Bytes of the arrays of `tree` that live on `device` (its shards only: a sharded weight counts its slice)."""
    total = 0
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            if shard.device == device:
                total += shard.data.nbytes
    return total


def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def memory_report(resident: dict, device=None) -> tuple[str, dict]:
    """(one line, figures) for one device (default: the first device the weights are on): the bytes of every
    resident item (`Engine.resident`: name -> arrays; "weights" also split per quantised format,
    `weights_by_format`: "int4" has int4 experts and int8 dense linears), and the headroom the backend reports
    (bytes_limit - bytes_in_use; None where it reports no limit, as on CPUs)."""
    leaves = jax.tree.leaves(resident["weights"])
    if device is None:
        device = min(leaves[0].sharding.device_set, key=lambda d: d.id) if leaves else jax.devices()[0]
    fmts = sorted({format_of(x.dtype) for x in leaves if is_quantised_dtype(x.dtype)})
    by_format = {f: device_bytes([x for x in leaves if is_quantised_dtype(x.dtype) and format_of(x.dtype) == f],
                                 device) for f in fmts}
    figures = {name: device_bytes(tree, device) for name, tree in resident.items()}
    figures.update(headroom=None, weights_by_format=by_format)
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        figures["headroom"] = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        headroom = f"{_size(figures['headroom'])} headroom of {_size(stats['bytes_limit'])}"
    else:
        headroom = "headroom unknown (the backend reports no memory limit)"
    kind = f" ({', '.join(f'{f} {_size(b)}' for f, b in by_format.items())}; the rest scales and float " \
           "parameters)" if fmts else ""
    items = ", ".join(f"{name} {_size(figures[name])}{kind if name == 'weights' else ''}" for name in resident)
    return f"resident per device ({device}): {items}; {headroom}", figures


def pages_for_memory(config, dtype, cache_bytes: int, page_size: int, draft=None) -> int:
    """Pages (plus the null page) that fit in `cache_bytes`; with an EAGLE draft's config, each page also holds the
    draft's layers (its cache has as many pages as the target's)."""
    per_token = cache_bytes_per_token_per_layer(config, dtype) * config.num_hidden_layers
    if draft is not None:
        per_token += cache_bytes_per_token_per_layer(draft, dtype) * draft.num_hidden_layers
    return int(cache_bytes // (per_token * page_size))


def free_device_memory_after(bytes_limit: int, bytes_in_use: int, fraction: float = 0.9) -> int:
    """The cache's share: `fraction` of what the allocator has free (limit - in use), the rest left for the steps'
    temporaries. (Not fraction x limit - in use: that reserves a tenth of the whole device, 12 GiB on an H200, which
    leaves a one-GPU quantised deployment no cache at all.)"""
    return int((bytes_limit - bytes_in_use) * fraction)


def free_device_memory(fraction: float = 0.9) -> int | None:
    """Bytes for the cache on the first device (`free_device_memory_after`), or None where the backend does not say
    (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if not stats or "bytes_limit" not in stats:
        return None
    return free_device_memory_after(stats["bytes_limit"], stats.get("bytes_in_use", 0), fraction)


class Engine:
    """Continuous-batching generation over a `Small4ForCausalLM`.

    Args:
        model: the model (its parameters are used in place; with a mesh they should already be placed on it).
        tokenizer: a `small4_jax.inputs.tokenizer.Tokenizer` for text output and stop strings, or None (ids only).
        max_batch: decode batch size (requests generating at once).
        page_size: tokens per cache page.
        num_pages: pages in the cache, the null page included; None: what fits in 90% of the free device memory,
            or, where the backend does not report memory, enough for `max_batch` full-length sequences.
        max_model_len: longest sequence (prompt + output); default min(max_position_embeddings, 262,144).
        prefill_chunk: tokens of prompt per prefill step and request (at most). A step is compiled for the smallest
            of `prefill_chunks` that holds its longest row, so short prompts are not padded to prefill_chunk.
        prefill_chunks: those chunk sizes (default prefill_chunk, prefill_chunk / 4, ... down to 16).
        prefill_batch: requests whose prompts advance together in one prefill step (compiled as 1, 2, 4, ...).
        max_queue: requests that may wait for admission; `submit` raises QueueFull beyond it.
        batch_buckets: the compiled decode batch sizes (default powers of 2 up to max_batch).
        page_buckets: the compiled page-table widths (default: one, the pages of max_model_len).
        speculative: an `infer.speculative.decoder.SpeculativeConfig` (n-gram or EAGLE drafts, batched verify), or None.
        lora_adapters: (name, PEFT directory) pairs served side by side; `submit(adapter=name)` picks one per
            request. max_loras: adapter slots (default: as many as given; more leave room for `load_adapter`).
            max_lora_rank: the largest rank a slot holds (default: the largest given, else 16). lora_targets: the
            modules slots are held for (`lora.LoRAConfig.targets` spellings or site paths; default: those the
            adapters given have, else every adaptable module); slots are in the model's dtype, placed beside their
            base weights, and resident before the cache is sized. lora_targets: the
            modules slots are held for (`lora.LoRAConfig.targets` spellings or site paths; default: those the
            adapters given have, else every adaptable module); slots are in the model's dtype, placed beside their
            base weights, and resident before the cache is sized.
        cache_dtype: dtype of the cache (default the model's).
        mesh: a device mesh (the model's parameters live on it).
        cache_axes: mesh axes the cache's pages are sharded over (default: the batch axes of `sharding.RULES`, data
            and expert, that the mesh has, as far as their sizes divide max_batch; () keeps one cache replicated on
            every device): each shard
            holds num_pages / shards pages and attends for its own rows (data-parallel attention, while the MoE stays
            expert-parallel), so the cache grows with the devices. A request's pages all live on one shard, chosen
            at admission (most prefix-cache hits, then most free pages); max_batch and the batch buckets count rows
            over all shards (multiples of the shard count), prefill_batch counts requests per shard, num_pages all
            pages (rounded down to a multiple of the shard count).
        context_axes: mesh axes one sequence's pages are split over by position (decode context parallelism: page
            j of a sequence on shard j % shards, each shard attends over its own keys, partial softmax results
            combined; `paged.absorbed_attention`), so one long sequence's cache is spread over the devices. Not
            with cache_axes (then defaulted to none). num_pages counts all pages; max_model_len needs
            ceil(its pages / shards) + 1 per shard.
        shard_latent_proj: split q_a_proj and kv_a_proj over the mesh's `tensor` axis by their input dim
            (`model.shard_latent_projections`): each device reads 1/tp of them instead of all, for one more
            all-reduce per layer (README, "Choosing a layout on 8 GPUs").
        prefix_caching: reuse cached pages of shared prompt prefixes.
        record_routing: record the expert ids each MoE layer routes every token to (rollout routing replay,
            train/grpo.py) and return them with each finished request (`RequestOutput.routed_experts`). The steps
            then are programs that also return the ids ([B, T, L, k] int16 a step, copied to the host with the
            sampled tokens); the ids are kept on the host beside the cache's rows, one row of L x k int16 per cache
            token (so a prompt's prefix served from cached pages has the ids of the request that computed it).
            Off (the default), the steps and their compiles are the ones without it. Not with `speculative`.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch: int = 8,
        page_size: int = 16,
        num_pages: int | None = None,
        max_model_len: int | None = None,
        prefill_chunk: int = 64,
        prefill_chunks: Sequence[int] | None = None,
        prefill_batch: int = 1,
        max_queue: int = 256,
        batch_buckets: Sequence[int] | None = None,
        page_buckets: Sequence[int] | None = None,
        cache_dtype=None,
        mesh=None,
        prefix_caching: bool = True,
        seed: int = 0,
        speculative=None,
        cache_axes: Sequence[str] | None = None,
        lora_adapters: Sequence[tuple[str, str]] = (),
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
        context_axes: Sequence[str] = (),
        lora_targets: Sequence[str] | None = None,
        shard_latent_proj: bool = False,
        record_routing: bool = False,
    ):
        config = model.config
        if record_routing and speculative is not None:
            raise InputError("record_routing: routed expert ids are not recorded with speculative decoding")
        self.model, self.config, self.mesh = model, config, mesh
        if shard_latent_proj:  # before anything is sized by what the weights leave free
            tp = 1 if mesh is None else dict(mesh.shape).get("tensor", 1)
            if tp == 1:
                where = "there is no mesh" if mesh is None else f"the mesh {dict(mesh.shape)} has no tensor axis > 1"
                raise InputError(f"shard_latent_proj (--shard-latent-proj) splits q_a_proj and kv_a_proj over the "
                                 f"'tensor' mesh axis, but {where}")
            shard_latent_projections(model, mesh)
        # Everything else resident comes first, so that the cache takes what it leaves.
        self.lora = self._build_adapters(lora_adapters, max_loras, max_lora_rank, lora_targets)
        self.draft = self._load_draft(speculative)
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.page_size = page_size
        self.prefill_chunk = prefill_chunk
        if prefill_chunks is None:
            prefill_chunks = [prefill_chunk]
            while prefill_chunks[0] // 4 >= 16:
                prefill_chunks.insert(0, prefill_chunks[0] // 4)
        self.prefill_chunks = tuple(sorted({min(c, prefill_chunk) for c in prefill_chunks} | {prefill_chunk}))
        self.max_queue = max_queue
        self.max_model_len = max_model_len or min(config.max_position_embeddings, MAX_CONTEXT)
        if self.max_model_len > config.max_position_embeddings:
            raise InputError(f"max_model_len {self.max_model_len} exceeds the model's context "
                             f"{config.max_position_embeddings}")
        self.max_pages_per_seq = math.ceil(self.max_model_len / page_size)
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
        if cache_axes is None:
            cache_axes = default_cache_axes(mesh, max_batch, tuple(context_axes))
        for kind, axes in (("cache", cache_axes), ("context", context_axes)):
            for a in axes:
                if mesh is None or a not in mesh.shape:
                    where = "there is no mesh" if mesh is None else f"the mesh has axes {dict(mesh.shape)}"
                    raise InputError(f"{kind} axis {a!r} is not an axis of the mesh: {where}")
        self.cache_axes = tuple(a for a in cache_axes if mesh.shape[a] > 1)
        self.context_axes = tuple(a for a in context_axes if mesh.shape[a] > 1)
        if self.cache_axes and self.context_axes:
            raise InputError(f"cache axes {self.cache_axes} and context axes {self.context_axes} together are not "
                             "supported: give one of them")
        c = self.context_shards = math.prod(mesh.shape[a] for a in self.context_axes) if self.context_axes else 1
        d = self.cache_shards = math.prod(mesh.shape[a] for a in self.cache_axes) if self.cache_axes else 1
        self.rows_per_shard = math.ceil(max_batch / d)
        cache_bytes = None
        if num_pages is None:
            cache_bytes = free_device_memory()
            if cache_bytes is not None:  # per device: each shard's pages fit its devices
                draft = self.draft.config if self.draft is not None else None
                num_pages = d * c * pages_for_memory(config, self.cache_dtype, cache_bytes, page_size, draft)
            else:
                num_pages = d * c * (self.rows_per_shard * math.ceil(self.max_pages_per_seq / c) + 1)
        num_pages -= num_pages % (d * c)
        if c > 1 and num_pages // c - 1 < math.ceil(self.max_pages_per_seq / c):
            raise InputError(f"the cache holds {(num_pages // c - 1) * page_size} tokens per context shard, less "
                             f"than 1/{c} of a sequence of max_model_len {self.max_model_len}: lower max_model_len or "
                             "give it more memory")
        if c == 1 and num_pages // d - 1 < self.max_pages_per_seq:
            per = " per shard" if d > 1 else ""
            raise InputError(f"the cache holds {(num_pages // d - 1) * page_size} tokens{per}, less than one sequence "
                             f"of max_model_len {self.max_model_len}: lower max_model_len or give it more memory")
        self.prefill_buckets = tuple(d * p for p in _buckets(prefill_batch))
        self.batch_buckets = tuple(sorted(batch_buckets or (d * b for b in _buckets(self.rows_per_shard))))
        if self.batch_buckets[-1] < max_batch:
            raise InputError(f"batch_buckets {self.batch_buckets} do not reach max_batch {max_batch}")
        if any(b % d for b in self.batch_buckets):
            raise InputError(f"batch_buckets {self.batch_buckets} must be multiples of the {d} cache shards")
        self.page_buckets = tuple(sorted(page_buckets or (self.max_pages_per_seq,)))
        if self.page_buckets[-1] < self.max_pages_per_seq:
            self.page_buckets += (self.max_pages_per_seq,)
        self.stop_ids = frozenset(
            s for s in (config.eos_token_id if isinstance(config.eos_token_id, tuple) else (config.eos_token_id,))
            if s is not None
        )
        if tokenizer is not None:
            self.stop_ids |= {tokenizer.eos_id}

        self.mesh = mesh
        sharding = None
        if mesh is not None:
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._replicated = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        tp = 1 if mesh is None else dict(mesh.shape).get("tensor", 1)
        if tp > 1 and config.moe_intermediate_size % tp == 0 and self.lora is None:
            interleave_experts(model, tp)  # each tensor shard reads its gate and up columns without an all-gather
        self.graphdef, self.state = nnx.split(model)
        # placed (committed) from the start, as every step returns it: the first step compiles for the same input
        cache_sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                          else jax.sharding.NamedSharding(mesh, cache_spec(self.cache_axes, self.context_axes)))
        self.pages = PagedCache.create(config, num_pages, page_size, self.cache_dtype, cache_sharding).pages
        self.pool = PagePool(num_pages, page_size, prefix_caching, shards=d * c, by_position=c > 1)
        # record_routing: the routed expert ids of the token in each cache row (page, offset), written by the step
        # that writes the row (`_run`), read when a request finishes (`_finish`)
        self.routing = (np.full((num_pages, page_size, config.num_hidden_layers, config.num_experts_per_tok), -1,
                                np.int16) if record_routing else None)
        # last slot: padding rows; committed like the cache, so the first sampling step does not compile twice
        self.history = TokenHistory.create(max_batch + 1, config.vocab_size,
                                           sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        self._free_slots = list(range(max_batch - 1, -1, -1))
        # The page table of every slot (rows: slots, the last one padding's, all null), kept on the host and updated by
        # what changed (`page_table`): a step copies its rows' slices, instead of converting every row's page list
        # (at 256K context and 64 rows that was 1M Python ints, 125 ms, per step). _table_copy[slot]: the page list
        # and the length last copied into that row.
        self._table = np.full((max_batch + 1, self.max_pages_per_seq), NULL_PAGE, np.int32)
        self._table_copy: list[tuple[PageList | None, int]] = [(None, 0)] * (max_batch + 1)
        self.report = cache_report(config, self.cache_dtype, cache_bytes, page_size, num_pages, d * c,
                                   self.draft.config if self.draft is not None else None)

        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Condition()
        self._pending = 0  # submitted, not yet admitted (or dropped)
        self._waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # admitted, in admission order
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = dict(requests=0, finished=0, cancelled=0, preempted=0, prompt_tokens=0, generated_tokens=0,
                          cached_tokens=0, steps=0, prefill_steps=0, decode_steps=0, errors=0, host_seconds=0.0,
                          mask_seconds=0.0, masked_tokens=0, structured_fallbacks=0)
        self._token_times: deque[tuple[float, int]] = deque(maxlen=256)
        self._waited = 0.0  # seconds of this step spent waiting for the device
        # requests whose host-side work failed in this step (mask, sampling row, output): finished with an error
        # at the end of the step, while the step's other rows go on
        self._failed: dict[str, tuple[_Request, str]] = {}
        self.logits_step = logits_step  # an EAGLE drafter swaps in a step that also keeps the hidden states
        self._flat_steps: dict[tuple, tuple] = {}  # (absorbed, cache_axes) -> (graphdef, treedef, jitted step)
        # infer/speculative/decoder.py: drafter + batched verify instead of the decode step (built by its config: the
        # engine does not import the speculative package, which drives the engine through its step API)
        self.speculator = None if speculative is None else speculative.build(self)
        line, self.memory = memory_report(self.resident())  # every resident item's bytes on one device, headroom
        self.report += "\n" + line
        log.info("%s", self.report)
        # metrics() runs on the HTTP thread while the engine thread appends: both hold this lock
        self._metrics_lock = threading.Lock()
        self._shapes_seen: set[tuple] = set()  # step shapes run so far (each new one compiles)

    def _build_adapters(self, lora_adapters, max_loras, max_lora_rank, lora_targets):
        """Multi-LoRA slots (small4_jax/lora/multi.py), or None: only on the modules `lora_targets` names (default:
        those the adapters given at start have; every adaptable module when none is given), in the model's dtype,
        placed beside their base weights, with the given adapters loaded."""
        if not (lora_adapters or max_loras):
            return None
        rank = max_lora_rank or max([adapter_rank(path) for _, path in lora_adapters] or [16])
        read = [read_adapter(self.config, path) for _, path in lora_adapters]
        targets = lora_targets
        if targets is None and lora_adapters:
            targets = sorted({site for weights, _ in read for site in weights})
        multi = MultiLoRA(self.model, (max_loras or len(lora_adapters)) + 1, rank, targets=targets,
                          dtype=self.model.dtype, mesh=self.mesh)
        for (name, path), done in zip(lora_adapters, read):
            weights, identity = multi.read(name, path, done)
            multi.install(name, path, weights, identity, multi.free_slot())
        return multi

    def _load_draft(self, speculative):
        """An EAGLE draft model loaded and placed on the mesh before the cache is sized (or None)."""
        if speculative is None or getattr(speculative, "method", None) != "eagle":
            return None
        draft = load_eagle(speculative.path, self.model)
        return place_model(draft, self.mesh) if self.mesh is not None else draft

    def resident(self) -> dict:
        """Every item the engine keeps on the devices, by name: the base weights, the multi-LoRA slots, the EAGLE
        draft's weights, its cache and hidden-state buffer, the paged cache, the token history."""
        lora = nnx.state(self.model, MultiLoRAParam) if self.lora is not None else None
        weights = nnx.state(self.model, nnx.Not(MultiLoRAParam)) if self.lora is not None else self.state
        drafter = getattr(self.speculator, "drafter", None)
        items = {"weights": weights, "lora slots": lora,
                 "draft": None if self.draft is None else nnx.state(self.draft),
                 "draft cache": getattr(drafter, "pages", None), "draft buffer": getattr(drafter, "buffer", None),
                 "cache": self.pages, "token history": self.history}
        return {k: v for k, v in items.items() if v is not None}

    # ---- public API (any thread) ---------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        options: SamplingOptions = SamplingOptions(),
        *,
        callback: Callable[[RequestOutput], None] | None = None,
        request_id: str | None = None,
        block: bool = False,
        after: str | None = None,
        adapter: str | None = None,
        image_hashes: Sequence[str | bytes] = (),
        cache_salt: str | None = None,
        images: Sequence = (),
    ) -> str:
        """Queue a request; returns its id. Raises InputError for a bad prompt and QueueFull when `max_queue`
        requests are already waiting (with `block=True` it waits for room instead).

        after: the id of an earlier request with the same prompt; this one is admitted once that one's full prompt
        pages are in the prefix cache, so the n choices of one request share them instead of computing them n times.

        adapter, image_hashes, cache_salt: what besides the prompt ids decides its cache rows; they root its
        prefix-cache key chain (`page_pool.prefix_context`), so it shares cached pages only with requests that
        agree on all three.

        images: the prompt's preprocessed images [C, H, W] (infer.chat.encode_chat), in the order of their [IMG]
        runs; their features replace those tokens' embeddings. Checked here, encoded when the prompt is prefilled."""
        prompt = [int(t) for t in prompt_ids]
        self.check_prompt(prompt, options)
        packed = self._check_images(prompt, images)
        matcher = self._matcher(options)
        request_id = request_id or f"req-{next(self._ids)}"
        with self._lock:
            while self._pending >= self.max_queue:
                if not block:
                    raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
                self._lock.wait()
            self._pending += 1
        seed = options.seed if options.seed is not None else int(self._seeds.integers(0, 2**31))
        stop_ids = frozenset(options.stop_token_ids) | (frozenset() if options.ignore_eos else self.stop_ids)
        slot, identity = 0, adapter
        if adapter is not None and self.lora is not None:  # the adapter's content identity keys its cached pages
            slot, identity = self.lora.slot_of(adapter), self.lora.identity(adapter)
        elif adapter is not None:
            raise InputError(f"unknown adapter {adapter!r}: this engine serves no LoRA adapters")
        req = _Request(request_id, prompt, len(prompt), options, seed, stop_ids, callback, time.time(),
                       context=prefix_context(identity, image_hashes, cache_salt), matcher=matcher, after=after,
                       images=packed, adapter_slot=slot)
        self._inbox.put(("submit", req))
        return request_id

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT adapter in `path` as `name` (any thread; takes effect between steps, no recompilation)."""
        if self.lora is None:
            raise InputError("this engine was started without LoRA slots (--max-loras)")
        weights, identity = self.lora.read(name, path)  # host work off the engine thread
        self._between_steps(lambda: self._install_adapter(name, path, weights, identity), op=("load", name, str(path)))

    def unload_adapter(self, name: str) -> None:
        """Unload adapter `name`; refused while requests using it are queued or running."""
        if self.lora is None:
            raise InputError("this engine was started without LoRA slots (--max-loras)")
        self._between_steps(lambda: self._remove_adapter(name), op=("unload", name))

    def _install_adapter(self, name, path, weights, identity):
        if name in self.lora.adapters:
            raise InputError(f"adapter {name!r} is already loaded")
        self.lora.install(name, path, weights, identity, self.lora.free_slot())
        self.graphdef, self.state = nnx.split(self.model)

    def _remove_adapter(self, name):
        slot = self.lora.slot_of(name)
        busy = [r.id for r in list(self._waiting) + self.running if r.adapter_slot == slot]
        if busy:
            raise InputError(f"adapter {name!r} is in use by {len(busy)} request(s); retry when they finish")
        self.lora.unload(name)
        self.graphdef, self.state = nnx.split(self.model)

    def _between_steps(self, fn, op=None):
        """Run fn() on the engine thread between two steps; returns its result or raises its exception. op: what fn
        does, as data (("load", name, path) or ("unload", name)), which a multi-process engine (infer/server/lockstep.py)
        replays on the other processes."""
        done, result = threading.Event(), []
        if self._thread is None:  # no engine thread: run it here
            self._handle(("call", (fn, done, result, op)))
        else:
            self._inbox.put(("call", (fn, done, result, op)))
            done.wait()
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step and free its pages; its callback gets a final "cancelled" event."""
        self._inbox.put(("cancel", request_id))

    def check_prompt(self, prompt: Sequence[int], options: SamplingOptions) -> None:
        if not prompt:
            raise InputError("empty prompt: give at least one token")
        if len(prompt) >= self.max_model_len:
            raise InputError(
                f"prompt has {len(prompt)} tokens but the model's context is {self.max_model_len} "
                "(max_position_embeddings); shorten the prompt"
            )
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InputError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        bad = [t for t in options.logit_bias or () if t >= self.config.vocab_size]
        if bad:
            raise InputError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if options.logprobs is not None and options.logprobs > self.config.vocab_size:
            raise InputError(f"logprobs {options.logprobs} exceeds the vocabulary size")
        if options.prompt_logprobs is not None and self.lora is not None:
            raise InputError("prompt_logprobs is not served with LoRA adapter slots (--lora / --max-loras)")
        if options.prompt_logprobs is not None and len(prompt) > MAX_PROMPT_LOGPROBS_TOKENS:
            raise InputError(f"prompt_logprobs: the prompt has {len(prompt)} tokens; prompt log-probabilities are "
                             f"computed for prompts of up to {MAX_PROMPT_LOGPROBS_TOKENS} tokens")

    def _matcher(self, options: SamplingOptions):
        if options.grammar is None:
            return None
        if self.tokenizer is None:
            raise InputError("structured output needs a tokenizer")
        return new_matcher(self.tokenizer, options.grammar, max_tokens=options.max_tokens)  # closes within it

    def start(self) -> None:
        """Run `step()` on a background thread until `stop()`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="small4-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._inbox.put(("wake", None))
            self._thread.join()
            self._thread = None

    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions | Sequence[SamplingOptions],
                 on_finish: Callable[[int, RequestOutput], None] | None = None,
                 images: Sequence[Sequence] | None = None,
                 adapters: Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Run a batch of prompts to completion on this thread; returns one merged `RequestOutput` per prompt.

        Prompts are submitted as queue room allows (back-pressure), so any number can be given; an exception from
        `on_finish` stops the batch and is raised here. images: per prompt,
        its preprocessed images (see `submit`); adapters: per prompt, its LoRA adapter name (None: the base model).
        """
        if isinstance(options, SamplingOptions):
            options = [options] * len(prompts)
        results: list[RequestOutput | None] = [None] * len(prompts)
        parts: list[list[RequestOutput]] = [[] for _ in prompts]
        failed: list[BaseException] = []  # an on_finish that raised (e.g. a full disk): the batch stops at once

        def collect(i):
            def cb(out: RequestOutput):
                parts[i].append(out)
                if out.finished:
                    results[i] = merge_outputs(parts[i])
                    if on_finish is not None and not failed:
                        try:
                            on_finish(i, results[i])
                        except BaseException as e:  # raised below, on the caller's thread
                            failed.append(e)
            return cb

        todo = list(enumerate(prompts))
        todo.reverse()
        while todo or any(r is None for r in results):
            while todo and self._pending < self.max_queue:
                i, prompt = todo.pop()
                imgs = images[i] if images is not None else ()
                self.submit(prompt, options[i], callback=collect(i), request_id=f"gen-{next(self._ids)}",
                            images=imgs, image_hashes=[image_hash(im) for im in imgs],
                            adapter=adapters[i] if adapters is not None else None)
            self.step()
            if failed:
                raise failed[0]
        return results

    def metrics(self) -> dict:
        """Counters and gauges for /metrics."""
        now = time.time()
        with self._metrics_lock:
            times, stats = list(self._token_times), dict(self.stats)
        recent = [(t, n) for t, n in times if now - t <= 10.0]
        tps = sum(n for _, n in recent) / 10.0 if recent else 0.0
        return dict(stats, running=len(self.running), waiting=self._pending, pages_total=self.pool.capacity,
                    pages_used=self.pool.in_use(), pages_cached=self.pool.cached(), tokens_per_second=tps,
                    cache_tokens=self.pool.capacity * self.page_size,
                    **(self.speculator.metrics() if self.speculator is not None else {}))

    def has_work(self) -> bool:
        return bool(self._waiting or self.running or not self._inbox.empty())

    # ---- the step ------------------------------------------------------------------------------------------------

    def step(self) -> None:
        """One scheduling iteration: inbox, admission, one prefill chunk, one decode step."""
        t0 = time.perf_counter()
        self._waited = 0.0
        self._drain_inbox()
        self._failed = {}
        self._prompt_logprobs()
        self._admit()
        prefilling = [r for r in self.running if len(r.tokens) - r.num_computed > 1 or r.generated == 0]
        try:
            if prefilling:
                self._prefill(self._per_shard(prefilling, self.prefill_buckets[-1] // self.cache_shards))
            decoding = [r for r in self.running if len(r.tokens) - r.num_computed == 1 and r.generated > 0]
            if decoding:
                self._decode(decoding) if self.speculator is None else self.speculator.decode(self, decoding)
        except Exception as e:  # a failing step fails its requests, not the engine
            log.exception("engine step failed")
            self.stats["errors"] += 1
            for r in list(self.running):
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
        for r, error in self._failed.values():  # (those `accept` did not already finish)
            self._finish(r, "error", error=error)
        self.stats["steps"] += 1
        self.stats["host_seconds"] += time.perf_counter() - t0 - self._waited

    def fail(self, r: _Request, what: str, e: Exception) -> None:
        """A host-side error in one request's part of the step: that request fails (at the end of the step, or in
        `accept`), the others go on."""
        log.error("request %s: %s failed: %s: %s", r.id, what, type(e).__name__, e)
        self.stats["errors"] += 1
        self._failed.setdefault(r.id, (r, f"{what}: {type(e).__name__}: {e}"))

    def _prompt_logprobs(self) -> None:
        """Prompt log-probabilities of the waiting requests that ask for them (one teacher-forced forward each);
        a request with max_tokens 0 is finished here, never admitted."""
        for r in [r for r in self._waiting if r.options.prompt_logprobs is not None and r.prompt_logprobs is None]:
            try:
                r.prompt_logprobs = self._prompt_logprobs_of(r.tokens[: r.num_prompt], r.options.prompt_logprobs)
            except Exception as e:
                self.fail(r, "prompt logprobs", e)
                continue
            if r.options.max_tokens == 0:
                self._finish(r, "length")

    def _prompt_logprobs_of(self, prompt: list[int], k: int) -> list[TokenLogprob | None]:
        n = len(prompt)
        width = min(max(16, 1 << (n - 1).bit_length()), self.max_model_len)  # one program per power of two
        ids = np.zeros((1, width), np.int32)
        ids[0, :n] = prompt
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            chosen, top_ids, top_lp = jax.device_get(
                _prompt_logprobs_step(self.graphdef, self.state, jnp.asarray(ids), num_top=MAX_TOP_LOGPROBS))
        return [None] + [TokenLogprob(prompt[j], float(chosen[j - 1]),
                                      [(int(a), float(b)) for a, b in zip(top_ids[j - 1, :k], top_lp[j - 1, :k])])
                         for j in range(1, n)]

    def warmup_shapes(self) -> list[tuple[str, int, int, int]]:
        """Every (kind, rows, tokens per row, page-table width) the engine's steps compile; with a vision encoder,
        also each prefill shape taking input embeddings ("image prefill": a chunk with image features)."""
        kinds = [("prefill", self.prefill_buckets, self.prefill_chunks), ("decode", self.batch_buckets, (1,))]
        if self.config.vision is not None:
            kinds.append(("image prefill", self.prefill_buckets, self.prefill_chunks))
        return [(kind, rows, t, w) for w in self.page_buckets for kind, rows_list, ts in kinds
                for t in ts for rows in rows_list]

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile every prefill and decode shape now, so no request waits for a compilation; `progress` gets one
        line per program compiled (infer.serve prints them)."""
        shapes = self.warmup_shapes()
        t0 = time.perf_counter()
        for k, (kind, rows, t, w) in enumerate(shapes, 1):
            self._shapes_seen.add((kind, rows, t, w))  # `progress` reports these
            embeds = None
            if kind == "image prefill":
                embeds = np.zeros((rows, t, self.config.hidden_size), self._embeds_dtype())
            self._run(np.zeros((rows, t), np.int32), *self._null_inputs(rows, t, w), [], rows, [],
                      input_embeds=embeds)
            if progress is not None:
                progress(f"warm-up {k}/{len(shapes)}: {kind} [{rows} x {t}] x {w} pages compiled "
                         f"({time.perf_counter() - t0:.1f} s)")
        # a penalised request's admission writes its slot of the token history (`_reset_history`): compile that too,
        # on the padding rows' slot, whose counts stay zero
        vocab = self.config.vocab_size
        self.history = set_slot(self.history, np.int32(self.max_batch), np.zeros(vocab, np.int32),
                                np.zeros(vocab, np.bool_))
        if self.speculator is not None:
            if progress is not None:  # (tens of seconds on a CPU: not silent)
                progress(f"warm-up: compiling the speculative steps ({self.speculator.config.method}, "
                         f"{self.speculator.k} draft tokens)...")
            self.speculator.warmup(self)
            if progress is not None:
                progress(f"warm-up: speculative steps compiled ({time.perf_counter() - t0:.1f} s)")

    def _embeds_dtype(self):
        """The dtype of the model's input embeddings (what an image chunk's merged embeddings are)."""
        return jax.eval_shape(self.model.embed_tokens, jax.ShapeDtypeStruct((1, 1), jnp.int32)).dtype

    def _null_inputs(self, b, t, w):
        zeros = np.zeros((b, t), np.int32)
        return zeros, zeros, np.zeros((b, t, 2), np.int32), np.zeros((b, w), np.int32), np.zeros((b,), np.int32)

    def _check_images(self, prompt: list[int], images: Sequence):
        """PackedImages for a prompt with [IMG] tokens (InputError if they do not match its images), else None."""
        vc = self.config.vision
        if vc is None:
            if len(images):
                raise InputError("this model has no vision encoder; the request has images")
            return None
        if not len(images) and vc.image_token_id not in prompt:
            return None
        packed = vision.pack_images(vc, images)
        vision.check_image_tokens(vc, np.asarray(prompt), packed)
        return packed

    def _image_embeds(self, reqs, ids: np.ndarray, starts):
        """The input embeddings [rows, chunk, H] of a prefill chunk whose [IMG] tokens take image features, or None
        when the chunk has none. Each request's image features are computed once, by its first chunk with them."""
        if not any(r.images is not None for r in reqs):
            return None
        rows, chunk = ids.shape
        vc = self.config.vision
        index = np.full((rows, chunk), -1, np.int32)
        parts, offset = [], 0
        for i, (r, start) in enumerate(zip(reqs, starts)):
            if r.images is None:
                continue
            token_rows = vision.image_token_rows(vc, np.asarray([r.tokens[: r.num_prompt]]))[0]
            seg = token_rows[start : start + chunk]
            if not (seg >= 0).any():
                continue
            if r.image_features is None:
                with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                    r.image_features = vision.encode_images(self.model, r.images)
            index[i, : len(seg)] = np.where(seg >= 0, seg + offset, -1)
            parts.append(r.image_features)
            offset += r.image_features.shape[0]
        if not parts:
            return None
        features = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return vision.merge_image_features(self.model.embed_tokens(jnp.asarray(ids)), jnp.asarray(index),
                                               features)

    def _run(self, ids, positions, seq_index, slots, page_table, logit_index, reqs, rows, accept, *, absorbed=True,
             input_embeds=None):
        """The forward pass, then the sampler. The forward is dispatched first (asynchronously), so the host builds
        the rows' sampling settings, structured-output masks included, while the device computes the logits."""
        kind = "decode" if ids.shape[1] == 1 else "prefill" if input_embeds is None else "image prefill"
        shape = (kind, *ids.shape, page_table.shape[1])
        if shape not in self._shapes_seen:  # a new shape compiles first: say so, or the wait looks like a hang
            self._shapes_seen.add(shape)
            log.info("compiling the %s step for %d x %d tokens over %d pages (once per shape)...", *shape)
        (ids, positions, seq_index, logit_index, input_embeds), shard_slots, page_table, perm = self.to_shards(
            reqs, rows, (ids, positions, seq_index, logit_index, input_embeds), slots, page_table)
        inv = None if perm is None else np.argsort(perm)
        if input_embeds is not None:  # one placement, so the image prefill step compiles once per shape (warm-up)
            input_embeds = jax.device_put(input_embeds, self._replicated)
        # under the mesh, so mesh-aware code in the model (the expert-parallel MoE) sees it while tracing
        self.set_adapters(reqs, rows, perm)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            extra = {} if input_embeds is None else {"input_embeds": input_embeds}  # prompt chunks with images
            if self.cache_axes:
                extra["cache_axes"] = self.cache_axes
            if self.context_axes:
                extra["context_axes"] = self.context_axes
            logits, self.pages, *routed = self._forward(ids, positions, seq_index, shard_slots, page_table,
                                                        logit_index, absorbed=absorbed, **extra)
            if inv is not None:
                logits = logits[inv]
            sampling = self.row_sampling(reqs, rows, accept)
            *out, self.history = _sample_step(logits, sampling, self.history, num_top=MAX_TOP_LOGPROBS)
        t0 = time.perf_counter()
        out, routed = jax.device_get((out, routed))
        self._waited += time.perf_counter() - t0
        if routed:  # record_routing: each token's ids into its cache row's (padding rows write the null page's)
            self.routing[slots[..., 0], slots[..., 1]] = routed[0] if inv is None else routed[0][inv]
        return out

    def _forward(self, *inputs, absorbed: bool, input_embeds=None, cache_axes=(), context_axes=()):
        """The model step (`paged.logits_step`) on the engine's state and cache -> (logits, pages).

        The state goes in as its flat list of arrays, to a jitted function closed over the graph definition, so a
        step's dispatch does not hash the graph definition or flatten the model in Python (2.7 ms -> 0.4 ms a step
        at the medium config). An EAGLE drafter's own step (`eagle_drafter`) is called as it is.
        """
        extra = {} if input_embeds is None else {"input_embeds": input_embeds}
        if self.logits_step is not logits_step:
            if cache_axes:
                extra["cache_axes"] = cache_axes
            if context_axes:
                extra["context_axes"] = context_axes
            return self.logits_step(self.graphdef, self.state, self.pages, *inputs, absorbed=absorbed, **extra)
        leaves, treedef = jax.tree.flatten(self.state)
        key = (absorbed, tuple(cache_axes), tuple(context_axes))
        held = self._flat_steps.get(key)
        if held is None or held[0] is not self.graphdef or held[1] != treedef:
            held = self._flat_steps[key] = (self.graphdef, treedef,
                                            _flat_logits_step(self.graphdef, treedef, absorbed, tuple(cache_axes),
                                                              tuple(context_axes), self.routing is not None))
        return held[2](leaves, self.pages, *inputs, **extra)

    def set_adapters(self, reqs, rows, perm=None) -> None:
        """Each row's adapter slot into the state before a step (padding rows: the base model; `perm`: the rows'
        order on a sharded cache)."""
        if self.lora is not None:
            ids = np.asarray([r.adapter_slot for r in reqs] + [0] * (rows - len(reqs)), np.int32)
            self.lora.set_ids(self.state, ids if perm is None else ids[perm])

    def _loop(self) -> None:
        while not self._stopping:
            if not self.has_work():
                try:
                    item = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._handle(item)
            self.step()

    # ---- scheduling ----------------------------------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _handle(self, item) -> None:
        kind, value = item
        if kind == "submit":
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += value.num_prompt
            self._waiting.append(value)
        elif kind == "cancel":
            for r in list(self._waiting) + self.running:
                if r.id == value:
                    self._finish(r, "cancelled")
        elif kind == "call":  # a function to run between steps (adapter loading): (fn, done event, result, op)
            fn, done, result, _ = value
            try:
                result.append(fn())
            except Exception as e:  # handed back to the caller's thread
                result.append(e)
            done.set()

    def _release_pending(self, n: int = 1) -> None:
        with self._lock:
            self._pending -= n
            self._lock.notify_all()

    def _per_shard(self, reqs: Sequence[_Request], limit: int) -> list[_Request]:
        """The first `limit` requests of each cache shard, in order."""
        count = [0] * self.cache_shards
        out = []
        for r in reqs:
            if count[r.shard] < limit:
                count[r.shard] += 1
                out.append(r)
        return out

    def _pick_shard(self, hashes, req: _Request) -> int | None:
        """The cache shard for a new request: one with a free row, most prefix-cache hits, then most free pages."""
        if self.cache_shards == 1:
            return 0
        rows = [0] * self.cache_shards
        for r in self.running:
            rows[r.shard] += 1
        open_ = [s for s in range(self.cache_shards) if rows[s] < self.rows_per_shard]
        if not open_:
            return None
        return max(open_, key=lambda s: (self.pool.peek(hashes, req.tokens, req.context, s), self.pool.available(s),
                                         -rows[s], -s))

    def _admit(self) -> None:
        while self._waiting and len(self.running) < self.max_batch:
            req = self._waiting[0]
            if req.after is not None and self._prompt_pending(req.after):
                return
            n_full = (len(req.tokens) - 1) // self.page_size  # the last token is always computed (for its logits)
            hashes = chain_hashes(req.tokens, self.page_size, n_full, context=req.context)
            shard = self._pick_shard(hashes, req)
            if shard is None:
                return
            req.shard = shard
            cached = self.pool.match(hashes, req.tokens, req.context, shard)
            need = math.ceil(len(req.tokens) / self.page_size) - len(cached)
            fresh = self._allocate(len(cached), need, shard)
            if fresh is None:
                self.pool.release(cached)
                if not self.running:  # nothing will free pages: cannot happen for prompts < max_model_len
                    raise RuntimeError("cache too small for one prompt")
                return
            self._waiting.popleft()
            req.slot = self._free_slots.pop()
            if req.options.penalised:
                self._reset_history(req)
            req.pages = PageList(cached + fresh)
            req.hashes = hashes[: len(cached)]
            req.num_computed = len(cached) * self.page_size
            if req.generated == 0:
                req.cached_tokens = req.num_computed
                self.stats["cached_tokens"] += req.num_computed
            self.running.append(req)
            self._release_pending()
            if req.decoder is None and self.tokenizer is not None and (req.options.detokenize or req.options.stop):
                req.decoder = self.tokenizer.stream_decoder()

    def _prompt_pending(self, request_id: str) -> bool:
        """Whether request `request_id` is queued or still computing the full pages of its prompt."""
        for r in self.running:
            if r.id == request_id:
                return r.num_computed < (r.num_prompt - 1) // self.page_size * self.page_size
        return any(r.id == request_id for r in self._waiting)

    def _reset_history(self, req: _Request) -> None:
        """Write `req`'s token history into its slot: its output counts and the tokens of its prompt."""
        vocab = self.config.vocab_size
        counts = np.bincount(np.asarray(req.tokens[req.num_prompt :], np.int64), minlength=vocab).astype(np.int32)
        prompt = np.zeros(vocab, np.bool_)
        prompt[req.tokens[: req.num_prompt]] = True
        self.history = set_slot(self.history, np.int32(req.slot), counts, prompt)

    def ensure_pages(self, req: _Request, n_tokens: int) -> bool:
        """Give `req` pages for n_tokens tokens, preempting younger requests if needed; False if it was preempted."""
        need = math.ceil(n_tokens / self.page_size) - len(req.pages)
        while need > 0:
            fresh = self._allocate(len(req.pages), need, req.shard)
            if fresh is not None:
                req.pages += fresh
                return True
            victim = [r for r in self.running if r.shard == req.shard][-1]  # only its shard's pages help
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _allocate(self, first: int, n: int, shard: int) -> list[int] | None:
        """n fresh pages for page indices first .. of a request on `shard`, or with context parallelism each on
        the context shard owning its position (`PagePool.allocate_at`); None when they are not available."""
        return self.pool.allocate_at(first, n) if self.context_shards > 1 else self.pool.allocate(n, shard)

    def _preempt(self, req: _Request) -> None:
        """Release the pages of `req` and put it first in the queue; it recomputes its tokens when readmitted."""
        self.pool.release(req.pages)
        req.pages, req.hashes, req.num_computed = PageList(), [], 0
        self._free_slots.append(req.slot)
        self.running.remove(req)
        self._waiting.appendleft(req)
        with self._lock:
            self._pending += 1
        self.stats["preempted"] += 1

    def register_pages(self, req: _Request) -> None:
        full = min(req.num_computed, len(req.tokens)) // self.page_size
        if full > len(req.hashes):
            req.hashes = chain_hashes(req.tokens, self.page_size, full, req.hashes, req.context)
            size = self.page_size
            for i in range(full):
                self.pool.register(req.pages[i], req.hashes[i], req.hashes[i - 1] if i else req.context,
                                   req.tokens[i * size : (i + 1) * size])

    # ---- model steps ---------------------------------------------------------------------------------------------

    def row_sampling(self, reqs: Sequence[_Request], rows: int, accept: Sequence[int], mask=None) -> RowSampling:
        """Settings of `rows` rows (the requests, then padding); `accept[i]`: row i's token joins its output. mask:
        the rows' token masks if the caller made them (speculative verification: one per position), else the
        structured-output rows' masks are computed here."""
        constrained = [(r.matcher, i) for i, r in enumerate(reqs) if r.matcher is not None and accept[i]]
        if constrained and mask is None:
            t0 = time.perf_counter()
            mask = np.full((rows, mask_words(self.config.vocab_size)), -1, np.int32)
            try:
                fill_masks(self.tokenizer, constrained, mask)
            except Exception:  # find the rows whose grammar fails: they fail alone (their rows stay unmasked)
                for m, i in constrained:
                    try:
                        fill_masks(self.tokenizer, [(m, i)], mask)
                    except Exception as e:
                        mask[i] = -1
                        self.fail(reqs[i], "structured output mask", e)
            self.stats["mask_seconds"] += time.perf_counter() - t0
            self.stats["masked_tokens"] += len(constrained)
        try:
            return self._row_sampling(reqs, rows, accept, mask)
        except Exception:  # a row the sampler cannot hold fails alone; its row samples with the defaults
            reqs = list(reqs)
            for i, r in enumerate(reqs):
                try:
                    self._row_sampling([r], 1, [1], None)
                except Exception as e:
                    self.fail(r, "sampling settings", e)
                    reqs[i] = dataclasses.replace(r, options=SamplingOptions(), seed=0)
            return self._row_sampling(reqs, rows, accept, mask)

    def _row_sampling(self, reqs: Sequence[_Request], rows: int, accept: Sequence[int], mask) -> RowSampling:
        pad = rows - len(reqs)
        o = [r.options for r in reqs]
        return RowSampling.from_lists(
            [x.temperature for x in o] + [0.0] * pad, [x.top_k for x in o] + [0] * pad,
            [x.top_p for x in o] + [1.0] * pad, [x.min_p for x in o] + [0.0] * pad,
            [r.seed for r in reqs] + [0] * pad, [r.generated for r in reqs] + [0] * pad,
            vocab=self.config.vocab_size, presence=[x.presence_penalty for x in o] + [0.0] * pad,
            frequency=[x.frequency_penalty for x in o] + [0.0] * pad,
            repetition=[x.repetition_penalty for x in o] + [1.0] * pad,
            logit_bias=[x.logit_bias for x in o] + [None] * pad, mask=mask,
            slot=[r.slot for r in reqs] + [self.max_batch] * pad, accept=list(accept) + [0] * pad,
        )

    def padded_rows(self, reqs: Sequence[_Request], buckets: Sequence[int]) -> int:
        """Rows of a step over `reqs`: a bucket holding them, and with a sharded cache, holding each shard's
        requests in its block of rows / shards rows (`shard_layout`)."""
        d = self.cache_shards
        if d == 1:
            return _bucket(len(reqs), buckets)
        most = max(sum(r.shard == s for r in reqs) for s in range(d))
        return _bucket(d * most, buckets)

    def shard_layout(self, reqs: Sequence[_Request], rows: int) -> np.ndarray:
        """perm [rows]: the step's row j in the sharded layout is row perm[j] of the request-ordered arrays (requests
        first, then padding), so that block s of rows / shards rows holds shard s's requests."""
        d, local = self.cache_shards, rows // self.cache_shards
        perm = np.full(rows, -1, np.int64)
        fill = [0] * d
        for i, r in enumerate(reqs):
            perm[r.shard * local + fill[r.shard]] = i
            fill[r.shard] += 1
        perm[perm < 0] = np.arange(len(reqs), rows)
        return perm

    def to_shards(self, reqs, rows, arrays, slots, page_table):
        """A step's inputs for the sharded cache: each of `arrays` ([rows, ...] or None), slots and page_table with
        their rows in shard blocks (`shard_layout`) and page ids made each shard's own, and perm (outputs[argsort(
        perm)] are back in request order). Unchanged, with perm None, on an unsharded cache."""
        if self.context_shards > 1:  # each context shard's columns in turn, its own page ids (`forward`)
            c, (b, w) = self.context_shards, page_table.shape
            table = np.pad(page_table, ((0, 0), (0, -w % c)))  # padding: the null page
            table = table.reshape(b, -1, c).transpose(0, 2, 1).reshape(b, -1) % self.pool.per_shard
            slots = slots.copy()
            slots[..., 0] %= self.pool.per_shard
            return arrays, slots, table, None
        if self.cache_shards == 1:
            return arrays, slots, page_table, None
        perm = self.shard_layout(reqs, rows)
        slots, page_table = slots[perm].copy(), page_table[perm] % self.pool.per_shard
        slots[..., 0] %= self.pool.per_shard
        return [None if a is None else a[perm] for a in arrays], slots, page_table, perm

    def page_table(self, reqs: Sequence[_Request], rows: int, n_pages: int) -> np.ndarray:
        """The page table [rows, width] of a step over `reqs` (then padding rows, all null), width the page bucket of
        n_pages: each request's slot row of the engine's table, brought up to date with what changed in its pages."""
        width = _bucket(n_pages, self.page_buckets)
        for r in reqs:
            self._copy_pages(r)
        slots = np.fromiter((r.slot for r in reqs), np.int64, len(reqs))
        return self._table[np.concatenate([slots, np.full(rows - len(reqs), self.max_batch)]), :width]

    def _copy_pages(self, r: _Request) -> None:
        """Write into slot r.slot's table row the pages of `r` that changed since that row was last written (all of
        them when the row last held another page list: another request, or this one before a preemption)."""
        held, copied = self._table_copy[r.slot]
        pages, row = r.pages, self._table[r.slot]
        n = min(len(pages), row.shape[0])  # (a speculative row may hold pages past max_model_len: never read)
        start = min(copied, pages.changed_from) if held is pages else 0
        if start < n:
            row[start:n] = pages[start:n]
        if copied > n:  # the row held more pages than now: null the rest
            row[n:copied] = NULL_PAGE
        pages.changed_from = len(pages)
        self._table_copy[r.slot] = (pages, n)

    def _prefill(self, reqs: Sequence[_Request]) -> None:
        """One chunk of prompt for each of `reqs` (up to `prefill_batch` rows); rows that reach the end sample."""
        rows, size = self.padded_rows(reqs, self.prefill_buckets), self.page_size
        longest = max(min(len(r.tokens) - r.num_computed, self.prefill_chunk) for r in reqs)
        chunk = _bucket(longest, self.prefill_chunks)
        ids = np.zeros((rows, chunk), np.int32)
        seq_index = np.zeros((rows, chunk), np.int32)
        slots = np.zeros((rows, chunk, 2), np.int32)  # padding writes go to the null page
        logit_index = np.zeros((rows,), np.int32)
        ends = []
        for i, r in enumerate(reqs):
            start = r.num_computed
            end = min(len(r.tokens), start + chunk)
            n = end - start
            ids[i, :n] = r.tokens[start:end]
            seq_index[i] = end - 1
            seq_index[i, :n] = np.arange(start, end)
            slots[i, :n, 0] = [r.pages[k // size] for k in range(start, end)]
            slots[i, :n, 1] = np.arange(start, end) % size
            logit_index[i] = n - 1
            ends.append(end)
        table = self.page_table(reqs, rows, math.ceil(max(ends) / size))
        accept = [int(end == len(r.tokens)) for r, end in zip(reqs, ends)]
        embeds = self._image_embeds(reqs, ids, [r.num_computed for r in reqs])
        out = self._run(ids, seq_index, seq_index, slots, table, logit_index, reqs, rows, accept, input_embeds=embeds)
        self.stats["prefill_steps"] += 1
        done = []
        for i, (r, end) in enumerate(zip(reqs, ends)):
            r.num_computed = end
            if end >= r.num_prompt:
                r.image_features = None  # the prompt's cache rows are written (a preempted request recomputes them)
            self.register_pages(r)
            if end == len(r.tokens):
                done.append(i)
        if done:
            self.accept([reqs[i] for i in done], [x[done] for x in out])
        if self.speculator is not None:  # an EAGLE draft writes its rows of this chunk
            self.speculator.prefilled(self, reqs, ends)

    def _decode(self, reqs: list[_Request]) -> None:
        for r in list(reqs):
            if r in self.running and not self.ensure_pages(r, r.num_computed + 1):
                reqs.remove(r)
        reqs = [r for r in reqs if r in self.running]
        if not reqs:
            return
        rows = self.padded_rows(reqs, self.batch_buckets)
        ids = np.zeros((rows, 1), np.int32)
        seq_index = np.zeros((rows, 1), np.int32)
        slots = np.zeros((rows, 1, 2), np.int32)
        for i, r in enumerate(reqs):
            ids[i, 0] = r.tokens[r.num_computed]
            seq_index[i, 0] = r.num_computed
            slots[i, 0] = (r.pages[r.num_computed // self.page_size], r.num_computed % self.page_size)
        table = self.page_table(reqs, rows, max(len(r.pages) for r in reqs))
        out = self._run(ids, seq_index, seq_index, slots, table, np.zeros((rows,), np.int32), reqs, rows,
                        [1] * len(reqs))
        self.stats["decode_steps"] += 1
        for r in reqs:
            r.num_computed += 1
            self.register_pages(r)
        self.accept(reqs, out)

    def accept(self, reqs: Sequence[_Request], out) -> None:
        """Append each row's sampled token, emit its event, finish the requests that are done."""
        tokens, logprobs, top_ids, top_lp = out
        now = time.time()
        with self._metrics_lock:
            self._token_times.append((now, len(reqs)))
        for i, r in enumerate(reqs):
            if r.id in self._failed:
                self._finish(r, "error", error=self._failed.pop(r.id)[1])
                continue
            try:
                self._accept_one(r, i, tokens, logprobs, top_ids, top_lp, now)
            except Exception as e:  # this request's output failed (a grammar's consume, a decoder): it alone ends
                self.fail(r, "output", e)
                self._finish(r, "error", error=self._failed.pop(r.id)[1])

    def _accept_one(self, r: _Request, i: int, tokens, logprobs, top_ids, top_lp, now: float) -> None:
        t = int(tokens[i])
        r.tokens.append(t)
        self.stats["generated_tokens"] += 1
        if r.first_token_time is None:
            r.first_token_time = now
        lp = None
        if r.options.logprobs is not None:
            k = r.options.logprobs
            lp = [TokenLogprob(t, float(logprobs[i]),
                               [(int(a), float(b)) for a, b in zip(top_ids[i, :k], top_lp[i, :k])])]
        reason = None
        if r.matcher is not None and not r.matcher.consume_token(t):
            self._emit(r, RequestOutput(r.id, [t], "", lp))
            self._finish(r, "error", error=f"structured output: {r.matcher.get_error()}")
            return
        if t in r.stop_ids or (r.matcher is not None and r.matcher.is_stopped()):
            reason = "stop"
        elif r.generated >= r.options.max_tokens or len(r.tokens) >= self.max_model_len:
            reason = "length"
        new_text, stopped = self._push_text(r, t, final=reason is not None)
        if stopped:
            reason = "stop"
        self._emit(r, RequestOutput(r.id, [t], new_text, lp))
        if reason is not None:
            self._finish(r, reason)

    def _push_text(self, r: _Request, token: int, final: bool) -> tuple[str, bool]:
        """Decode `token` into r.text; return (text that can be sent now, whether a stop string was hit)."""
        if r.decoder is None:
            return "", False
        r.text += r.decoder.push(token)
        stopped = False
        stops = r.options.stop
        if stops:
            hits = [i for i in (r.text.find(s, max(0, r.emitted - len(s) + 1)) for s in stops) if i >= 0]
            if hits:
                r.text = r.text[: min(hits)]
                stopped = final = r.stop_hit = True
        end = len(r.text)
        if stops and not final:  # hold back a tail that may be the start of a stop string
            for s in stops:
                for k in range(min(len(s) - 1, len(r.text)), 0, -1):
                    if r.text.endswith(s[:k]):
                        end = min(end, len(r.text) - k)
                        break
        new = r.text[r.emitted : max(end, r.emitted)]
        r.emitted = max(end, r.emitted)
        return new, stopped

    def _emit(self, r: _Request, out: RequestOutput) -> None:
        out.prompt_tokens = r.num_prompt
        out.completion_tokens = r.generated
        out.cached_tokens = r.cached_tokens
        if r.prompt_logprobs is not None and not r.prompt_logprobs_sent:
            out.prompt_logprobs, r.prompt_logprobs_sent = r.prompt_logprobs, True
        if r.callback is not None:
            try:
                r.callback(out)
            except Exception:  # a broken consumer must not stop the engine
                log.exception("request %s: callback failed", r.id)

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        routed = None
        if r in self.running:
            if self.routing is not None:  # the ids of every token it read, from its pages' rows, before their release
                pos = np.arange(r.num_computed)
                routed = self.routing[np.asarray(r.pages, np.int64)[pos // self.page_size], pos % self.page_size]
            self.running.remove(r)
            self.pool.release(r.pages)
            r.pages = PageList()
            self._free_slots.append(r.slot)
        elif r in self._waiting:
            self._waiting.remove(r)
            self._release_pending()
        else:
            return
        tail = ""
        if r.decoder is not None and reason in ("stop", "length"):
            if not r.stop_hit:
                r.text += r.decoder.flush()  # an incomplete character at the end comes out as U+FFFD
            tail = r.text[r.emitted :]
            r.emitted = len(r.text)
        self.stats["finished"] += 1
        if r.matcher is not None:
            self.stats["structured_fallbacks"] += getattr(r.matcher, "fallbacks", 0)
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        self._emit(r, RequestOutput(r.id, [], tail, None, finished=True, finish_reason=reason, error=error,
                                    routed_experts=routed))


_sample_step = jax.jit(sample_rows, static_argnames=("num_top",), donate_argnames=("history",))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_top"))
def _prompt_logprobs_step(graphdef, state, ids, *, num_top: int):
    """Teacher-forced log-probabilities of ids [1, T] (the model's plain forward, no cache): each token's given the
    ones before it [T - 1], and the num_top most likely there (ids, logprobs)."""
    logits = nnx.merge(graphdef, state)(ids)[0, :-1].astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(lp, ids[0, 1:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, num_top)
    return chosen, top_ids, top_lp


@functools.lru_cache(maxsize=64)
def _flat_logits_step(graphdef, treedef, absorbed: bool, cache_axes: tuple[str, ...],
                      context_axes: tuple[str, ...] = (), record_routing: bool = False):
    """`paged.logits_step` for one graph definition, jitted over the state's flat list of arrays (`Engine._forward`),
    with the cache donated. Cached by value: a new split of an equal model (an adapter loaded into a free slot)
    gets the same jitted function, so it compiles nothing."""

    def run(leaves, pages, ids, positions, seq_index, slots, page_table, logit_index, input_embeds=None):
        extra = {} if input_embeds is None else {"input_embeds": input_embeds}
        if cache_axes:
            extra["cache_axes"] = cache_axes
        if context_axes:
            extra["context_axes"] = context_axes
        if record_routing:  # (a keyword only when on: the default step's trace is the one without it)
            extra["record_routing"] = True
        return logits_step(graphdef, jax.tree.unflatten(treedef, leaves), pages, ids, positions, seq_index, slots,
                           page_table, logit_index, absorbed=absorbed, **extra)

    return jax.jit(run, donate_argnums=(1,))


def merge_outputs(parts: Sequence[RequestOutput]) -> RequestOutput:
    """The events of one request merged into one (all ids, all text, all logprobs, the final reason)."""
    last = parts[-1]
    lps = [lp for p in parts if p.logprobs for lp in p.logprobs]
    return RequestOutput(
        last.request_id, [t for p in parts for t in p.token_ids], "".join(p.text for p in parts),
        lps if any(p.logprobs is not None for p in parts) else None, last.finished, last.finish_reason,
        last.prompt_tokens, last.completion_tokens, last.cached_tokens, last.error,
        next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None),
        next((p.routed_experts for p in parts if p.routed_experts is not None), None),
    )
