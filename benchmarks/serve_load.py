"""A bounded load test of `infer.serve`: N streaming chat requests, at most C in flight, through the openai client.

    python benchmarks/serve_load.py                          # starts the tiny random model in-process (CPU is fine)
    python benchmarks/serve_load.py --small                  # the CPU smoke run: 16 requests, 4 in flight
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --requests 512 --concurrency 64

Reports (one JSON object): requests ok / failed, wall time, output tokens/s, requests/s, time to first token and
end-to-end latency percentiles (p50, p95, max), and from the server's /metrics the engine's host time per step
(scheduling, inputs, sampling settings and outputs, i.e. everything but waiting for the device) and, with
--json-schema, the structured-output mask cost per masked token. Every request has a deadline (--timeout), so the
run is bounded.
Compilation is outside the timing: a round of `concurrency` untimed requests, shaped like the timed ones, runs first
(it compiles the shapes the timed requests use, in-process or on a remote server). Time to first token is to the
first chunk carrying generated text (or reasoning), not the empty role chunk the stream opens with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _start_tiny(max_batch: int, warmup: bool = False):
    from infer.engine.engine import Engine
    from infer.serve import Running, Server
    from small4_jax.config import Small4Config
    from small4_jax.nn.model import init_model
    from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

    repo = Path(__file__).resolve().parent.parent
    model = init_model(Small4Config.from_yaml(repo / "configs" / "tiny.yaml"), seed=0)
    tok = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    engine = Engine(model, tok, max_batch=max_batch, page_size=16, max_model_len=512, prefill_chunk=64,
                    batch_buckets=(max_batch,), page_buckets=(8, 32))
    if warmup:  # compile every shape first, so host time per step is not compile time
        engine.warmup()
    return Running(Server(engine, tok, "tiny"))


def _pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 30},
                                          "tags": {"type": "array", "items": {"enum": ["sun", "rain", "snow"]},
                                                   "maxItems": 3}},
          "required": ["city", "days", "tags"], "additionalProperties": False}


def _metrics(url, api_key) -> dict:
    import urllib.request

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {api_key or ''}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return {k: float(v) for k, v in (line.split()[:2] for line in lines if line.startswith("small4_") and " " in line)
            if "{" not in k}


async def _load(url, api_key, model, n, concurrency, max_tokens, timeout, json_schema=False):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=timeout)
    gate = asyncio.Semaphore(concurrency)
    ttft, latency, tokens, failures = [], [], [0], []

    async def one(i):
        async with gate:
            t0 = time.perf_counter()
            first = None
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"request {i}: what is the weather?"}],
                    max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                    **({"response_format": {"type": "json_schema", "json_schema": {
                        "name": "trip", "schema": SCHEMA, "strict": True}}} if json_schema else {}))
                async for chunk in stream:
                    delta = chunk.choices[0].delta if chunk.choices else None
                    if first is None and delta is not None and (
                            delta.content or getattr(delta, "reasoning_content", None) or delta.tool_calls):
                        first = time.perf_counter() - t0  # the first generated token, not the role chunk
                    if chunk.usage is not None:
                        tokens[0] += chunk.usage.completion_tokens
            except Exception as e:  # counted, not raised: a load test reports failures
                failures.append(f"{type(e).__name__}: {e}"[:200])
                return
            ttft.append(first or 0.0)
            latency.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(-1 - i) for i in range(min(concurrency, n))))  # warm-up round, untimed
    ttft.clear(), latency.clear(), failures.clear()
    tokens[0] = 0
    before = _metrics(url, api_key)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    after = _metrics(url, api_key)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = delta.get("small4_engine_steps_total", 0)
    masked = delta.get("small4_structured_masked_tokens_total", 0)
    engine = dict(
        engine_steps=int(steps),
        host_ms_per_step=1e3 * delta.get("small4_engine_host_seconds_total", 0) / steps if steps else None,
        mask_us_per_token=1e6 * delta.get("small4_structured_mask_seconds_total", 0) / masked if masked else None)
    return dict(**engine, requests=n, ok=len(latency), failed=len(failures), concurrency=concurrency, wall_s=wall,
                output_tokens=tokens[0], output_tokens_per_s=tokens[0] / wall, requests_per_s=len(latency) / wall,
                ttft_p50_s=_pct(ttft, 0.5), ttft_p95_s=_pct(ttft, 0.95), latency_p50_s=_pct(latency, 0.5),
                latency_p95_s=_pct(latency, 0.95), latency_max_s=max(latency) if latency else None,
                first_failures=failures[:3])


def run(url, *, api_key=None, model="tiny", requests=64, concurrency=16, max_tokens=16, timeout=120.0,
        json_schema=False, warmup=False) -> dict:
    """Run the load test against `url` (None: start the tiny model in-process); returns the report."""
    running = None
    if url is None:
        running = _start_tiny(max_batch=min(concurrency, 16), warmup=warmup)
        url = running.url
    try:
        return asyncio.run(_load(url, api_key, model, requests, concurrency, max_tokens, timeout, json_schema))
    finally:
        if running is not None:
            running.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start the tiny model in-process)")
    p.add_argument("--api-key")
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--json-schema", action="store_true", help="every request asks for a JSON-schema answer")
    p.add_argument("--small", action="store_true", help="CPU smoke run: 16 requests, 4 in flight, 8 tokens each")
    args = p.parse_args(argv)
    if args.small:
        args.requests, args.concurrency, args.max_tokens = 16, 4, 8
    result = run(args.url, api_key=args.api_key, model=args.model, requests=args.requests,
                 concurrency=args.concurrency, max_tokens=args.max_tokens, timeout=args.timeout,
                 json_schema=args.json_schema, warmup=args.url is None)
    print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
