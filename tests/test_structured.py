"""Structured output (`infer.structured` + the engine's masked sampler) on a tiny model with random weights.

Random weights make no attempt at JSON: everything valid here is forced by the grammar. Each output is checked
by independent parsers (json + jsonschema, `infer.chat.parse_output`).
"""

import json
from pathlib import Path

import jsonschema
import pytest

from infer import structured
from infer.chat import encode_chat, parse_output
from infer.engine import Engine, SamplingOptions
from small4_jax.config import Small4Config
from small4_jax.model import init_model
from small4_jax.tokenizer import ASSETS_DIR, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "answer in json"}]
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "enum": ["x", "yy", "z"]}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["ok", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                             "y": {"type": "number"}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "name": {"type": "string", "maxLength": 6}},
     "required": ["point", "name"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"n": {"const": 3}}, "required": ["n"],
                                  "additionalProperties": False}]},
]
TOOLSETS = [
    [{"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
        "type": "object", "properties": {"location": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["celsius", "kelvin"]}},
        "required": ["location", "unit"], "additionalProperties": False}}}],
    [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
     {"type": "function", "function": {"name": "noop", "parameters": {
         "type": "object", "properties": {}, "additionalProperties": False}}}],
]


@pytest.fixture(scope="module")
def setup():
    model = init_model(Small4Config.from_yaml(REPO / "configs" / "tiny.yaml"), seed=7)
    tok = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    engine = Engine(model, tok, max_batch=8, page_size=16, max_model_len=512, prefill_chunk=32,
                    batch_buckets=(8,), page_buckets=(32,))
    return tok, engine


def _generate(engine, prompt, grammars, temperature=0.0, max_tokens=200):
    opts = [SamplingOptions(max_tokens=max_tokens, temperature=temperature, seed=i, grammar=g)
            for i, g in enumerate(grammars)]
    return engine.generate([prompt] * len(grammars), opts)


def test_json_schema_outputs_validate(setup):
    tok, engine = setup
    prompt = encode_chat(tok, MESSAGES).ids
    grammars = [structured.chat_grammar(tok, MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s, "strict": True}})
        for i, s in enumerate(SCHEMAS)]
    outs = _generate(engine, prompt, grammars) + _generate(engine, prompt, grammars, temperature=1.0)
    for i, out in enumerate(outs):
        schema = SCHEMAS[i % len(SCHEMAS)]
        assert out.finish_reason == "stop", (i, out)
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        if "point" not in out.text:  # (random floats such as 2e2673 do not round-trip)
            assert out.text.strip() == json.dumps(value, ensure_ascii=False)  # laid out as json.dumps


def test_json_object_mode(setup):
    tok, engine = setup
    prompt = encode_chat(tok, MESSAGES).ids
    grammar = structured.chat_grammar(tok, MESSAGES, response_format={"type": "json_object"})
    outs = _generate(engine, prompt, [grammar] * 4, temperature=1.0)
    # free-form JSON has unbounded strings: random weights may still be inside one at max_tokens
    assert any(out.finish_reason == "stop" for out in outs)
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), (dict, list))


@pytest.mark.parametrize("tools", TOOLSETS)
def test_forced_tool_calls_parse(setup, tools):
    tok, engine = setup
    names = [t["function"]["name"] for t in tools]
    choices = ["required"] + [{"type": "function", "function": {"name": n}} for n in names]
    outs, expect = [], []
    for choice in choices:
        prompt = encode_chat(tok, MESSAGES, tools=tools, tool_choice=choice, force_prefix=False).ids
        grammar = structured.chat_grammar(tok, MESSAGES, tools=tools, tool_choice=choice)
        outs += _generate(engine, prompt, [grammar, grammar], temperature=1.0)
        expect += [choice] * 2
    for out, choice in zip(outs, expect):
        assert out.finish_reason == "stop", out
        parsed = parse_output(tok, out.token_ids)
        assert parsed.tool_calls and not parsed.content.strip()
        for call in parsed.tool_calls:
            assert call.name in names
            if isinstance(choice, dict):
                assert call.name == choice["function"]["name"]
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), schema)


