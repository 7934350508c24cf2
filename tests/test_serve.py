"""`infer.serve` through the official `openai` client, against transformers' greedy generate.

Two servers share the module (started once, on free ports, stopped at the end):
- `real`: a tiny transformers-made checkpoint with the bundled Tekken v15 tokenizer; its outputs are compared with
  transformers' greedy `generate` on the ids mistral-common gives for the same chat.
- `scripted`: the same weights with attention and MLP outputs zeroed and an lm_head that maps each token of a fixed
  script to the next one. It always answers `[THINK]think first[/THINK]Hello[TOOL_CALLS]get_weather[ARGS]{...}</s>`,
  which exercises the reasoning and tool-call split through the real engine and server.
"""

import asyncio
import json
import time
import urllib.error
import urllib.request

import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch
from flax import nnx

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from infer.chat import encode_chat, parse_output
from infer.engine.engine import Engine
from infer.serve import Running, Server
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

KEY = "test-key"
CONTEXT = 512
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object",
                                                          "properties": {"location": {"type": "string"}}}}}]
# arguments a random model must finish: without maxLength / additionalProperties false, strings, keys and
# numbers are unbounded and random weights may still be inside one at max_tokens
BOUNDED_TOOLS = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": {
    "type": "object", "properties": {"location": {"type": "string", "maxLength": 5}}, "required": ["location"],
    "additionalProperties": False}}}]
SCRIPT = ("think first", "Hello", "get_weather", '{"location": "Rome"}')


def _engine(model, tokenizer):
    return Engine(model, tokenizer, max_batch=16, page_size=16, prefill_chunk=64, batch_buckets=(16,),
                  page_buckets=(8, 32))


def _scripted(model, tok):
    """A copy of `model` whose next token depends only on the current one, following SCRIPT after [/INST]."""
    m = nnx.clone(model)
    for layer in m.layer_stacks:  # each stack's layers at once
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            mlp.experts.down[...] = jnp.zeros_like(mlp.experts.down[...])
            mlp = mlp.shared_experts
        mlp.down_proj.kernel[...] = jnp.zeros_like(mlp.down_proj.kernel[...])
    m.norm.weight[...] = jnp.ones_like(m.norm.weight[...])
    think, name, args = SCRIPT[0], SCRIPT[2], SCRIPT[3]
    seq = [tok.token_id("[/INST]"), tok.token_id("[THINK]"), *tok.encode(think, bos=False),
           tok.token_id("[/THINK]"), *tok.encode(SCRIPT[1], bos=False), tok.token_id("[TOOL_CALLS]"),
           *tok.encode(name, bos=False), tok.token_id("[ARGS]"), *tok.encode(args, bos=False), tok.eos_id]
    assert len(set(seq)) == len(seq), "script tokens must be distinct"
    emb = np.asarray(m.embed_tokens.embedding[...])
    head = np.zeros_like(np.asarray(m.lm_head.kernel[...]))  # [H, V]
    for cur, nxt in zip(seq, seq[1:]):
        head[:, nxt] = emb[cur] / np.linalg.norm(emb[cur]) * 10
    m.lm_head.kernel[...] = jnp.asarray(head)
    return m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_hf_config(vocab_size=512, eos_token_id=2, max_position_embeddings=CONTEXT)
    hf = make_hf_model(config, seed=3)
    path = tmp_path_factory.mktemp("hf")
    save_hf(hf, path)
    model = small4_jax.from_pretrained(path, dtype="float32")
    tok = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    real = Running(Server(_engine(model, tok), tok, "tiny", api_key=KEY))
    scripted = Running(Server(_engine(_scripted(model, tok), tok), tok, "scripted"))
    try:
        yield hf, tok, real, scripted
    finally:
        real.stop()
        scripted.stop()


def _client(url, key=KEY, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, **kw)


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        seq = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=2)
    return seq[0, len(prompt):].tolist()


def _messages(i):
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i}, what is the weather?"}]


