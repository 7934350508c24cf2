"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    python -m infer.serve --config configs/tiny.yaml                      # random tiny model, bundled tokenizer
    python -m infer.serve --checkpoint /models/Mistral-Small-4 --port 8000 --api-key "$KEY"

Endpoints: POST /v1/chat/completions (streaming and not; tools, tool_choice, reasoning_effort; reasoning comes back
as `reasoning_content`), POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus text).
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
from infer.chat import ChatParser, encode_chat
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
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the operator's logs; it changes nothing
    cache_salt: str | None = None  # a tenant's prefix-cache salt: requests share cached pages only with the same salt


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: Literal["none", "high"] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
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
                 image_dir: str | None = None):
        self.engine = engine
        self.image_dir = image_dir  # image parts may name files under it (None: data: URLs only)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_names = {model_name}  # what a request's `model` may say
        self.api_key = api_key
        self.started = time.time()
        self.http_counts: dict[tuple[str, int], int] = {}

    # -- validation --
    def options(self, req: _Common, prompt_len: int, logprobs: int | None, grammar: str | None = None,
                detokenize: bool = True) -> "SamplingOptions":
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
        elif max_tokens <= 0:
            raise HTTPError(400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens")
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
        try:
            return SamplingOptions(
                max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                min_p=req.min_p, seed=req.seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos, logprobs=logprobs, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, logit_bias=bias,
                grammar=grammar, detokenize=detokenize,
            )
        except InputError as e:
            raise HTTPError(400, str(e)) from None

    def adapters(self) -> dict:
        """The LoRA adapters served (name -> adapter), selected by a request's `model` (small4_jax/lora/multi.py)."""
        lora = getattr(self.engine, "lora", None)
        return {} if lora is None else dict(lora.adapters)

    def adapter_for(self, model: str | None) -> str | None:
        return model if model is not None and model not in self.model_names and model in self.adapters() else None

    def submit(self, prompt: list[int], options: "SamplingOptions", n: int = 1, cache_salt: str | None = None,
               images=(), image_hashes=(), adapter: str | None = None):
        """Queue the n choices of a request; returns (their engine ids, asyncio queue of (choice, RequestOutput)).

        Choices after the first are admitted once the first has cached its prompt pages (`Engine.submit(after=)`),
        so the prompt is computed once; a seeded request gives choice i the seed seed + i."""
        from infer.engine.engine import QueueFull

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rids: list[str] = []
        base = f"r-{uuid.uuid4().hex[:16]}"
        try:
            for i in range(n):
                opts = options
                if i and options.seed is not None:
                    opts = dataclasses.replace(options, seed=(options.seed + i) % 2**32)

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

    def completion_logprobs(self, lps) -> dict | None:
        if lps is None:
            return None
        return {
            "tokens": [self.token_str(x.token_id) for x in lps],
            "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [self._top_dict(x.top) for x in lps],
        }

    def _top_dict(self, top) -> dict:
        out: dict[str, float] = {}
        for a, b in top:  # most likely first; tokens that print alike keep the larger logprob
            out.setdefault(self.token_str(a), b)
        return out

    @staticmethod
    def usage(outs: list["RequestOutput"]) -> dict:
        """Usage of a request from its choices' final events (the prompt counted once)."""
        prompt, completion = outs[0].prompt_tokens, sum(o.completion_tokens for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": outs[0].cached_tokens}}

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
            raise HTTPError(400, _validation_message(e)) from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

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

    def cancel_all(rids):
        for rid in rids:
            server.engine.cancel(rid)

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

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def reason_of(out: RequestOutput) -> str:
        return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"

    def check_errors(finals: list[RequestOutput]) -> None:
        for out in finals:
            if out.finish_reason == "error":
                raise HTTPError(500, f"generation failed: {out.error}", kind="server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        if server.tokenizer is None:
            raise HTTPError(400, "this server has no tokenizer: chat is unavailable")
        forced_tools = req.tool_choice == "required" or isinstance(req.tool_choice, dict)
        grammar = None
        try:
            use_grammar = (req.response_format not in (None, {"type": "text"})
                           or (forced_tools and structured.available(server.tokenizer)))
            prompt = encode_chat(server.tokenizer, req.messages, tools=req.tools, tool_choice=req.tool_choice,
                                 reasoning_effort=req.reasoning_effort, force_prefix=not use_grammar,
                                 image_dir=server.image_dir)
        except InputError as e:
            msg = str(e)
            param = "tools" if msg.startswith("tools") else msg.split(":")[0] if msg.startswith("messages[") \
                else "messages"  # an image part's error names it: messages[i].content[j]
            raise HTTPError(400, msg, param=param) from None
        if use_grammar:
            try:
                grammar = structured.chat_grammar(
                    server.tokenizer, req.messages, tools=req.tools, tool_choice=req.tool_choice,
                    response_format=req.response_format, parallel_tool_calls=req.parallel_tool_calls,
                    reasoning=req.reasoning_effort == "high")
            except InputError as e:
                raise HTTPError(400, str(e), param="response_format") from None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # the chat parser decodes the ids (once, on this event loop, not on the engine's thread)
        options = server.options(req, len(prompt.ids), logprobs, grammar, detokenize=False)
        parse_tools = req.tool_choice != "none" and bool(req.tools)
        rids, events = server.submit(prompt.ids, options, req.n, req.cache_salt, prompt.images, prompt.image_hashes,
                                     adapter=server.adapter_for(req.model))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def new_parser():
            parser = ChatParser(server.tokenizer, parse_tools=parse_tools)
            for t in prompt.forced:
                parser.push(t)
            return parser

        def finish_reason(out: RequestOutput, parser: ChatParser) -> str:
            if out.finish_reason == "stop" and parser.tool_calls:
                return "tool_calls"
            return reason_of(out)

        if not req.stream:
            parts = await final_outputs(request, rids, events)
            finals = [p[-1] for p in parts]
            check_errors(finals)
            choices = []
            for i, choice_parts in enumerate(parts):
                parser = new_parser()
                for p in choice_parts:
                    for t in p.token_ids:
                        parser.push(t)
                parser.finish()
                content = _cut_at_stop(parser.content, options.stop)
                message = {"role": "assistant", "content": content if content or not parser.tool_calls else None}
                if parser.reasoning:
                    message["reasoning_content"] = parser.reasoning
                if parser.tool_calls:
                    message["tool_calls"] = [c.to_openai() for c in parser.tool_calls]
                lps = [lp for p in choice_parts if p.logprobs for lp in p.logprobs] if logprobs is not None else None
                choices.append({"index": i, "message": message, "logprobs": server.chat_logprobs(lps),
                                "finish_reason": finish_reason(finals[i], parser)})
            return {"id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
                    "choices": choices, "usage": server.usage(finals)}

        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def stream():
            parsers = [new_parser() for _ in rids]
            sent = [""] * len(rids)  # content sent so far per choice, to cut at stop strings
            n_calls = [0] * len(rids)
            finals: list[RequestOutput | None] = [None] * len(rids)

            def chunk(i, delta, reason=None, lps=None):
                return sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": server.model_name,
                            "choices": [{"index": i, "delta": delta, "logprobs": lps, "finish_reason": reason}]})

            try:
                for i in range(len(rids)):
                    yield chunk(i, {"role": "assistant", "content": ""})
                while not all(finals):
                    i, out = await events.get()
                    parser = parsers[i]
                    deltas = [parser.push(t) for t in out.token_ids]
                    if out.finished:
                        deltas.append(parser.finish())
                    for d in deltas:
                        delta = {}
                        if d.reasoning:
                            delta["reasoning_content"] = d.reasoning
                        if d.content:
                            text = _cut_at_stop(sent[i] + d.content, options.stop)[len(sent[i]):]
                            sent[i] += text
                            if text:
                                delta["content"] = text
                        if d.tool_calls:
                            delta["tool_calls"] = [c.to_openai(n_calls[i] + k) for k, c in enumerate(d.tool_calls)]
                            n_calls[i] += len(d.tool_calls)
                        lps = server.chat_logprobs(out.logprobs) if out.logprobs and d is deltas[0] else None
                        if delta or lps:
                            yield chunk(i, delta, lps=lps)
                    if out.finished:
                        finals[i] = out
                        if out.finish_reason == "error":
                            yield sse(_error_body(f"generation failed: {out.error}", "server_error", code=500))
                            cancel_all(rids)
                            yield "data: [DONE]\n\n"
                            return
                        yield chunk(i, {}, finish_reason(out, parser))
                if include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": server.model_name, "choices": [], "usage": server.usage(finals)})
                yield "data: [DONE]\n\n"
            finally:
                if not all(finals):  # the client went away (or the server is stopping)
                    cancel_all(rids)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        if isinstance(req.prompt, str):
            if not req.prompt:  # BOS alone is not a prompt
                raise HTTPError(400, "empty prompt", param="prompt")
            if server.tokenizer is None:
                raise HTTPError(400, "this server has no tokenizer: give the prompt as token ids", param="prompt")
            prompt = server.tokenizer.encode(req.prompt, bos=True)
        elif req.prompt and all(isinstance(t, int) for t in req.prompt):
            prompt = list(req.prompt)
        else:
            raise HTTPError(400, "prompt must be a string or a non-empty list of token ids (one prompt)",
                            param="prompt")
        if not prompt:
            raise HTTPError(400, "empty prompt", param="prompt")
        # the text is decoded here, on the event loop, not on the engine's thread (`_completion_text`)
        options = server.options(req, len(prompt), req.logprobs, detokenize=False)
        rids, events = server.submit(prompt, options, req.n, req.cache_salt, adapter=server.adapter_for(req.model))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = server.tokenizer.decode(prompt) if req.echo and server.tokenizer is not None else ""

        if not req.stream:
            parts = await final_outputs(request, rids, events)
            finals = [p[-1] for p in parts]
            check_errors(finals)
            choices = []
            for i, choice_parts in enumerate(parts):
                lps = ([lp for p in choice_parts if p.logprobs for lp in p.logprobs] if req.logprobs is not None
                       else None)
                text = _completion_text(server.tokenizer, options)
                choices.append({"index": i, "text": echo + "".join(text(p) for p in choice_parts),
                                "token_ids": [t for p in choice_parts for t in p.token_ids],
                                "logprobs": server.completion_logprobs(lps), "finish_reason": reason_of(finals[i])})
            return {"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": choices, "usage": server.usage(finals)}

        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def stream():
            finals: list[RequestOutput | None] = [None] * len(rids)
            texts = [_completion_text(server.tokenizer, options) for _ in rids]

            def chunk(i, text, reason=None, lps=None):
                return sse({"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                            "choices": [{"index": i, "text": text, "logprobs": lps, "finish_reason": reason}]})

            try:
                if echo:
                    for i in range(len(rids)):
                        yield chunk(i, echo)
                while not all(finals):
                    i, out = await events.get()
                    text = texts[i](out)
                    if text or out.logprobs:
                        yield chunk(i, text, lps=server.completion_logprobs(out.logprobs))
                    if out.finished:
                        finals[i] = out
                        yield chunk(i, "", reason_of(out))
                if include_usage:
                    yield sse({"id": cid, "object": "text_completion", "created": created,
                               "model": server.model_name, "choices": [], "usage": server.usage(finals)})
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


_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


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
        if key is not None and path.startswith("/v1/"):
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
                    image_dir=args.image_dir)
    engine.start()
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
