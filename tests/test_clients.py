"""`infer.serve` driven by the clients people use against Mistral's API: the `mistralai` SDK, the `openai` SDK's
stream helpers, pydantic-ai, and lm-eval (`local-completions` / `local-chat-completions`).

One server for the module (no API key, 127.0.0.1, no network): a tiny transformers-made checkpoint turned into a
script follower in torch (attention and MLP outputs zeroed, an lm_head mapping each script token to the next), so it
always answers `[THINK]think first[/THINK]Hello[TOOL_CALLS]get_weather[ARGS]{"location": "Rome"}</s>` and the
same transformers model is the independent reference for every log-probability.
"""

import asyncio
import json
import textwrap
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from infer.chat import ChatParser, ReasoningPolicy, encode_chat
from infer.engine.engine import Engine, SamplingOptions
from infer.serve import Running, Server
from small4_jax.errors import InputError
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

CONTEXT = 512
SCRIPT = ("think first", "Hello", "get_weather", '{"location": "Rome"}')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"location": {"type": "string", "maxLength": 5}}, "required": ["location"],
    "additionalProperties": False}}}]
USER = [{"role": "user", "content": "weather in rome?"}]
DATA = __import__("pathlib").Path(__file__).parent / "data" / "lm_eval_tiny.jsonl"


def _script_ids(tok):
    return [tok.token_id("[/INST]"), tok.token_id("[THINK]"), *tok.encode(SCRIPT[0], bos=False),
            tok.token_id("[/THINK]"), *tok.encode(SCRIPT[1], bos=False), tok.token_id("[TOOL_CALLS]"),
            *tok.encode(SCRIPT[2], bos=False), tok.token_id("[ARGS]"), *tok.encode(SCRIPT[3], bos=False), tok.eos_id]


@torch.no_grad()
def _scripted_hf(hf, tok):
    """The HF model made a script follower in place: each position's output depends on its own token only."""
    for layer in hf.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            mlp.experts.down_proj.zero_()
            mlp = mlp.shared_experts
        mlp.down_proj.weight.zero_()
    hf.model.norm.weight.fill_(1.0)
    seq = _script_ids(tok)
    assert len(set(seq)) == len(seq), "script tokens must be distinct"
    emb = hf.model.embed_tokens.weight
    head = torch.zeros_like(hf.lm_head.weight)  # [V, H]
    for cur, nxt in zip(seq, seq[1:]):
        head[nxt] = emb[cur] / emb[cur].norm() * 10
    hf.lm_head.weight.copy_(head)
    return hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    config = tiny_hf_config(vocab_size=512, eos_token_id=2, max_position_embeddings=CONTEXT)
    hf = _scripted_hf(make_hf_model(config, seed=3), tok)
    path = tmp_path_factory.mktemp("hf")
    save_hf(hf, path)
    model = small4_jax.from_pretrained(path, dtype="float32")
    engine = Engine(model, tok, max_batch=8, page_size=16, prefill_chunk=64, batch_buckets=(8,), page_buckets=(32,))
    running = Running(Server(engine, tok, "tiny"))
    try:
        yield hf, tok, running
    finally:
        running.stop()