def test_chat_non_streaming_equals_transformers(setup):
    hf, tok, real, _ = setup
    client = _client(real.url)
    for effort in ("none", "high"):
        r = client.chat.completions.create(model="tiny", messages=_messages(1), max_tokens=10, temperature=0,
                                           extra_body={"reasoning_effort": effort})
        ids = encode_chat(tok, _messages(1), reasoning_effort=effort).ids
        ref = _hf_greedy(hf, ids, 10)
        assert r.choices[0].message.content == parse_output(tok, ref).content
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
        assert r.choices[0].finish_reason == ("stop" if ref[-1] == 2 else "length")
        assert r.model == "tiny" and r.object == "chat.completion"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completions_ids_text_and_logprobs(setup):
    hf, tok, real, _ = setup
    client = _client(real.url)
    prompt = tok.encode("The weather in Paris", bos=True)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    ref = _hf_greedy(hf, prompt, 8)
    assert r.choices[0].text == tok.decode(ref)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ref])).logits[0].float()
    ref_lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(ref)[:, None])[:, 0]
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs, ref_lp.numpy(), atol=1e-4)
    lps = r.choices[0].logprobs
    # greedy: the chosen token is the most likely one (tokens that print alike share a key in this format)
    assert all(1 <= len(t) <= 2 and max(t.values()) == pytest.approx(lp, abs=1e-6)
               for t, lp in zip(lps.top_logprobs, lps.token_logprobs))
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_completions_text_is_decoded_off_the_engine_thread(setup, monkeypatch):
    """Completion text is detokenised on the event loop, not the engine's thread (which decodes only to find stop
    strings); streamed and whole it equals the ids' decoding, with and without a stop string."""
    import threading

    hf, tok, real, _ = setup
    threads = []
    make = tok.stream_decoder
    monkeypatch.setattr(tok, "stream_decoder",
                        lambda **kw: threads.append(threading.current_thread().name) or make(**kw))
    client = _client(real.url)
    prompt = tok.encode("The weather in Rome", bos=True)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    ids = _hf_greedy(hf, prompt, 12)
    assert r.choices[0].text == tok.decode(ids)
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert threads and "small4-engine" not in threads, threads
    threads.clear()
    text = r.choices[0].text
    stop = next(text[k : k + 2] for k in range(len(text) // 2, len(text) - 1) if text[k : k + 2].strip())
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert "small4-engine" in threads  # stop strings need the engine to see the text


def test_64_concurrent_streams_are_each_correct(setup):
    """64 streams at once (16 distinct chats, 4 times each; some share a cached prefix) all equal transformers."""
    hf, tok, real, _ = setup
    n = 64

    async def one(client, i):
        stream = await client.chat.completions.create(model="tiny", messages=_messages(i % 16), max_tokens=8,
                                                      temperature=0, stream=True)
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=real.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(n)))
        finally:
            await client.close()

    t0 = time.time()
    results = asyncio.run(all_of_them())
    elapsed = time.time() - t0
    refs = [_hf_greedy(hf, encode_chat(tok, _messages(i)).ids, 8) for i in range(16)]
    for i, (text, reason) in enumerate(results):
        ref = refs[i % 16]
        assert text == parse_output(tok, ref).content, i
        assert reason == ("stop" if ref[-1] == 2 else "length"), i
    assert elapsed < 120


def test_reasoning_and_tool_calls_split(setup):
    _, _, _, scripted = setup
    client = _client(scripted.url)
    msgs = [{"role": "user", "content": "weather in rome?"}]
    r = client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=40, temperature=0,
                                       extra_body={"reasoning_effort": "high"})
    msg = r.choices[0].message
    assert msg.reasoning_content == SCRIPT[0]
    assert msg.content == SCRIPT[1]
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = msg.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Rome"}
    assert len(call.id) == 9 and call.id.isalnum() and call.type == "function"
    # streamed: the same split
    stream = client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=40,
                                            temperature=0, stream=True)
    reasoning, content, calls, reason = "", "", [], None
    for chunk in stream:
        d = chunk.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        calls += d.tool_calls or []
        reason = chunk.choices[0].finish_reason or reason
    assert (reasoning, content, reason) == (SCRIPT[0], SCRIPT[1], "tool_calls")
    # OpenAI's form: id and name first, then argument fragments (tests/test_clients.py checks them in detail)
    assert calls[0].function.name == "get_weather" and calls[0].index == 0 and len(calls[0].id) == 9
    assert "".join(c.function.arguments for c in calls) == SCRIPT[3] and {c.index for c in calls} == {0}
    # tool_choice "none": no tools in the prompt, no parsing: the call text stays content
    r = client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, tool_choice="none",
                                       max_tokens=40, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == SCRIPT[1] + SCRIPT[2] + SCRIPT[3]