def test_reasoning_may_precede_a_forced_call_only_when_on(setup):
    tok, _ = setup
    tools = TOOLSETS[0]
    call = [tok.token_id("[TOOL_CALLS]"), *tok.encode("get_weather", bos=False), tok.token_id("[ARGS]"),
            *tok.encode('{"location": "Rome", "unit": "kelvin"}', bos=False), tok.eos_id]
    think = [tok.token_id("[THINK]"), *tok.encode("first think", bos=False), tok.token_id("[/THINK]")]
    text = tok.encode("Hello", bos=False)
    for reasoning in (True, False):
        grammar = structured.chat_grammar(tok, MESSAGES, tools=tools, tool_choice="required", reasoning=reasoning)

        def accepts(ids):
            m = structured.new_matcher(tok, grammar)
            return all(m.consume_token(t) for t in ids) and m.is_stopped()

        assert accepts(call)
        assert accepts(think + call) == reasoning
        assert not accepts(text + call)  # no free text before a forced call
        assert not accepts(call[:-3] + [tok.eos_id])  # no stopping inside the arguments


def test_masks_are_built_while_the_device_runs_and_counted(setup):
    tok, engine = setup
    before = dict(engine.stats)
    grammar = structured.chat_grammar(tok, MESSAGES, response_format={"type": "json_object"})
    [out] = _generate(engine, encode_chat(tok, MESSAGES).ids, [grammar])
    assert engine.stats["masked_tokens"] - before["masked_tokens"] == len(out.token_ids)
    assert engine.stats["mask_seconds"] > before["mask_seconds"]


class _OracleDrafter:
    """Proposes each request's plain-decoding continuation; every other call puts the BOS token (never allowed by a
    JSON grammar) second, so constrained rows must cut their drafts there and roll their matchers back."""

    def __init__(self, continuations):
        self.continuations, self.calls, self.proposed = continuations, 0, 0

    def propose(self, engine, reqs, rooms):
        self.calls += 1
        out = []
        for r, room in zip(reqs, rooms):
            d = list(self.continuations[(r.options.grammar, r.options.temperature)][r.generated: r.generated + room])
            if self.calls % 2 and len(d) > 1:
                d[1] = 1
            self.proposed += len(d)
            out.append(d)
        return out


def test_speculative_constrained_rows_equal_plain_constrained_decoding(setup):
    """Grammar rows in a speculative batch (beside a free row): drafts are checked against each row's grammar, every
    verify position is masked with the grammar's state after the drafts before it, and rejected drafts are rolled
    back in the matcher, so greedy tokens equal plain constrained decoding; sampled rows still validate."""
    from infer.speculative import SpeculativeConfig

    tok, engine = setup
    prompt = encode_chat(tok, MESSAGES).ids
    grammars = [structured.chat_grammar(tok, MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s, "strict": True}})
        for i, s in enumerate(SCHEMAS) if i != 2] + [None]  # (SCHEMAS[2]'s random floats can run long)
    options = [SamplingOptions(max_tokens=60, grammar=g) for g in grammars]
    options += [SamplingOptions(max_tokens=60, temperature=1.0, seed=5, grammar=grammars[1])]
    want = engine.generate([prompt] * len(options), options)
    spec = Engine(engine.model, tok, max_batch=8, page_size=16, max_model_len=512, prefill_chunk=32,
                  batch_buckets=(8,), page_buckets=(32,), speculative=SpeculativeConfig("ngram", num_draft_tokens=3))
    drafter = spec.speculator.drafter = _OracleDrafter(
        {(o.grammar, o.temperature): w.token_ids for o, w in zip(options, want)})
    got = spec.generate([prompt] * len(options), options)
    for i, (w, g) in enumerate(zip(want[:5], got[:5])):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason, i
    for i, out in enumerate(got[:4] + got[5:]):
        assert out.finish_reason == "stop", (i, out)
        jsonschema.validate(json.loads(out.text), SCHEMAS[[0, 1, 3, 4, 1][i]])
    m = spec.metrics()
    assert m["spec_accepted_tokens"] > 0 and m["spec_draft_tokens"] < drafter.proposed  # BOS drafts were cut
    assert m["masked_tokens"] > sum(len(w.token_ids) for w in want[:4])  # a mask per verify position
    assert m["running"] == 0 and m["pages_used"] == 0