def _openai(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _post(url, path, body: dict):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _hf_logprobs(hf, ids):
    """Teacher-forced log-probabilities of ids[1:] (and each position's log-softmax) from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy(), lp.numpy()


# ---- the mistralai SDK --------------------------------------------------------------------------------------------
def test_mistralai_sdk_chat_stream_tools_thinking(setup):
    from mistralai.client import Mistral, errors, models

    _, tok, running = setup
    client = Mistral(api_key="none", server_url=running.url)
    r = client.chat.complete(model="tiny", messages=USER, tools=TOOLS, tool_choice="any", random_seed=7,
                             reasoning_effort="high", temperature=0, max_tokens=120)
    msg = r.choices[0].message
    # Mistral's API shape: a thinking chunk (then text, which a forced call leaves no room for: "any" = required)
    [think] = msg.content
    assert isinstance(think, models.ThinkChunk) and "".join(c.text for c in think.thinking) == SCRIPT[0]
    [call] = msg.tool_calls
    assert call.function.name == SCRIPT[2] and json.loads(call.function.arguments) == json.loads(SCRIPT[3])
    assert r.choices[0].finish_reason == "tool_calls"

    # streamed: thinking chunks, text, and each call whole (the SDK validates every delta)
    thinking, content, calls = "", "", []
    for event in client.chat.stream(model="tiny", messages=USER, tools=TOOLS, reasoning_effort="high",
                                    temperature=0, max_tokens=60):
        d = event.data.choices[0].delta
        for c in ([d.content] if isinstance(d.content, str) else d.content or []):
            if isinstance(c, str):
                content += c
            elif isinstance(c, models.ThinkChunk):
                thinking += "".join(x.text for x in c.thinking)
            else:
                content += c.text
        calls += d.tool_calls or []
    assert (thinking, content) == (SCRIPT[0], SCRIPT[1])
    assert [(c.function.name, c.function.arguments) for c in calls] == [(SCRIPT[2], SCRIPT[3])]

    # the answer sent back as the SDK makes it (thinking chunk in content), with the tool's result: a second turn
    history = [*USER, models.AssistantMessage(content=msg.content, tool_calls=msg.tool_calls),
               models.ToolMessage(content="sunny", tool_call_id=call.id, name=call.function.name)]
    r2 = client.chat.complete(model="tiny", messages=history, tools=TOOLS, reasoning_effort="high",
                              temperature=0, max_tokens=8)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens
    with pytest.raises(errors.MistralError) as e:  # (no safety prompt is served: said, not ignored)
        client.chat.complete(model="tiny", messages=USER, safe_prompt=True, max_tokens=4)
    assert e.value.status_code == 400 and "safe_prompt" in e.value.body


def test_reasoning_history_is_think_and_prefix_cached(setup):
    _, tok, running = setup
    client = _openai(running.url)
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=60,
                                       reasoning_effort="low")  # OpenAI's value: mapped to the model's "high"
    msg = r.choices[0].message
    assert msg.reasoning_content == msg.reasoning == SCRIPT[0] and msg.content == SCRIPT[1]
    call = msg.tool_calls[0]
    turn = {"role": "assistant", "content": msg.content, "tool_calls": [call.model_dump()]}
    tool = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    # the three shapes clients send reasoning back in are one prompt: mistral-common's [THINK]...[/THINK]
    shapes = [{**turn, "reasoning_content": SCRIPT[0]}, {**turn, "reasoning": SCRIPT[0]},
              {**turn, "content": [{"type": "thinking", "thinking": [{"type": "text", "text": SCRIPT[0]}]},
                                   {"type": "text", "text": SCRIPT[1]}]}]
    prompts = [encode_chat(tok, [*USER, s, tool], tools=TOOLS, reasoning_effort="high").ids for s in shapes]
    assert prompts[0] == prompts[1] == prompts[2]
    think = tok.token_id("[THINK]")
    first = encode_chat(tok, USER, tools=TOOLS, reasoning_effort="high").ids
    assert prompts[0][: len(first)] == first and think in prompts[0][len(first):]
    for s in shapes:
        r2 = client.chat.completions.create(model="tiny", messages=[*USER, s, tool], tools=TOOLS, temperature=0,
                                            max_tokens=4, reasoning_effort="high")
        assert r2.usage.prompt_tokens == len(prompts[0])
        # the first turn's prompt and answer were cached: the second turn reads them back (full pages)
        assert r2.usage.prompt_tokens_details.cached_tokens >= (len(first) + 8) // 16 * 16
    for effort in ("none", "minimal", "medium", "high", "auto"):
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, reasoning_effort=effort)
        assert r.choices[0].finish_reason == "length"
    status, body = _post(running.url, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "extreme"})
    assert status == 400 and body["error"]["param"] == "reasoning_effort"


def test_reasoning_policy_flags():
    policy = ReasoningPolicy.parse("low=none", default="high")
    assert [policy.resolve(e, ("none", "high")) for e in ("low", "medium", "minimal", "auto", None, "none")] == \
        ["none", "high", "none", "high", "high", "none"]
    assert ReasoningPolicy().resolve(None, ("none", "high")) is None  # the model's own default
    with pytest.raises(InputError, match="--reasoning-effort-map 'huge=high'"):
        ReasoningPolicy.parse("huge=high")


# ---- the openai SDK's stream helpers, tool calls streamed right ----------------------------------------------------
def test_openai_stream_accumulates_to_the_non_streamed_message(setup):
    _, _, running = setup
    client = _openai(running.url)
    kw = dict(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=60,
              reasoning_effort="high")
    plain = client.chat.completions.create(**kw).choices[0]
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.message.content == plain.message.content == SCRIPT[1]
    a, b = final.message.tool_calls[0], plain.message.tool_calls[0]
    assert (a.function.name, a.function.arguments) == (b.function.name, b.function.arguments) == SCRIPT[2:]
    assert final.finish_reason == plain.finish_reason == "tool_calls"
    # the raw deltas: id, type and name first (empty arguments), then argument fragments
    stream = client.chat.completions.create(**kw, stream=True)
    deltas = [c for ch in stream for c in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == SCRIPT[2] and deltas[0].function.arguments == ""
    assert len(deltas) > 2 and all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == SCRIPT[3]


def test_parser_streams_parallel_calls_in_openai_form():
    tok = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    calls = [("get_weather", ' {"location": "Rome"} '), ("get_time", '{"tz": "CET"}'), ("noop", "")]
    ids = [*tok.encode("ok", bos=False)]
    for name, args in calls:
        ids += [tok.token_id("[TOOL_CALLS]"), *tok.encode(name, bos=False), tok.token_id("[ARGS]"),
                *tok.encode(args, bos=False)]
    parser = ChatParser(tok)
    deltas = [d for t in ids for d in parser.push(t).tool_call_deltas] + parser.finish().tool_call_deltas
    merged = {}
    for d in deltas:  # as the openai SDK accumulates them
        m = merged.setdefault(d["index"], {"id": d.get("id"), "name": "", "arguments": ""})
        m["name"] += d["function"].get("name", "")
        m["arguments"] += d["function"]["arguments"]
    assert [(m["name"], m["arguments"]) for m in merged.values()] == \
        [("get_weather", '{"location": "Rome"}'), ("get_time", '{"tz": "CET"}'), ("noop", "{}")]
    assert [(c.name, c.arguments, c.id) for c in parser.tool_calls] == \
        [(m["name"], m["arguments"], m["id"]) for m in merged.values()]


def test_named_choice_gives_one_call_and_json_mode_an_object(setup):
    _, tok, running = setup
    client = _openai(running.url)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=80)
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(r.choices[0].message.tool_calls) == (1 if choice is named else
                                                        len(r.choices[0].message.tool_calls))
        assert all(json.loads(c.function.arguments).keys() <= {"location"} for c in r.choices[0].message.tool_calls)
    # JSON mode is an object even where an array is what the weights want most
    bracket = tok.encode("[", bos=False)[-1]
    r = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=40,
                                       response_format={"type": "json_object"}, logit_bias={str(bracket): 100})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=40,
                                       response_format={"type": "json_object_or_array"},
                                       logit_bias={str(bracket): 100})
    assert isinstance(json.loads(r.choices[0].message.content), list)


# ---- one request's failure is its own ----------------------------------------------------------------------------
def _concurrent(url, bodies):
    async def run():
        return await asyncio.gather(*[asyncio.to_thread(_post, url, "/v1/chat/completions", b) for b in bodies])

    return asyncio.run(run())


def test_out_of_range_fields_are_400s_beside_innocent_requests(setup):
    _, _, running = setup
    ok = {"messages": USER, "max_tokens": 12, "temperature": 0}
    bad = [({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"top_k": 2**31}, "top_k"),
           ({"random_seed": 2**40}, "random_seed"), ({"seed": 1, "random_seed": 2}, "random_seed"),
           ({"repetition_penalty": 1e9}, "repetition_penalty")]
    results = _concurrent(running.url, [ok, *[{**ok, **b} for b, _ in bad], ok])
    assert [s for s, _ in results] == [200] + [400] * len(bad) + [200]
    for (_, body), (_, param) in zip(results[1:], bad):
        assert body["error"]["param"] == param or param in body["error"]["message"], body
    assert results[0][1]["choices"][0]["message"] == results[-1][1]["choices"][0]["message"]
    status, body = _post(running.url, "/v1/chat/completions", {**ok, "random_seed": 5, "temperature": 1})
    assert status == 200


def test_a_failing_grammar_fails_only_its_request(setup, monkeypatch):
    _, _, running = setup
    engine = running.server.engine
    new_matcher = engine._matcher

    class Failing:  # a matcher whose third mask raises (the grammar engine failing mid-answer)
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def refine(self, words):
            self.calls += 1
            if self.calls >= 3:
                raise RuntimeError("injected grammar failure")
            return self.inner.refine(words)

    def matcher(options):
        m = new_matcher(options)
        return None if m is None else Failing(m)

    ok = {"messages": USER, "max_tokens": 12, "temperature": 0}
    solo = _post(running.url, "/v1/chat/completions", ok)[1]["choices"][0]["message"]
    monkeypatch.setattr(engine, "_matcher", matcher)
    results = _concurrent(running.url, [ok, {**ok, "response_format": {"type": "json_object"}}, ok, ok])
    assert [s for s, _ in results] == [200, 500, 200, 200]
    assert "injected grammar failure" in results[1][1]["error"]["message"]
    assert all(b["choices"][0]["message"] == solo for s, b in results if s == 200)
    # streamed: an error event for that request only
    status, _ = _post(running.url, "/v1/chat/completions", ok)
    assert status == 200


# ---- prompt log-probabilities and lm-eval -------------------------------------------------------------------------
def test_completions_prompt_shapes_echo_and_prompt_logprobs(setup):
    hf, tok, running = setup
    texts = ["weather in rome?", "Hello"]
    ids = [tok.encode(t, bos=True) for t in texts]
    client = _openai(running.url)
    for prompt in (texts, ids):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                      temperature=0)
        assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
        for c, p in zip(r.choices, ids):
            lp = c.logprobs
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert len(lp.token_logprobs) == len(p) + 1 and c.text.startswith(tok.decode(p))
            ref, _ = _hf_logprobs(hf, p)
            np.testing.assert_allclose(lp.token_logprobs[1:len(p)], ref, atol=2e-4)
    # max_tokens 0 with echo: the prompt's log-probabilities only; a single flat prompt and a single string too
    for prompt in (ids[0], [ids[0]], texts[0]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
        [c] = r.choices
        assert len(c.logprobs.token_logprobs) == len(ids[0]) and c.text == tok.decode(ids[0])
        ref, full = _hf_logprobs(hf, ids[0])
        np.testing.assert_allclose(c.logprobs.token_logprobs[1:], ref, atol=2e-4)
        top = c.logprobs.top_logprobs[1]
        assert len(top) == 2 and max(top.values()) == pytest.approx(full[0].max(), abs=2e-4)
    status, body = _post(running.url, "/v1/completions", {"prompt": "hi", "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_engine_prompt_logprobs_equal_transformers(setup, monkeypatch):
    import infer.engine.engine as engine_module

    hf, tok, running = setup
    prompt = tok.encode("what is the weather in rome today?", bos=True)
    [out] = running.server.engine.generate([prompt], SamplingOptions(max_tokens=0, prompt_logprobs=3))
    ref, full = _hf_logprobs(hf, prompt)
    got = out.prompt_logprobs
    assert got[0] is None and [x.token_id for x in got[1:]] == prompt[1:]
    np.testing.assert_allclose([x.logprob for x in got[1:]], ref, atol=2e-4)
    assert [a for a, _ in got[1].top] == np.argsort(-full[0])[:3].tolist()
    monkeypatch.setattr(engine_module, "MAX_PROMPT_LOGPROBS_TOKENS", 4)  # (the [T, vocab] logits are held at once)
    with pytest.raises(InputError, match=f"the prompt has {len(prompt)} tokens; .* up to 4 tokens"):
        running.server.engine.submit(prompt, SamplingOptions(max_tokens=0, prompt_logprobs=1))


def _offline(monkeypatch, tmp_path):
    """lm-eval's datasets: the local JSONL only, nothing looked up on the Hub, the cache in the test's directory."""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _task(tmp_path, output_type: str) -> str:
    name = f"small4_tiny_{output_type}"
    body = {
        "multiple_choice": 'output_type: multiple_choice\ndoc_to_choice: "{{a}}"\ndoc_to_target: label\n'
                           "metric_list:\n  - metric: acc\n",
        "generate_until": 'output_type: generate_until\ndoc_to_target: "{{a[0]}}"\n'
                          "generation_kwargs:\n  until: [\"get_weather\"]\n  max_gen_toks: 16\n  do_sample: false\n"
                          "metric_list:\n  - metric: exact_match\n",
    }[output_type]
    (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {DATA}
        test_split: test
        doc_to_text: "{{{{q}}}}"
        """) + body)
    return name


