"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    python -m infer.serve --config configs/tiny.yaml                      # random tiny model, bundled tokenizer
    python -m infer.serve --checkpoint /models/Mistral-Small-4 --port 8000 --api-key "$KEY"

Endpoints: POST /v1/chat/completions (streaming and not; tools, tool_choice, reasoning_effort; reasoning comes back
as `reasoning_content` and `reasoning`, and for Mistral's SDK as thinking content chunks), POST /v1/completions
(OpenAI's prompt shapes, echo with prompt logprobs), GET /v1/models, GET /health, GET /metrics (Prometheus text),
and vLLM's /tokenize, /detokenize, /tokenizer_info (lm-eval's remote tokenizer).
It binds 127.0.0.1 unless --host says otherwise. With --api-key, /v1/* answers 401 without
`Authorization: Bearer KEY` (/health and /metrics stay open for probes and scrapers). Malformed requests get a 400
with an OpenAI-style error body naming the problem; a full queue gets a 429. A client that disconnects cancels its
request, which frees its cache pages at the engine's next step.

The engine runs on its own thread; each request's events cross to the event loop through an asyncio queue.
"""

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infer import structured
from infer.chat import CLIENT_EFFORTS, ChatParser, ReasoningPolicy, encode_chat, model_efforts, normalize_messages
from infer.cli import add_engine_args, engine_kwargs, load_model_and_tokenizer
from small4_jax.console import cli_main
from small4_jax.errors import InputError, Small4Error

# The engine (and so JAX) is imported where it is used, so `--help` answers without loading JAX.
log = logging.getLogger("small4_jax")


# ---- request schemas -------------------------------------------------------------------------------------------------
MAX_N = 16  # choices per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    include_usage: bool = False


class _LoadLoRA(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str


class _Tokenize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class _Detokenize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: list[int]
    model: str | None = None


class _UnloadLoRA(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str


class _Common(BaseModel):
    """Fields every endpoint takes. Every field a client may send is listed: any other is a 400 naming it (`parse`),
    never silently ignored."""

    # strict: `"temperature": "0.5"` is a 400 naming the field, not silently a number
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    # every sampling field is range-checked here (a 400 naming it), never first in the engine's step, where an
    # overflow would fail the whole batch: seeds are uint32, top_k int32 (values past the vocabulary turn it off)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    random_seed: int | None = Field(None, ge=0, le=2**32 - 1)  # Mistral's API's name for `seed`
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the operator's logs; it changes nothing
    cache_salt: str | None = None  # a tenant's prefix-cache salt: requests share cached pages only with the same salt


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | any (Mistral's required) | named
    # OpenAI's none/minimal/low/medium/high, Mistral's xhigh/max, and auto: mapped onto the model's values by the
    # server's ReasoningPolicy (infer/chat.py)
    reasoning_effort: Literal[CLIENT_EFFORTS] | None = None
    reasoning: dict[str, Any] | None = None  # {"effort": ...}: the same, as some OpenAI-compatible clients send it
    prompt_mode: Literal["reasoning"] | None = None  # Mistral's API: "reasoning" asks for the reasoning mode
    safe_prompt: bool = False  # Mistral's API: true is a 400 (no safety prompt is served)
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # default: true, but a named tool_choice gives exactly one call
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Common):
    # OpenAI's prompt shapes: a string, strings, token ids, lists of token ids (one set of n choices per prompt)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_body(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---- the app ---------------------------------------------------------------------------------------------------------
class Server:
    """Request handling shared by the endpoints: validation, submission, event streaming, metrics."""

    def __init__(self, engine: "Engine", tokenizer, model_name: str, api_key: str | None = None,
                 image_dir: str | None = None, reasoning: ReasoningPolicy = ReasoningPolicy()):
        self.engine = engine
        self.reasoning = reasoning  # client reasoning_effort values -> the model's
        self.image_dir = image_dir  # image parts may name files under it (None: data: URLs only)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_names = {model_name}  # what a request's `model` may say
        self.api_key = api_key
        self.started = time.time()
        self.http_counts: dict[tuple[str, int], int] = {}

    # -- validation --
    def options(self, req: _Common, prompt_len: int, logprobs: int | None, grammar: str | None = None,
                detokenize: bool = True, prompt_logprobs: int | None = None) -> "SamplingOptions":
        from infer.engine.engine import SamplingOptions

        if req.model is not None and req.model not in self.model_names and req.model not in self.adapters():
            raise HTTPError(400, f"model {req.model!r} is not served here; GET /v1/models lists "
                                 f"{', '.join(map(repr, sorted(self.model_names | set(self.adapters()))))}",
                            param="model")
        context = self.engine.max_model_len
        if prompt_len >= context:
            raise HTTPError(400, f"prompt has {prompt_len} tokens but the model's context is {context}; "
                                 "shorten the prompt", param="messages")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = context - prompt_len
        elif max_tokens == 0 and prompt_logprobs is not None:
            pass  # echo with logprobs: the prompt's log-probabilities only
        elif max_tokens <= 0:
            raise HTTPError(400, f"max_tokens must be positive (0 only with echo and logprobs), got {max_tokens}",
                            param="max_tokens")
        elif prompt_len + max_tokens > context:
            raise HTTPError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {context} tokens", param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        bias = None
        if req.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError:
                raise HTTPError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") \
                    from None
        if req.seed is not None and req.random_seed is not None and req.seed != req.random_seed:
            raise HTTPError(400, f"seed ({req.seed}) and random_seed ({req.random_seed}) differ; send one",
                            param="random_seed")
        seed = req.seed if req.seed is not None else req.random_seed
        try:
            return SamplingOptions(
                max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                min_p=req.min_p, seed=seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos, logprobs=logprobs, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, logit_bias=bias,
                grammar=grammar, detokenize=detokenize, prompt_logprobs=prompt_logprobs,
            )
        except InputError as e:
            msg = str(e)
            raise HTTPError(400, msg, param=msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in _Common.model_fields
                            else None) from None

    def adapters(self) -> dict:
        """The LoRA adapters served (name -> adapter), selected by a request's `model` (small4_jax/lora/multi.py)."""
        lora = getattr(self.engine, "lora", None)
        return {} if lora is None else dict(lora.adapters)

    def adapter_for(self, model: str | None) -> str | None:
        return model if model is not None and model not in self.model_names and model in self.adapters() else None

    def submit(self, prompt: list[int], options: "SamplingOptions", n: int = 1, cache_salt: str | None = None,
               images=(), image_hashes=(), adapter: str | None = None, events: asyncio.Queue | None = None,
               first: int = 0):
        """Queue the n choices of a request; returns (their engine ids, asyncio queue of (choice, RequestOutput)).
        events, first: put the events on this queue, the choices numbered from `first` (several prompts in one
        completion request).

        Choices after the first are admitted once the first has cached its prompt pages (`Engine.submit(after=)`),
        so the prompt is computed once; a seeded request gives choice i the seed seed + i."""
        from infer.engine.engine import QueueFull

        loop = asyncio.get_running_loop()
        events = asyncio.Queue() if events is None else events
        rids: list[str] = []
        base = f"r-{uuid.uuid4().hex[:16]}"
        try:
            for i in range(first, first + n):
                opts = options
                if i > first and options.seed is not None:
                    opts = dataclasses.replace(options, seed=(options.seed + i - first) % 2**32)

                def callback(out: "RequestOutput", i=i):
                    loop.call_soon_threadsafe(events.put_nowait, (i, out))

                rids.append(self.engine.submit(prompt, opts, callback=callback, request_id=f"{base}-{i}",
                                               after=rids[0] if rids else None, cache_salt=cache_salt,
                                               images=images, image_hashes=image_hashes, adapter=adapter))
        except (QueueFull, InputError) as e:
            for rid in rids:
                self.engine.cancel(rid)
            if isinstance(e, QueueFull):
                raise HTTPError(429, str(e), kind="rate_limit_error") from None
            raise HTTPError(400, str(e)) from None
        return rids, events

    def need_tokenizer(self):
        if self.tokenizer is None:
            raise HTTPError(400, "this server has no tokenizer")
        return self.tokenizer

    def cancel_all(self, rids) -> None:
        for rid in rids:
            self.engine.cancel(rid)

    def reasoning_effort(self, req: "ChatRequest") -> str | None:
        """The model's reasoning_effort for a request: `reasoning_effort`, `reasoning.effort` or Mistral's
        `prompt_mode: "reasoning"`, through the server's ReasoningPolicy."""
        effort = req.reasoning_effort
        if req.reasoning is not None:
            given = req.reasoning.get("effort")
            if set(req.reasoning) - {"effort", "summary"} or given not in CLIENT_EFFORTS:
                raise HTTPError(400, f"reasoning: expected {{\"effort\": one of {list(CLIENT_EFFORTS)}}}",
                                param="reasoning")
            if effort is not None and effort != given:
                raise HTTPError(400, "reasoning.effort and reasoning_effort differ; send one", param="reasoning")
            effort = given
        if effort is None and req.prompt_mode == "reasoning":
            effort = "high"
        try:
            return self.reasoning.resolve(effort, model_efforts(self.tokenizer))
        except InputError as e:
            raise HTTPError(400, str(e), param="reasoning_effort") from None

    def plan_chat(self, req: "ChatRequest") -> "ChatPlan":
        """Prompt ids, output grammar and answer parsing of a chat request; HTTPError 400 naming what is wrong."""
        if self.tokenizer is None:
            raise HTTPError(400, "this server has no tokenizer: chat is unavailable")
        if req.safe_prompt:
            raise HTTPError(400, "safe_prompt: this server has no safety prompt to prepend; send false or leave it "
                                 "out", param="safe_prompt")
        effort = self.reasoning_effort(req)
        tool_choice = "required" if req.tool_choice == "any" else req.tool_choice  # Mistral's "any"
        named = isinstance(tool_choice, dict)
        parallel = req.parallel_tool_calls if req.parallel_tool_calls is not None else not named
        forced_tools = tool_choice == "required" or named
        try:
            messages = normalize_messages(req.messages)
            use_grammar = (req.response_format not in (None, {"type": "text"})
                           or (forced_tools and structured.available(self.tokenizer)))
            prompt = encode_chat(self.tokenizer, messages, tools=req.tools, tool_choice=tool_choice,
                                 reasoning_effort=effort, force_prefix=not use_grammar, image_dir=self.image_dir)
        except InputError as e:
            msg = str(e)
            param = "tools" if msg.startswith("tools") else msg.split(":")[0] if msg.startswith("messages[") \
                else "messages"  # an image part's error names it: messages[i].content[j]
            raise HTTPError(400, msg, param=param) from None
        grammar = None
        if use_grammar:
            try:
                grammar = structured.chat_grammar(
                    self.tokenizer, messages, tools=req.tools, tool_choice=tool_choice,
                    response_format=req.response_format, parallel_tool_calls=parallel,
                    reasoning=effort not in (None, "none"))
            except InputError as e:
                raise HTTPError(400, str(e), param="response_format") from None
        return ChatPlan(prompt, grammar, (req.top_logprobs or 0) if req.logprobs else None, self.tokenizer,
                        parse_tools=tool_choice != "none" and bool(req.tools),
                        max_calls=None if parallel or not forced_tools else 1)

    # -- helpers for responses --
    def token_str(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special=False) if self.tokenizer is not None else str(t)

    def chat_logprobs(self, lps) -> dict | None:
        if lps is None:
            return None

        def entry(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(entry(x.token_id, x.logprob), top_logprobs=[entry(a, b) for a, b in x.top])
                            for x in lps]}

    def completion_logprobs(self, parts, logprobs: int | None, echo: bool, prompt: list[int]) -> dict | None:
        """OpenAI's completion logprobs of one choice's events; with echo the prompt's tokens lead (the first one's
        logprob and top_logprobs null: nothing precedes it)."""
        if logprobs is None:
            return None
        tokens, values, tops = [], [], []
        for p in parts:
            lps = p.logprobs or []
            if echo and p.prompt_logprobs is not None:
                tokens.append(prompt[0])
                values.append(None)
                tops.append(None)
                lps = p.prompt_logprobs[1:] + lps
            tokens += [x.token_id for x in lps]
            values += [x.logprob for x in lps]
            tops += [self._top_dict(x.top) for x in lps]
        return {"tokens": [self.token_str(t) for t in tokens], "token_logprobs": values, "top_logprobs": tops}

    def completion_prompts(self, req: "CompletionRequest") -> list[list[int]]:
        """The prompts of a completion request as id lists: OpenAI's four shapes (a string, strings, token ids,
        token-id lists)."""
        p = req.prompt
        many = isinstance(p, list) and p and not all(isinstance(t, int) for t in p)
        items = p if many else [p]
        if not items:
            raise HTTPError(400, "prompt: expected a string, a list of strings, token ids or lists of token ids "
                                 "(got an empty list)", param="prompt")
        prompts = []
        for k, item in enumerate(items):
            where = f"prompt[{k}]" if many else "prompt"
            if isinstance(item, str):
                if not item:  # BOS alone is not a prompt
                    raise HTTPError(400, f"{where}: empty prompt", param="prompt")
                if self.tokenizer is None:
                    raise HTTPError(400, "this server has no tokenizer: give the prompt as token ids", param="prompt")
                prompts.append(self.tokenizer.encode(item, bos=True))
            elif not item:
                raise HTTPError(400, f"{where}: empty list of token ids", param="prompt")
            else:
                prompts.append([int(t) for t in item])
        return prompts

    def _top_dict(self, top) -> dict:
        out: dict[str, float] = {}
        for a, b in top:  # most likely first; tokens that print alike keep the larger logprob
            out.setdefault(self.token_str(a), b)
        return out

    @staticmethod
    def usage(outs: list["RequestOutput"], n: int | None = None) -> dict:
        """Usage of a request from its choices' final events (each prompt counted once: `n` choices per prompt)."""
        n = n or len(outs)
        prompt = sum(o.prompt_tokens for o in outs[::n])
        completion = sum(o.completion_tokens for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outs[::n])}}

    def metrics_text(self) -> str:
        m = self.engine.metrics()
        rows = [
            ("requests_total", "counter", "Requests received by the engine.", m["requests"]),
            ("requests_finished_total", "counter", "Requests finished (any reason).", m["finished"]),
            ("requests_cancelled_total", "counter", "Requests cancelled (client gone or asked).", m["cancelled"]),
            ("requests_preempted_total", "counter", "Preemptions for lack of cache pages.", m["preempted"]),
            ("prompt_tokens_total", "counter", "Prompt tokens received.", m["prompt_tokens"]),
            ("generation_tokens_total", "counter", "Tokens generated.", m["generated_tokens"]),
            ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
             m["cached_tokens"]),
            ("engine_steps_total", "counter", "Engine scheduling steps.", m["steps"]),
            ("engine_host_seconds_total", "counter",
             "Seconds the engine thread spent on host work (scheduling, inputs, sampling settings, outputs), not "
             "waiting for the device.", m["host_seconds"]),
            ("structured_mask_seconds_total", "counter", "Seconds spent computing structured-output token masks.",
             m["mask_seconds"]),
            ("structured_masked_tokens_total", "counter", "Tokens sampled under a structured-output mask.",
             m["masked_tokens"]),
            ("structured_fallbacks_total", "counter",
             "Structured-output steps where no canonical token was found and the grammar's mask was used as is "
             "(that answer's token ids may not be the tokenizer's encoding of its text).", m["structured_fallbacks"]),
            ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.", m["tokens_per_second"]),
            ("queue_depth", "gauge", "Requests waiting for admission.", m["waiting"]),
            ("running_requests", "gauge", "Requests admitted (prefilling or decoding).", m["running"]),
            ("cache_pages_used", "gauge", "Cache pages owned by requests.", m["pages_used"]),
            ("cache_pages_total", "gauge", "Cache pages available to requests.", m["pages_total"]),
            ("cache_usage_ratio", "gauge", "Fraction of cache pages in use.", m["pages_used"] / m["pages_total"]),
        ]
        if "spec_draft_tokens" in m:  # --speculative (infer/speculative/decoder.py)
            rows += [
                ("spec_draft_tokens_total", "counter", "Draft tokens proposed.", m["spec_draft_tokens"]),
                ("spec_accepted_tokens_total", "counter", "Draft tokens accepted.", m["spec_accepted_tokens"]),
                ("spec_verify_rows_total", "counter", "Rows verified (one per request and step).",
                 m["spec_verify_rows"]),
                ("spec_acceptance_rate", "gauge", "Accepted / proposed draft tokens.", m["spec_acceptance_rate"]),
                ("spec_mean_accepted_length", "gauge", "Tokens gained per row and verify step.",
                 m["spec_mean_accepted_length"]),
            ]
        lines = []
        for name, kind, doc, value in rows:
            lines += [f"# HELP small4_{name} {doc}", f"# TYPE small4_{name} {kind}", f"small4_{name} {value}"]
        lines += ["# HELP small4_http_requests_total HTTP requests by path and status.",
                  "# TYPE small4_http_requests_total counter"]
        for (path, status), n in sorted(self.http_counts.items()):
            lines.append(f'small4_http_requests_total{{path="{path}",status="{status}"}} {n}')
        return "\n".join(lines) + "\n"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def reason_of(out: "RequestOutput") -> str:
    return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"


def check_errors(finals: list["RequestOutput"]) -> None:
    for out in finals:
        if out.finish_reason == "error":
            raise HTTPError(500, f"generation failed: {out.error}", kind="server_error")


def is_mistral_sdk(user_agent: str) -> bool:
    """Whether a request comes from Mistral's own SDK ("mistral-client-python/3.7.0", "...mistralai"), which reads
    reasoning as thinking content chunks, as Mistral's API returns it."""
    return user_agent.startswith("mistral-client") or user_agent.endswith("mistralai")


def thinking_chunk(text: str) -> dict:
    """Reasoning as Mistral's API returns it: a thinking content chunk (its text as a list of text chunks)."""
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


def chat_message(parser: ChatParser, stop, mistral: bool) -> dict:
    """The assistant message of a parsed answer: reasoning as `reasoning_content` and `reasoning` (both, as
    clients read either), and for Mistral's SDK also as a thinking chunk leading `content`."""
    content = _cut_at_stop(parser.content, stop)
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not parser.tool_calls else None}
    if parser.reasoning:
        message["reasoning_content"] = message["reasoning"] = parser.reasoning
        if mistral:
            message["content"] = [thinking_chunk(parser.reasoning), *([{"type": "text", "text": content}]
                                                                      if content else [])]
    if parser.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in parser.tool_calls]
    return message


def chat_finish_reason(out: "RequestOutput", parser: ChatParser) -> str:
    if out.finish_reason == "stop" and parser.tool_calls:
        return "tool_calls"
    return reason_of(out)


@dataclasses.dataclass
class ChatPlan:
    """A chat request made ready for the engine: its prompt, grammar, and how to parse its answers."""

    prompt: Any  # infer.chat.ChatPrompt
    grammar: str | None
    logprobs: int | None
    tokenizer: Any
    parse_tools: bool
    max_calls: int | None  # 1 for a named tool_choice without parallel_tool_calls

    def parser(self) -> ChatParser:
        parser = ChatParser(self.tokenizer, parse_tools=self.parse_tools)
        for t in self.prompt.forced:
            parser.push(t)
        return parser

    def parse(self, ids) -> ChatParser:
        parser = self.parser()
        for t in ids:
            parser.push(t)
        parser.finish()
        if self.max_calls is not None:
            del parser.tool_calls[self.max_calls:]
        return parser


class ChatStream:
    """The server-sent events of a streamed chat completion: OpenAI's chunk format (tool calls: index, id and name
    first, then argument fragments), or for Mistral's SDK thinking chunks and whole tool calls, as its API sends."""

    def __init__(self, server: "Server", plan: ChatPlan, options, rids, events, head: dict, include_usage: bool,
                 mistral: bool):
        self.server, self.plan, self.options, self.rids, self.events = server, plan, options, rids, events
        self.head, self.include_usage, self.mistral = head, include_usage, mistral
        self.parsers = [plan.parser() for _ in rids]
        self.sent = [""] * len(rids)  # content sent so far per choice, to cut at stop strings
        self.finals: list = [None] * len(rids)

    def chunk(self, i, delta, reason=None, lps=None) -> str:
        return sse({**self.head, "choices": [{"index": i, "delta": delta, "logprobs": lps, "finish_reason": reason}]})

    def delta(self, i: int, d) -> dict:
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = d.reasoning
            if self.mistral:
                delta["content"] = [thinking_chunk(d.reasoning)]
        if d.content:
            text = _cut_at_stop(self.sent[i] + d.content, self.options.stop)[len(self.sent[i]):]
            self.sent[i] += text
            if text and isinstance(delta.get("content"), list):
                delta["content"].append({"type": "text", "text": text})
            elif text:
                delta["content"] = text
        limit = self.plan.max_calls
        if self.mistral:  # Mistral's API sends each call whole, once its arguments are complete
            calls = [c.to_openai(self.parsers[i].tool_calls.index(c)) for c in d.tool_calls]
            calls = [c for c in calls if limit is None or c["index"] < limit]
        else:
            calls = [c for c in d.tool_call_deltas if limit is None or c["index"] < limit]
        if calls:
            delta["tool_calls"] = calls
        return delta

    async def run(self):
        try:
            for i in range(len(self.rids)):
                yield self.chunk(i, {"role": "assistant", "content": ""})
            while not all(self.finals):
                i, out = await self.events.get()
                parser = self.parsers[i]
                deltas = [parser.push(t) for t in out.token_ids]
                if out.finished:
                    deltas.append(parser.finish())
                for d in deltas:
                    delta = self.delta(i, d)
                    lps = self.server.chat_logprobs(out.logprobs) if out.logprobs and d is deltas[0] else None
                    if delta or lps:
                        yield self.chunk(i, delta, lps=lps)
                if out.finished:
                    self.finals[i] = out
                    if out.finish_reason == "error":  # this request only; the others running go on
                        yield sse(_error_body(f"generation failed: {out.error}", "server_error", code=500))
                        self.server.cancel_all(self.rids)
                        yield "data: [DONE]\n\n"
                        return
                    if self.plan.max_calls is not None:
                        del parser.tool_calls[self.plan.max_calls:]
                    yield self.chunk(i, {}, chat_finish_reason(out, parser))
            if self.include_usage:
                yield sse({**self.head, "choices": [], "usage": self.server.usage(self.finals)})
            yield "data: [DONE]\n\n"
        finally:
            if not all(self.finals):  # the client went away (or the server is stopping)
                self.server.cancel_all(self.rids)


def build_app(server: Server):
    """The FastAPI application for `server`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from infer.engine.engine import RequestOutput

    app = FastAPI(title="small4-jax", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(_AuthAndCount, server=server)

    @app.exception_handler(HTTPError)
    async def http_error(_request, e: HTTPError):
        return JSONResponse(_error_body(e.message, e.kind, e.param, e.status), status_code=e.status)

    async def parse(request: Request, schema):
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the body must be a JSON object")
        unknown = [k for k in data if k not in schema.model_fields]
        if unknown:
            raise HTTPError(400, f"unsupported parameter {unknown[0]!r}: this server does not implement it",
                            param=unknown[0])
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            loc = e.errors()[0]["loc"] if e.errors() else ()
            raise HTTPError(400, _validation_message(e), param=str(loc[0]) if loc else None) from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's tokenizer endpoints (/tokenizer_info, /tokenize, /detokenize), which lm-eval's `local-completions`
        uses to tokenise on the server (`tokenizer_backend=remote`), so it needs no tokenizer download."""
        tok = server.need_tokenizer()
        return {"eos_token": tok.decode([tok.eos_id], skip_special=False),
                "bos_token": tok.decode([tok.bos_id], skip_special=False),
                "pad_token": None, "tokenizer_class": type(tok).__name__,
                "model_max_length": server.engine.max_model_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, _Tokenize)
        tok = server.need_tokenizer()
        try:
            ids = [tok.token_id(body.prompt)]  # a special token's piece is that token, as vLLM's tokenizers read it
        except Small4Error:
            ids = tok.encode(body.prompt, bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, _Detokenize)
        tok = server.need_tokenizer()
        bad = [t for t in body.tokens if not 0 <= t < server.engine.config.vocab_size]
        if bad:
            raise HTTPError(400, f"tokens {bad[:5]} are outside the vocabulary", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/v1/models")
    async def models():
        m = {"id": server.model_name, "object": "model", "created": int(server.started), "owned_by": "small4-jax",
             "max_model_len": server.engine.max_model_len}
        loras = [{"id": a.name, "object": "model", "created": int(server.started), "owned_by": "small4-jax",
                  "parent": server.model_name, "root": a.path, "max_model_len": server.engine.max_model_len}
                 for a in sorted(server.adapters().values(), key=lambda a: a.slot)]
        return {"object": "list", "data": [m, *loras]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """{"lora_name": NAME, "lora_path": DIR}: load a PEFT adapter (behind the API key, like all of /v1)."""
        body = await parse(request, _LoadLoRA)
        try:
            await asyncio.to_thread(server.engine.load_adapter, body.lora_name, body.lora_path)
        except Small4Error as e:
            raise HTTPError(400, str(e), param="lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": True}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        """{"lora_name": NAME}: unload an adapter no request is using."""
        body = await parse(request, _UnloadLoRA)
        try:
            await asyncio.to_thread(server.engine.unload_adapter, body.lora_name)
        except Small4Error as e:
            raise HTTPError(400, str(e), param="lora_name") from None
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": False}

    cancel_all = server.cancel_all

    async def watch_disconnect(request: Request, rids: list[str], done: asyncio.Event):
        while not done.is_set():
            if await request.is_disconnected():
                cancel_all(rids)
                return
            await asyncio.sleep(0.1)

    async def final_outputs(request: Request, rids: list[str], events: asyncio.Queue) -> list[list[RequestOutput]]:
        """Every choice's events, once all are finished."""
        done = asyncio.Event()
        watcher = asyncio.create_task(watch_disconnect(request, rids, done))
        parts: list[list[RequestOutput]] = [[] for _ in rids]
        left = len(rids)
        try:
            while left:
                i, out = await events.get()
                parts[i].append(out)
                left -= out.finished
            return parts
        finally:
            done.set()
            watcher.cancel()
            if left:
                cancel_all(rids)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        mistral = is_mistral_sdk(request.headers.get("user-agent", ""))  # thinking as content chunks, for it
        plan = server.plan_chat(req)
        options = server.options(req, len(plan.prompt.ids), plan.logprobs, plan.grammar, detokenize=False)
        rids, events = server.submit(plan.prompt.ids, options, req.n, req.cache_salt, plan.prompt.images,
                                     plan.prompt.image_hashes, adapter=server.adapter_for(req.model))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if not req.stream:
            parts = await final_outputs(request, rids, events)
            finals = [p[-1] for p in parts]
            check_errors(finals)
            choices = []
            for i, choice_parts in enumerate(parts):
                parser = plan.parse([t for p in choice_parts for t in p.token_ids])
                lps = ([lp for p in choice_parts if p.logprobs for lp in p.logprobs] if plan.logprobs is not None
                       else None)
                choices.append({"index": i, "message": chat_message(parser, options.stop, mistral),
                                "logprobs": server.chat_logprobs(lps),
                                "finish_reason": chat_finish_reason(finals[i], parser)})
            return {"id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
                    "choices": choices, "usage": server.usage(finals)}

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
        stream = ChatStream(server, plan, options, rids, events, head, include_usage, mistral)
        return StreamingResponse(stream.run(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompts = server.completion_prompts(req)
        with_prompt_lps = req.echo and req.logprobs is not None
        if req.max_tokens == 0 and not req.echo:
            raise HTTPError(400, "max_tokens must be positive (0 only with echo), got 0", param="max_tokens")
        # the text is decoded here, on the event loop, not on the engine's thread (`_completion_text`)
        options = [server.options(req, len(p), req.logprobs, detokenize=False,
                                   prompt_logprobs=req.logprobs if with_prompt_lps else None) for p in prompts]
        events: asyncio.Queue = asyncio.Queue()
        rids: list[str] = []
        if req.max_tokens != 0 or with_prompt_lps:  # (echo alone with max_tokens 0 runs nothing)
            try:
                for k, (prompt, opts) in enumerate(zip(prompts, options)):
                    rids += server.submit(prompt, opts, req.n, req.cache_salt, adapter=server.adapter_for(req.model),
                                          events=events, first=k * req.n)[0]
            except HTTPError:
                cancel_all(rids)
                raise
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echoes = [server.tokenizer.decode(p) if req.echo and server.tokenizer is not None else "" for p in prompts
                  for _ in range(req.n)]
        head = {"id": cid, "object": "text_completion", "created": created, "model": server.model_name}
        if not rids:  # echo only
            choices = [{"index": i, "text": e, "logprobs": None, "finish_reason": "length"}
                       for i, e in enumerate(echoes)]
            n_prompt = sum(len(p) for p in prompts) * req.n
            return {**head, "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0,
                                                          "total_tokens": n_prompt}}
        if not req.stream:
            parts = await final_outputs(request, rids, events)
            finals = [p[-1] for p in parts]
            check_errors(finals)
            choices = []
            for i, choice_parts in enumerate(parts):
                text = _completion_text(server.tokenizer, options[i // req.n])
                choices.append({"index": i, "text": echoes[i] + "".join(text(p) for p in choice_parts),
                                "token_ids": [t for p in choice_parts for t in p.token_ids],
                                "logprobs": server.completion_logprobs(choice_parts, req.logprobs, req.echo,
                                                                      prompts[i // req.n]),
                                "finish_reason": reason_of(finals[i])})
            return {**head, "choices": choices, "usage": server.usage(finals, req.n)}

        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def stream():
            finals: list[RequestOutput | None] = [None] * len(rids)
            texts = [_completion_text(server.tokenizer, options[i // req.n]) for i in range(len(rids))]

            def chunk(i, text, reason=None, lps=None):
                return sse({**head, "choices": [{"index": i, "text": text, "logprobs": lps, "finish_reason": reason}]})

            try:
                if req.echo and not with_prompt_lps:
                    for i in range(len(rids)):
                        yield chunk(i, echoes[i])
                while not all(finals):
                    i, out = await events.get()
                    text = texts[i](out)
                    if out.prompt_logprobs is not None:
                        text = echoes[i] + text
                    lps = server.completion_logprobs([out], req.logprobs, req.echo, prompts[i // req.n])
                    if text or (lps and lps["tokens"]):
                        yield chunk(i, text, lps=lps)
                    if out.finished:
                        finals[i] = out
                        yield chunk(i, "", reason_of(out))
                if include_usage:
                    yield sse({**head, "choices": [], "usage": server.usage(finals, req.n)})
                yield "data: [DONE]\n\n"
            finally:
                if not all(finals):
                    cancel_all(rids)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def _completion_text(tokenizer, options):
    """A function from one completion choice's events, in order, to their new text, decoded on the caller's thread
    (the event loop): the engine sends ids only (`detokenize=False`). With stop strings the engine does decode (it
    must see the text to stop on it, and holds back what may start one), so its text is used as it comes."""
    if tokenizer is None or options.stop:
        return lambda out: out.text
    decoder = tokenizer.stream_decoder()

    def text(out: "RequestOutput") -> str:
        new = "".join(decoder.push(t) for t in out.token_ids)
        if out.finished and out.finish_reason in ("stop", "length"):  # as the engine: no flush on cancel / error
            new += decoder.flush()
        return new

    return text


_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/tokenizer_info")
_KEYED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # behind --api-key


class _AuthAndCount:
    """ASGI middleware: the API key check on /v1/* and the HTTP counters for /metrics.

    A plain ASGI class rather than `@app.middleware("http")`: that wrapper hides the client's disconnect from
    `Request.is_disconnected()`, which the non-streaming endpoints poll to cancel abandoned requests.
    """

    def __init__(self, app, server: "Server"):
        self.app = app
        self.server = server

    def _count(self, path: str, status: int) -> None:
        key = (path if path in _PATHS else "other", status)
        self.server.http_counts[key] = self.server.http_counts.get(key, 0) + 1

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        path = scope["path"]
        key = self.server.api_key
        if key is not None and path.startswith(_KEYED):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                body = _error_body("invalid or missing API key", "authentication_error", code=401)
                await JSONResponse(body, status_code=401)(scope, receive, send)
                self._count(path, 401)
                return
        status = [500]

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._count(path, status[0])


def _cut_at_stop(text: str, stops) -> str:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


# ---- running it ------------------------------------------------------------------------------------------------------
class Running:
    """A server running on a background thread (for tests and embedding): `.url`, `.stop()`."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        import socket
        import threading

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.server = server
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(build_app(server), host=host, port=port, log_level="warning", lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        server.engine.start()
        self._thread = threading.Thread(target=self._uvicorn.run, name="small4-http", daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._uvicorn.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.server.engine.stop()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML preset (random weights from --seed), e.g. configs/tiny.yaml")
    src.add_argument("--checkpoint", help="checkpoint directory (HF config.json or native params.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the checkpoint's; with --config, the "
                                       "bundled tiny tekken.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", help="model id reported by /v1/models (default: the path)")
    p.add_argument("--dtype", default=None, help="parameter dtype (default as infer.generate)")
    p.add_argument("--seed", type=int, default=0, help="random init with --config")
    p.add_argument("--mesh", help="device mesh, e.g. data=1,expert=8,tensor=1 (default: one device)")
    p.add_argument("--image-dir", help="let image parts name local files inside this directory (default: images come "
                   "only as data: URLs; nothing is ever fetched from the network)")
    p.add_argument("--lora", action="append", dest="lora_adapters", metavar="NAME=DIR",
                   help="serve a PEFT LoRA adapter as model NAME (repeatable; see --max-loras, --max-lora-rank)")
    p.add_argument("--reasoning-effort-map", metavar="CLIENT=MODEL,...",
                   help="how clients' reasoning_effort values the model does not know map onto its own (default "
                        "minimal=none,low=high,medium=high,xhigh=high,max=high; Small 4 knows none and high)")
    p.add_argument("--reasoning-effort-default", metavar="EFFORT",
                   help="the effort of a request that sends none or 'auto' (default: the model's own, none)")
    add_engine_args(p)
    return p.parse_args(argv)





def check_address(host: str, port: int) -> None:
    """InputError unless host:port can be bound (as uvicorn will, with SO_REUSEADDR)."""
    import socket

    if not 0 <= port < 65536:
        raise InputError(f"--port {port}: expected 0-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InputError(f"--host {host}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
            raise InputError(f"--port {port}: {host}:{port} {reason}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from infer.engine.engine import Engine

    from small4_jax.console import setup_logging

    setup_logging()  # our lines only: no library INFO chatter (absl, jax backends)
    try:
        from small4_jax.parallel import distributed

        # Several processes (launch/): process 0 serves HTTP, every process runs the engine in lockstep.
        spec = distributed.initialize()
        multi = spec.multi_process
        if spec.process_id == 0:
            check_address(args.host, args.port)  # a taken port is said now, not after the model build
        if args.image_dir is not None and not os.path.isdir(args.image_dir):
            raise InputError(f"--image-dir {args.image_dir}: not a directory")
        reasoning = ReasoningPolicy.parse(args.reasoning_effort_map, args.reasoning_effort_default)
        model, tokenizer, mesh = load_model_and_tokenizer(args)
        if multi:
            from infer.server.lockstep import LockstepEngine

            engine = LockstepEngine(model, tokenizer, mesh=mesh, **engine_kwargs(args))
        else:
            engine = Engine(model, tokenizer, mesh=mesh, **engine_kwargs(args))
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # (the engine logged its cache report when it was built: once is enough)
    if args.warmup:  # on every process: the same programs in the same order, as the lockstep steps
        engine.warmup(progress=lambda line: print(line, file=sys.stderr, flush=True))
    if multi and not engine.leader:
        engine.follow()
        return 0
    if args.warmup:  # the structured-output tables too, so the first such request does not wait for them
        from infer.structured import prepare

        print(prepare(tokenizer), file=sys.stderr, flush=True)
    server = Server(engine, tokenizer, args.served_model_name or args.config or args.checkpoint, args.api_key,
                    image_dir=args.image_dir, reasoning=reasoning)
    engine.start()
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
