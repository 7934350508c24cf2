"""What every route shares: the body parser (a 400 naming the problem), waiting for a request's choices (a client that
goes away cancels them), and the ASGI middleware for the API key and the HTTP counters."""

import asyncio
import json
import math

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from infer.engine.engine import RequestOutput
from infer.server.core import Server
from infer.server.schemas import HTTPError, error_body, validation_message


def _non_finite(name: str):
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or infinity)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is out of the range of a 64-bit float")
    return x


async def parse(request: Request, schema):
    """The request's JSON body as `schema`; HTTPError 400 for bad JSON, an unknown field or a bad value (naming it)."""
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_non_finite, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise HTTPError(400, "the body is not valid JSON here: it nests deeper than the parser's limit") from None
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
        raise HTTPError(400, validation_message(e), param=str(loc[0]) if loc else None) from None


async def watch_disconnect(server: Server, request: Request, rids: list[str], done: asyncio.Event):
    while not done.is_set():
        if await request.is_disconnected():
            server.cancel_all(rids)
            return
        await asyncio.sleep(0.1)


async def final_outputs(server: Server, request: Request, rids: list[str],
                        events: asyncio.Queue) -> list[list[RequestOutput]]:
    """Every choice's events, once all are finished."""
    done = asyncio.Event()
    watcher = asyncio.create_task(watch_disconnect(server, request, rids, done))
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
            server.cancel_all(rids)


_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/tokenizer_info")
_KEYED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # behind --api-key


class AuthAndCount:
    """ASGI middleware: the API key check on /v1/* and the HTTP counters for /metrics.

    A plain ASGI class rather than `@app.middleware("http")`: that wrapper hides the client's disconnect from
    `Request.is_disconnected()`, which the non-streaming endpoints poll to cancel abandoned requests.
    """

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    def _count(self, path: str, status: int) -> None:
        key = (path if path in _PATHS else "other", status)
        self.server.http_counts[key] = self.server.http_counts.get(key, 0) + 1

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        key = self.server.api_key
        if key is not None and path.startswith(_KEYED):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                body = error_body("invalid or missing API key", "authentication_error", code=401)
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