def test_lm_eval_local_completions_scores_equal_transformers(setup, tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    import lm_eval
    from lm_eval.tasks import TaskManager

    hf, tok, running = setup
    name = _task(tmp_path, "multiple_choice")
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args={"base_url": running.url + "/v1/completions", "model": "tiny",
                                               "tokenizer_backend": "remote", "num_concurrent": 1,
                                               "max_retries": 1},
        tasks=[name], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True, limit=None)
    samples = out["samples"][name]
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    for s in samples:
        doc = docs[s["doc_id"]]
        for choice, (resp,) in zip(doc["a"], s["resps"]):
            ctx = tok.encode(doc["q"], bos=False)
            whole = tok.encode(doc["q"] + " " + choice, bos=False)
            ref, _ = _hf_logprobs(hf, whole)
            assert float(resp[0]) == pytest.approx(float(ref[len(ctx) - 1:].sum()), abs=1e-3)
    assert out["results"][name]["acc,none"] == np.mean([s["acc"] for s in samples])


def test_lm_eval_local_chat_completions(setup, tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, _, running = setup
    name = _task(tmp_path, "generate_until")
    out = lm_eval.simple_evaluate(
        model="local-chat-completions", model_args={"base_url": running.url + "/v1/chat/completions",
                                                    "model": "tiny", "num_concurrent": 1, "max_retries": 1},
        tasks=[name], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True, apply_chat_template=True)
    # the scripted model answers "Hello" after its reasoning (reasoning is not content), its call text cut by the
    # task's stop string; only the first doc's target is "Hello"
    assert [s["resps"][0][0] for s in out["samples"][name]] == ["Hello"] * 4
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert out["results"][name]["exact_match,none"] == np.mean([d["a"][0] == "Hello" for d in docs]) == 0.25


# ---- pydantic-ai: a validated object through tools and through JSON schema ----------------------------------------
def test_pydantic_ai_structured_output(setup):
    from pydantic import BaseModel
    from pydantic_ai import Agent, NativeOutput, ToolOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    _, _, running = setup

    class Weather(BaseModel):
        location: str

    model = OpenAIChatModel("tiny", provider=OpenAIProvider(base_url=running.url + "/v1", api_key="none"))
    settings = {"temperature": 0, "max_tokens": 60}
    for output in (ToolOutput(Weather, name="get_weather"), NativeOutput(Weather)):
        result = Agent(model, output_type=output, model_settings=settings).run_sync("weather in rome?")
        assert isinstance(result.output, Weather)
