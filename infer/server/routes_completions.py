"""POST /v1/completions: OpenAI's four prompt shapes (one set of n choices per prompt), `echo` with the prompt's
log-probabilities (lm-eval's loglikelihood requests), streaming or not."""

import asyncio
import dataclasses
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from infer.engine.engine import RequestOutput, SamplingOptions
from infer.server.core import Server, check_errors, completion_text, reason_of, sse
from infer.server.http import final_outputs, parse
from infer.server.schemas import CompletionRequest, HTTPError


@dataclasses.dataclass
class CompletionJob:
    """A completion request submitted: its prompts, per-prompt options, engine ids and event queue."""

    req: CompletionRequest
    prompts: list[list[int]]
    options: list[SamplingOptions]
    rids: list[str]
    events: asyncio.Queue
    echoes: list[str]  # per choice: the prompt's text with echo, else ""
    head: dict

    def prompt_of(self, i: int) -> list[int]:
        return self.prompts[i // self.req.n]


def submit(server: Server, req: CompletionRequest) -> CompletionJob:
    prompts = server.completion_prompts(req)
    with_prompt_lps = req.echo and req.logprobs is not None
    if req.max_tokens == 0 and not req.echo:
        raise HTTPError(400, "max_tokens must be positive (0 only with echo), got 0", param="max_tokens")
    # the text is decoded on the event loop, not on the engine's thread (`completion_text`)
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
            server.cancel_all(rids)
            raise
    echoes = [server.tokenizer.decode(p) if req.echo and server.tokenizer is not None else "" for p in prompts
              for _ in range(req.n)]
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": server.adapter_for(req.model) or server.model_name}
    return CompletionJob(req, prompts, options, rids, events, echoes, head)


def echo_only(job: CompletionJob) -> dict:
    choices = [{"index": i, "text": e, "logprobs": None, "finish_reason": "length"} for i, e in enumerate(job.echoes)]
    n_prompt = sum(len(p) for p in job.prompts) * job.req.n
    return {**job.head, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}}


async def whole(server: Server, request: Request, job: CompletionJob) -> dict:
    req = job.req
    parts = await final_outputs(server, request, job.rids, job.events)
    finals = [p[-1] for p in parts]
    check_errors(finals)
    choices = []
    for i, choice_parts in enumerate(parts):
        text = completion_text(server.tokenizer, job.options[i // req.n])
        choices.append({"index": i, "text": job.echoes[i] + "".join(text(p) for p in choice_parts),
                        "token_ids": [t for p in choice_parts for t in p.token_ids],
                        "logprobs": server.completion_logprobs(choice_parts, req.logprobs, req.echo, job.prompt_of(i)),
                        "finish_reason": reason_of(finals[i])})
    return {**job.head, "choices": choices, "usage": server.usage(finals, req.n)}


async def stream(server: Server, job: CompletionJob):
    req, rids = job.req, job.rids
    finals: list[RequestOutput | None] = [None] * len(rids)
    texts = [completion_text(server.tokenizer, job.options[i // req.n]) for i in range(len(rids))]

    def chunk(i, text, reason=None, lps=None):
        return sse({**job.head, "choices": [{"index": i, "text": text, "logprobs": lps, "finish_reason": reason}]})

    try:
        if req.echo and req.logprobs is None:  # (with logprobs the echo comes with the prompt's logprobs)
            for i in range(len(rids)):
                yield chunk(i, job.echoes[i])
        while not all(finals):
            i, out = await job.events.get()
            text = texts[i](out)
            if out.prompt_logprobs is not None:
                text = job.echoes[i] + text
            lps = server.completion_logprobs([out], req.logprobs, req.echo, job.prompt_of(i))
            if text or (lps and lps["tokens"]):
                yield chunk(i, text, lps=lps)
            if out.finished:
                finals[i] = out
                yield chunk(i, "", reason_of(out))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse({**job.head, "choices": [], "usage": server.usage(finals, req.n)})
        yield "data: [DONE]\n\n"
    finally:
        if not all(finals):
            server.cancel_all(rids)


def register(app: FastAPI, server: Server) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        job = submit(server, await parse(request, CompletionRequest))
        if not job.rids:
            return echo_only(job)
        if job.req.stream:
            return StreamingResponse(stream(server, job), media_type="text/event-stream")
        return await whole(server, request, job)