def test_named_tool_choice_forces_the_call(setup):
    _, _, real, _ = setup
    r = _client(real.url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], tools=BOUNDED_TOOLS, max_tokens=60,
        temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False)
    # the grammar forced one whole call, name generated (random weights: bounded arguments, so it must end)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    for call in r.choices[0].message.tool_calls:
        assert call.function.name == "get_weather" and len(call.id) == 9
        assert set(json.loads(call.function.arguments)) <= {"location"}


def _raw(url, body: bytes, key=KEY):
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_auth_and_bad_requests(setup):
    _, _, real, _ = setup
    with pytest.raises(openai.AuthenticationError) as e:
        _client(real.url, key="wrong").models.list()
    assert e.value.status_code == 401
    status, body = _raw(real.url, b"{}", key="")
    assert status == 401 and "API key" in body["error"]["message"]
    with urllib.request.urlopen(real.url + "/health", timeout=10) as resp:  # probes need no key
        assert json.loads(resp.read()) == {"status": "ok"}

    status, body = _raw(real.url, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _raw(real.url, json.dumps({"messages": "hi"}).encode())
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = _raw(real.url, json.dumps({"messages": _messages(0), "max_tokens": "ten"}).encode())
    assert status == 400 and "max_tokens" in body["error"]["message"]
    client = _client(real.url)
    for bad in (0, -3):
        with pytest.raises(openai.BadRequestError, match="max_tokens must be positive"):
            client.chat.completions.create(model="tiny", messages=_messages(0), max_tokens=bad)
    long = [{"role": "user", "content": "hello world " * 400}]
    with pytest.raises(openai.BadRequestError, match="model's context is 512"):
        client.chat.completions.create(model="tiny", messages=long, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model="tiny", messages=_messages(0), extra_body={"reasoning_effort": "extreme"})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=_messages(0), temperature=-1)


