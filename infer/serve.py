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

The engine runs on its own thread; each request's events cross to the event loop through an asyncio queue. The
server itself is the package `infer/server/` (schemas, core, routes_chat, routes_completions, routes_admin, http,
metrics, app); this module is its command line.
"""

import argparse
import errno
import os
import sys

from infer.chat import ReasoningPolicy
from infer.cli import add_engine_args, engine_kwargs, load_model_and_tokenizer
from small4_jax.console import cli_main, on_interrupt
from small4_jax.errors import InputError, Small4Error

# The server (infer/server/: schemas, core, routes_*, http, metrics, app) and the engine (and so JAX) are imported
# where they are used, so `--help` answers without loading JAX.


def __getattr__(name: str):
    """`from infer.serve import Server, Running, build_app` (tests, benchmarks, embedding): the server package's,
    imported on first use."""
    if name in ("Running", "build_app"):
        from infer.server import app

        return getattr(app, name)
    if name == "Server":
        from infer.server.core import Server

        return Server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    on_interrupt(lambda: "the server stopped; it keeps nothing between runs")
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
    from infer.server.app import build_app
    from infer.server.core import Server

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
