"""POST /v1/chat/completions: OpenAI's chat API, and what Mistral's SDK expects of Mistral's (thinking chunks, whole
streamed tool calls)."""

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from infer.chat import ChatParser
from infer.engine.engine import RequestOutput
from infer.server.core import ChatPlan, Server, check_errors, cut_at_stop, reason_of, sse
from infer.server.http import final_outputs, parse
from infer.server.schemas import ChatRequest, error_body


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
    content = cut_at_stop(parser.content, stop)
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not parser.tool_calls else None}
    if parser.reasoning:
        message["reasoning_content"] = message["reasoning"] = parser.reasoning
        if mistral:
            message["content"] = [thinking_chunk(parser.reasoning), *([{"type": "text", "text": content}]
                                                                      if content else [])]
    if parser.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in parser.tool_calls]
    return message


def chat_finish_reason(out: RequestOutput, parser: ChatParser) -> str:
    if out.finish_reason == "stop" and parser.tool_calls:
        return "tool_calls"
    return reason_of(out)


class ChatStream:
    """The server-sent events of a streamed chat completion: OpenAI's chunk format (tool calls: index, id and name
    first, then argument fragments), or for Mistral's SDK thinking chunks and whole tool calls, as its API sends."""

    def __init__(self, server: Server, plan: ChatPlan, options, rids, events, head: dict, include_usage: bool,
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
            text = cut_at_stop(self.sent[i] + d.content, self.options.stop)[len(self.sent[i]):]
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
                        yield sse(error_body(f"generation failed: {out.error}", "server_error", code=500))
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


def register(app: FastAPI, server: Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        mistral = is_mistral_sdk(request.headers.get("user-agent", ""))  # thinking as content chunks, for it
        plan = server.plan_chat(req)
        options = server.options(req, len(plan.prompt.ids), plan.logprobs, plan.grammar, detokenize=False)
        rids, events = server.submit(plan.prompt.ids, options, req.n, req.cache_salt, plan.prompt.images,
                                     plan.prompt.image_hashes, adapter=server.adapter_for(req.model))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": server.adapter_for(req.model) or server.model_name}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            stream = ChatStream(server, plan, options, rids, events, head, include_usage, mistral)
            return StreamingResponse(stream.run(), media_type="text/event-stream")
        parts = await final_outputs(server, request, rids, events)
        finals = [p[-1] for p in parts]
        check_errors(finals)
        choices = []
        for i, choice_parts in enumerate(parts):
            parser = plan.parse([t for p in choice_parts for t in p.token_ids])
            lps = [lp for p in choice_parts if p.logprobs for lp in p.logprobs] if plan.logprobs is not None else None
            choices.append({"index": i, "message": chat_message(parser, options.stop, mistral),
                            "logprobs": server.chat_logprobs(lps),
                            "finish_reason": chat_finish_reason(finals[i], parser)})
        return {**head, "object": "chat.completion", "choices": choices, "usage": server.usage(finals)}