def _metric(url, name):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def _wait_idle(url, cancelled_before, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (_metric(url, "small4_requests_cancelled_total") > cancelled_before
                and _metric(url, "small4_running_requests") == 0 and _metric(url, "small4_cache_pages_used") == 0):
            return
        time.sleep(0.1)
    raise AssertionError("the request was not cancelled and freed")


def test_disconnects_cancel_and_free_pages(setup):
    _, _, real, _ = setup
    client = _client(real.url)
    long_run = dict(model="tiny", messages=_messages(99), max_tokens=460, temperature=0,
                    extra_body={"ignore_eos": True})
    before = _metric(real.url, "small4_requests_cancelled_total")
    stream = client.chat.completions.create(stream=True, **long_run)
    for _, _chunk in zip(range(3), stream):
        pass
    assert _metric(real.url, "small4_cache_pages_used") > 0
    stream.close()
    _wait_idle(real.url, before)
    # non-streaming: the client gives up (timeout) and goes away, well before 460 tokens can be done (a 0.5 s
    # timeout raced a fast machine: the request finished before the disconnect was seen)
    before = _metric(real.url, "small4_requests_cancelled_total")
    with pytest.raises(openai.APITimeoutError):
        _client(real.url, timeout=0.1).chat.completions.create(**long_run)
    _wait_idle(real.url, before)


def test_metrics_are_prometheus_text(setup):
    _, _, real, _ = setup
    with urllib.request.urlopen(real.url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    for name in ("requests_total", "generation_tokens_total", "tokens_per_second", "queue_depth",
                 "cache_usage_ratio", "cache_pages_total", "structured_fallbacks_total"):
        assert f"# TYPE small4_{name} " in text
    assert _metric(real.url, "small4_requests_total") >= 1
    assert _metric(real.url, "small4_cache_pages_total") == real.server.engine.pool.capacity
    assert 0 <= _metric(real.url, "small4_cache_usage_ratio") <= 1
    assert 'small4_http_requests_total{path="/v1/chat/completions",status="200"}' in text


def test_structured_output_through_the_client(setup):
    _, tok, real, _ = setup
    client = _client(real.url)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny", messages=_messages(1), max_tokens=60, temperature=1.0, seed=5, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}})
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        value = json.loads(c.message.content)
        assert set(value) == {"city", "days"} and 1 <= value["days"] <= 9 and len(value["city"]) <= 6
        assert c.finish_reason == "stop"
    # forced calls (required and named): the arguments parse and name the tool
    strict_tools = BOUNDED_TOOLS
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        stream = client.chat.completions.create(model="tiny", messages=_messages(2), tools=strict_tools,
                                                tool_choice=choice, max_tokens=60, temperature=0, stream=True,
                                                parallel_tool_calls=False, extra_body={"reasoning_effort": "none"})
        calls, reason = {}, None
        for chunk in stream:  # OpenAI's deltas: id and name, then argument fragments
            for d in chunk.choices[0].delta.tool_calls or []:
                name, args = calls.get(d.index, ("", ""))
                calls[d.index] = (name + (d.function.name or ""), args + (d.function.arguments or ""))
            reason = chunk.choices[0].finish_reason or reason
        assert len(calls) == 1 and reason == "tool_calls"
        for name, args in calls.values():
            assert name == "get_weather" and len(json.loads(args)["location"]) <= 5
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=_messages(1), response_format={"type": "yaml"})


def test_openai_sampling_parameters(setup):
    hf, tok, real, _ = setup
    client = _client(real.url)
    msgs = _messages(3)
    # logit_bias: +100 forces a token, -100 forbids the greedy one
    forced = tok.encode("Paris", bos=False)[0]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                       logit_bias={str(forced): 100})
    assert r.choices[0].message.content == tok.decode([forced] * 3)
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    first = tok.encode(plain.choices[0].logprobs.content[0].token, bos=False)
    assert len(plain.choices[0].logprobs.content[0].top_logprobs) == 3
    banned = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                            logit_bias={str(first[0]): -100})
    assert banned.choices[0].message.content != plain.choices[0].message.content
    # penalties change greedy output exactly as the engine's tests check; here: accepted and applied
    pen = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                         frequency_penalty=2.0, presence_penalty=1.0,
                                         extra_body={"repetition_penalty": 1.5})
    assert pen.choices[0].finish_reason in ("stop", "length")
    # n with a seed: reproducible choices, sharing the prompt (cached tokens), usage counted once for the prompt
    kw = dict(model="tiny", messages=msgs, max_tokens=6, temperature=1.0, seed=11, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    assert a.usage.completion_tokens == sum(len(tok.encode(c.message.content, bos=False)) for c in a.choices) or \
        a.usage.completion_tokens <= 18
    # stop strings and include_usage on streamed completions
    stream = client.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0, stream=True,
                                       n=2, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}
    # every field we do not implement is a 400 naming it
    for field, value in (("best_of", 2), ("suffix", "x"), ("service_tier", "auto"), ("functions", [])):
        with pytest.raises(openai.BadRequestError, match=f"unsupported parameter '{field}'"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={field: value})
    for field, value in (("metadata", {"a": "b"}), ("modalities", ["text"]), ("frobnicate", 1)):
        with pytest.raises(openai.BadRequestError, match=f"unsupported parameter '{field}'"):
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body={field: value})
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, stream=True,
                                       stream_options={"include_usage": True, "x": 1})
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, presence_penalty=3)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, logit_bias={"5": 101})
