"""The small routes: /health, /metrics, /v1/models, LoRA adapters at run time, and vLLM's tokenizer endpoints."""

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from infer.server.core import Server
from infer.server.http import parse
from infer.server.metrics import metrics_text
from infer.server.schemas import DetokenizeRequest, HTTPError, LoadLoRA, TokenizeRequest, UnloadLoRA
from small4_jax.errors import Small4Error


def register(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(server), media_type="text/plain; version=0.0.4")

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
        body = await parse(request, LoadLoRA)
        try:
            await asyncio.to_thread(server.engine.load_adapter, body.lora_name, body.lora_path)
        except Small4Error as e:
            raise HTTPError(400, str(e), param="lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": True}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        """{"lora_name": NAME}: unload an adapter no request is using."""
        body = await parse(request, UnloadLoRA)
        try:
            await asyncio.to_thread(server.engine.unload_adapter, body.lora_name)
        except Small4Error as e:
            raise HTTPError(400, str(e), param="lora_name") from None
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": False}

    register_tokenizer(app, server)


def register_tokenizer(app: FastAPI, server: Server) -> None:
    """vLLM's tokenizer endpoints (/tokenizer_info, /tokenize, /detokenize), which lm-eval's `local-completions` uses
    to tokenise on the server (`tokenizer_backend=remote`), so it needs no tokenizer download."""

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = server.need_tokenizer()
        return {"eos_token": tok.decode([tok.eos_id], skip_special=False),
                "bos_token": tok.decode([tok.bos_id], skip_special=False),
                "pad_token": None, "tokenizer_class": type(tok).__name__,
                "model_max_length": server.engine.max_model_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest)
        tok = server.need_tokenizer()
        try:
            ids = [tok.token_id(body.prompt)]  # a special token's piece is that token, as vLLM's tokenizers read it
        except Small4Error:
            ids = tok.encode(body.prompt, bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest)
        tok = server.need_tokenizer()
        bad = [t for t in body.tokens if not 0 <= t < server.engine.config.vocab_size]
        if bad:
            raise HTTPError(400, f"tokens {bad[:5]} are outside the vocabulary", param="tokens")
        return {"prompt": tok.decode(body.tokens)}
