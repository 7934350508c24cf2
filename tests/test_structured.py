"""Structured output (`infer.structured` + the engine's masked sampler) on a tiny model with random weights.

Random weights make no attempt at JSON: everything valid here is forced by the grammar. Each output is checked
by independent parsers (json + jsonschema, `infer.chat.parse_output`), and its token ids against mistral-common's
encoding of the parsed answer (`encode_assistant_message`): a random model picks any tokenisation llguidance
allows, so only the canonical filter (`small4_jax.inputs.canonical`, `structured.Constrained`) makes them equal.
"""

import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from infer import structured
from infer.chat import encode_chat, parse_output
from infer.engine.engine import Engine, SamplingOptions
from small4_jax.config import Small4Config
from small4_jax.nn.model import init_model
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

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
MORE_SCHEMAS = [  # enums that share prefixes (lookahead), arrays of objects, free strings with spaces
    {"type": "object", "properties": {"unit": {"enum": ["celsius", "cel", "celeron", "kelvin"]},
                                      "when": {"enum": ["today", "tomorrow"]}, "n": {"type": "integer"}},
     "required": ["unit", "when", "n"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                                "ok": {"type": ["boolean", "null"]}},
                                "required": ["name", "ok"], "additionalProperties": False}, "maxItems": 2},
]
TOOLSETS = [
    [{"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
        "type": "object", "properties": {"location": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["celsius", "kelvin"]}},
        "required": ["location", "unit"], "additionalProperties": False}}}],
    [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -99999, "maximum": 99999},
                                         "b": {"type": "integer", "minimum": 0}},
        "required": ["a", "b"], "additionalProperties": False}}},
     {"type": "function", "function": {"name": "noop", "parameters": {
         "type": "object", "properties": {}, "additionalProperties": False}}}],
    [{"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["paris", "london", "rome"]},
                                         "guests": {"type": "integer", "minimum": -3, "maximum": 12},
                                         "note": {"type": "string", "maxLength": 12},
                                         "price": {"type": "number", "minimum": -5, "maximum": 5},
                                         "tags": {"type": "array", "items": {"enum": ["a", "the", "then"]},
                                                  "maxItems": 3}},
        "required": ["city", "guests", "note", "price", "tags"], "additionalProperties": False}}}],
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


def _ended(tok, ids):
    """`ids` ending in EOS (llguidance stops a JSON answer at its last brace: nothing but EOS could follow)."""
    return list(ids) if ids and ids[-1] == tok.eos_id else [*ids, tok.eos_id]


def _assistant_ids(tok, parsed):
    """mistral-common's tokens for the assistant message that `parsed` (infer.chat.parse_output) describes."""
    from mistral_common.protocol.instruct.messages import AssistantMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    from mistral_common.protocol.instruct.messages import TextChunk, ThinkChunk

    calls = [ToolCall(id=f"call{i:05d}", function=FunctionCall(name=c.name, arguments=c.arguments))
             for i, c in enumerate(parsed.tool_calls)] or None
    content = parsed.content or None
    if parsed.reasoning:
        content = [ThinkChunk(thinking=parsed.reasoning)] + ([TextChunk(text=content)] if content else [])
    message = AssistantMessage(content=content, tool_calls=calls)
    return tok.mistral_tokenizer().instruct_tokenizer.encode_assistant_message(message, False)


def test_json_schema_outputs_validate(setup):
    tok, engine = setup
    prompt = encode_chat(tok, MESSAGES).ids
    grammars = [structured.chat_grammar(tok, MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s, "strict": True}})
        for i, s in enumerate(SCHEMAS + MORE_SCHEMAS)]
    outs = _generate(engine, prompt, grammars) + _generate(engine, prompt, grammars, temperature=1.0)
    for i, out in enumerate(outs):
        schema = (SCHEMAS + MORE_SCHEMAS)[i % len(grammars)]
        assert out.finish_reason == "stop", (i, out)
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        assert _ended(tok, out.token_ids) == _assistant_ids(tok, parse_output(tok, out.token_ids)), out.text
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
            assert _ended(tok, out.token_ids) == _assistant_ids(tok, parse_output(tok, out.token_ids))
        else:
            assert out.token_ids == tok.encode(out.text, bos=False)


@pytest.mark.parametrize("tools", TOOLSETS)
def test_forced_tool_calls_parse(setup, tools):
    tok, engine = setup
    names = [t["function"]["name"] for t in tools]
    choices = ["required"] + [{"type": "function", "function": {"name": n}} for n in names]
    outs, expect = [], []
    for choice in choices:
        prompt = encode_chat(tok, MESSAGES, tools=tools, tool_choice=choice, force_prefix=False).ids
        # (one call for the big tool: random weights call again and again where parallel calls are allowed)
        grammar = structured.chat_grammar(tok, MESSAGES, tools=tools, tool_choice=choice,
                                          parallel_tool_calls=tools is not TOOLSETS[2])
        outs += _generate(engine, prompt, [grammar, grammar], temperature=1.0)
        expect += [choice] * 2
    for out, choice in zip(outs, expect):
        assert out.finish_reason == "stop", tok.decode(out.token_ids, skip_special=False)
        parsed = parse_output(tok, out.token_ids)
        assert parsed.tool_calls and not parsed.content.strip()
        for call in parsed.tool_calls:
            assert call.name in names
            if isinstance(choice, dict):
                assert call.name == choice["function"]["name"]
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), schema)
        # mistral-common re-serialises the arguments (json.loads / dumps): numbers a random model writes unusually
        # (5.000000000000000000, 2e2673) do not round-trip to the same tokens
        if all(json.dumps(json.loads(c.arguments), ensure_ascii=False) == c.arguments for c in parsed.tool_calls):
            assert _ended(tok, out.token_ids) == _assistant_ids(tok, parsed), tok.decode(out.token_ids,
                                                                                         skip_special=False)


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


def test_fallbacks_are_counted_when_an_answer_cannot_stay_canonical(setup):
    """A character no token holds whole (a 4-byte emoji: byte tokens) forces llguidance's own mask for a step: the
    engine's `structured_fallbacks` counter (exported on /metrics) counts it once the request finishes."""
    tok, engine = setup
    before = engine.stats["structured_fallbacks"]
    schema = {"type": "object", "properties": {"k": {"const": "\U0001d11e"}}, "required": ["k"],
              "additionalProperties": False}
    grammar = structured.chat_grammar(tok, MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": "emoji", "schema": schema}})
    [out] = _generate(engine, encode_chat(tok, MESSAGES).ids, [grammar], max_tokens=40)
    assert json.loads(tok.decode([t for t in out.token_ids if t != tok.eos_id])) == {"k": "\U0001d11e"}
    assert engine.stats["structured_fallbacks"] > before
    assert engine.metrics()["structured_fallbacks"] == engine.stats["structured_fallbacks"]


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
    from infer.speculative.decoder import SpeculativeConfig

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

    # a grammar failing inside a verify step's draft masks fails its own request; the others' tokens are unchanged
    new_matcher, failing = spec._matcher, []

    class Failing:  # the grammar engine failing mid-answer: its third mask raises
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
        if m is not None and options.grammar is grammars[0]:
            failing.append(Failing(m))
            return failing[-1]
        return m

    spec._matcher = matcher
    try:
        got = spec.generate([prompt] * 3, [options[0], options[1], options[4]])
    finally:
        del spec._matcher
    assert failing and failing[0].calls >= 3
    assert got[0].finish_reason == "error" and "injected grammar failure" in got[0].error
    for g, w in zip(got[1:], [want[1], want[4]]):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
    assert spec.metrics()["running"] == 0 and spec.metrics()["pages_used"] == 0


# ---- canonical tokenisation -----------------------------------------------------------------------------------

def _real_tokenizer(tmp_path_factory):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from structured_mask import real_v15_tekken

    return real_v15_tekken(tmp_path_factory.mktemp("real_tekken"))


@pytest.fixture(scope="module")
def real_tok(tmp_path_factory):
    return _real_tokenizer(tmp_path_factory)


def _accepts(canon, ids) -> bool:
    """Whether `canon` lets the inner-rank sequence `ids` be written token by token and then end."""
    tail, tail_ids = "", ()
    for t in ids:
        if not canon.allowed(tail, list(tail_ids), np.array([t]), canon.encode)[0]:
            return False
        tail, tail_ids = canon.advance(tail, tail_ids, t)
    return canon.end_ok(tail, tail_ids, canon.encode)


ALPHABET = list('abcXYZ é1234567890{}[]":,.-_/\\\n\r\t') + ["ñ", "東", "ß", "\u0301", "ǅ", "  ", "\n\n", '"}',
                                                            '", "', '": ', "location", "Paris", "the ", "The"]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_canonical_steps_accept_exactly_the_encodings(setup, real_tok, which):
    """On random texts: the encoder's tokens pass every step; a token split into its two merge halves, or two
    tokens merged into one, pass only where that is the encoding too (tiktoken decides)."""
    tok = setup[0] if which == "tiny" else real_tok
    canon = tok.canon()
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 20)))
        ids = canon.encode(text)
        if any(canon.tstr[t] is None for t in ids):  # pieces of a character: never written
            assert not _accepts(canon, ids)
            continue
        assert _accepts(canon, ids), text
        variants = []
        for i, t in enumerate(ids):
            if canon.left[t] != t:
                variants.append(ids[:i] + [int(canon.left[t]), int(canon.right[t])] + ids[i + 1:])
            if i + 1 < len(ids) and canon.tbytes[t] + canon.tbytes[ids[i + 1]] in canon.ranks:
                variants.append(ids[:i] + [canon.ranks[canon.tbytes[t] + canon.tbytes[ids[i + 1]]]] + ids[i + 2:])
        for v in variants:
            if all(canon.tstr[t] is not None for t in v):
                assert _accepts(canon, v) == (canon.encode(text) == v), (text, v)
                checked += 1
    assert checked > 100


def test_pair_validity_is_bpe(setup, real_tok):
    """`pair_valid` (merge unwinding) == tiktoken's own BPE of the two tokens' bytes: every pair of the tiny
    vocabulary, and 40 x 2000 random pairs of the real one."""
    for tok, firsts, seconds in ((setup[0], None, None), (real_tok, 40, 2000)):
        canon = tok.canon()
        piece = tok.tekkenizer._model._encode_single_piece
        rng = np.random.default_rng(0)
        ok = np.flatnonzero(canon.reachable)
        for a in ok if firsts is None else rng.choice(ok, firsts):
            bs = ok if seconds is None else rng.choice(ok, seconds)
            got = canon.pair_valid(int(a), bs)
            want = [piece(canon.tbytes[a] + canon.tbytes[b]) == [a, b] for b in bs]
            assert got.tolist() == want


def _all_outputs(tok, grammar, canonical, limit=5000):
    """Every token sequence (to the end of the output) the masks allow, by depth-first search."""
    done, fallbacks = [], 0
    stack = [(structured.new_matcher(tok, grammar, canonical=canonical), [])]
    while stack:
        m, ids = stack.pop()
        if m.is_stopped():
            done.append(ids)
            continue
        words = np.frombuffer(m.llm.compute_bitmask(), np.int32).copy()
        m.refine(words)
        fallbacks += m.fallbacks
        for t in np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")):
            nxt = structured.Constrained(tok, m.llm.deep_copy(), canonical=canonical)
            nxt.tail = list(m.tail)
            assert nxt.consume_token(int(t))
            stack.append((nxt, ids + [int(t)]))
        assert len(done) + len(stack) < limit
    return done, fallbacks


def test_masks_allow_exactly_the_canonical_encodings_of_a_finite_language(setup):
    """For schemas with finitely many answers, the canonical masks allow exactly one token sequence per answer,
    its encoding, with no dead end; llguidance alone allows other tokenisations of the same answers."""
    tok = setup[0]
    schemas = [{"enum": ["celsius", "cel", "celeron", "kelvin", "location", "Paris"]},
               {"type": "object", "properties": {"unit": {"enum": ["celsius", "kelvin"]}, "ok": {"type": "boolean"}},
                "required": ["unit", "ok"], "additionalProperties": False}]
    answers = [[json.dumps(v) for v in schemas[0]["enum"]],
               [json.dumps({"unit": u, "ok": o}) for u in ("celsius", "kelvin") for o in (True, False)]]
    for schema, texts in zip(schemas, answers):
        grammar = structured.chat_grammar(tok, MESSAGES, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        got, fallbacks = _all_outputs(tok, grammar, canonical=True)
        assert fallbacks == 0
        assert sorted(_ended(tok, ids) for ids in got) == sorted(tok.encode(t, bos=False) + [tok.eos_id] for t in texts)
        raw, _ = _all_outputs(tok, grammar, canonical=False, limit=200000)
        assert len(raw) > len(got)


def test_tool_call_arguments_are_written_as_mistral_common_writes_them(setup):
    """mistral-common re-serialises arguments (json.loads + json.dumps): the grammar allows only that layout
    (", " and ": ", no "\\/", no "\\u" escapes), so the text written is the text it encodes."""
    tok = setup[0]
    tools = TOOLSETS[2]
    grammar = structured.chat_grammar(tok, MESSAGES, tools=tools, tool_choice="required")

    def accepts(args: str) -> bool:
        m = structured.new_matcher(tok, grammar, canonical=False)
        ids = [tok.token_id("[TOOL_CALLS]"), *tok.encode("book", bos=False), tok.token_id("[ARGS]"),
               *tok.encode(args, bos=False), tok.eos_id]
        return m.llm.validate_tokens(ids) == len(ids)

    value = {"city": "rome", "guests": 2, "note": 'a "b"\n', "price": 1.5, "tags": ["the"]}
    assert accepts(json.dumps(value, ensure_ascii=False))
    assert not accepts(json.dumps(value, separators=(",", ":")))
    assert not accepts(json.dumps(value).replace("the", "\\u0074he"))
    assert not accepts(json.dumps({**value, "note": "a/b"}).replace("/", "\\/"))


def test_argument_numbers_survive_reserialisation(setup):
    """Inside a call's arguments, a number may be written only as json.dumps would write it back (json.loads,
    then json.dumps: what mistral-common encodes); elsewhere (a JSON answer's content) any JSON number is fine."""
    tok = setup[0]
    schema = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    call = structured.chat_grammar(tok, MESSAGES, tools=tools, tool_choice="required")
    answer = structured.chat_grammar(tok, MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})

    def writes(grammar, prefix, text):
        m = structured.new_matcher(tok, grammar)
        ids = prefix + tok.encode(text, bos=False) + [tok.eos_id]
        return m.validate_tokens(ids) == len(ids)

    head = [tok.token_id("[TOOL_CALLS]"), *tok.encode("f", bos=False), tok.token_id("[ARGS]")]
    for lit in ["0", "-3", "12", "1.5", "-0.25", "0.0", "-0.0", "0.0001", "100.0", "123456789012345678",
                "-0", "1.50", "1e5", "1E-3", "0.00001", "2.0000", "0.1000000000000000055", "-0.0"]:
        text = '{"x": %s}' % lit
        canonical = json.dumps(json.loads(lit)) == lit
        assert writes(call, head, text) == canonical, lit
        assert writes(answer, [], text), lit


def test_a_character_without_a_whole_token_falls_back_and_still_parses(setup):
    """'東' has no token of its own in the tiny vocabulary (its encoding is three byte pieces, which the canonical
    masks never allow): an enum that forces it leaves no canonical token, so that step uses llguidance's mask as
    it is (counted in `fallbacks`) and the answer still completes."""
    tok = setup[0]
    assert all(tok.canon().tstr[t - tok.canon().nspec] is None for t in tok.encode("東", bos=False))
    grammar = structured.json_schema_grammar(tok, {"enum": ["東"]})
    m = structured.new_matcher(tok, grammar)
    ids = []
    while not m.is_stopped():
        words = np.frombuffer(m.llm.compute_bitmask(), np.int32).copy()
        m.refine(words)
        t = int(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))[0])
        assert m.consume_token(t)
        ids.append(t)
    assert m.fallbacks > 0 and json.loads(tok.decode(ids)) == "東"


def test_answers_close_within_max_tokens(setup):
    """Free-form JSON and unbounded numbers: random weights would write strings and digits until max_tokens; near
    the budget the masks follow a plan that closes the answer, so every answer ends, parses and stays canonical."""
    tok, engine = setup
    prompt = encode_chat(tok, MESSAGES).ids
    grammar = structured.chat_grammar(tok, MESSAGES, response_format={"type": "json_object"})
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
              "required": ["n", "s"], "additionalProperties": False}
    strict = structured.chat_grammar(tok, MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    opts = [SamplingOptions(max_tokens=m, temperature=1.0, seed=i, grammar=g)
            for i, (m, g) in enumerate([(12, grammar), (16, grammar), (24, grammar), (12, strict), (20, strict)] * 2)]
    for out, o in zip(engine.generate([prompt] * len(opts), opts), opts):
        assert out.finish_reason == "stop", tok.decode(out.token_ids)
        assert len(out.token_ids) <= o.max_tokens
        value = json.loads(out.text)
        if o.grammar is strict:
            jsonschema.validate(value, schema)
        assert _ended(tok, out.token_ids) == _assistant_ids(tok, parse_output(tok, out.token_ids))


def test_reasoning_then_answer_is_canonical_and_closes(setup):
    """reasoning_effort high: [THINK] free text [/THINK] then the JSON answer or the forced call; the whole output
    is mistral-common's encoding of the parsed reasoning and answer, and closes within max_tokens."""
    tok, engine = setup
    msgs = MESSAGES
    grammars = [structured.chat_grammar(tok, msgs, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}}, reasoning=True),
        structured.chat_grammar(tok, msgs, tools=TOOLSETS[0], tool_choice="required", reasoning=True,
                                parallel_tool_calls=False)]
    prompts = [encode_chat(tok, msgs, reasoning_effort="high").ids,
               encode_chat(tok, msgs, tools=TOOLSETS[0], tool_choice="required", force_prefix=False,
                           reasoning_effort="high").ids]
    opts = [SamplingOptions(max_tokens=40, temperature=1.0, seed=s, grammar=grammars[i % 2]) for i, s in
            enumerate(range(6))]
    outs = engine.generate([prompts[i % 2] for i in range(len(opts))], opts)
    assert any(out.token_ids[0] == tok.token_id("[THINK]") for out in outs)
    for out in outs:
        assert out.finish_reason == "stop", tok.decode(out.token_ids, skip_special=False)
        parsed = parse_output(tok, out.token_ids)
        assert parsed.content or parsed.tool_calls
        assert _ended(tok, out.token_ids) == _assistant_ids(tok, parsed), tok.decode(out.token_ids,
                                                                                     skip_special=False)


def test_random_walks_over_the_real_vocabulary_are_canonical(real_tok):
    """The real 131K Tekken vocabulary: tokens drawn uniformly from the masks (a random model's worst case) for a
    JSON answer, a forced call with a number argument and free-form JSON after reasoning; every output ends within
    max_tokens, with no fallback, as mistral-common's encoding of what it parses to."""
    tok = real_tok
    grammars = [structured.chat_grammar(tok, MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": MORE_SCHEMAS[0]}}),
        structured.chat_grammar(tok, MESSAGES, tools=TOOLSETS[2], tool_choice="required", parallel_tool_calls=False),
        structured.chat_grammar(tok, MESSAGES, response_format={"type": "json_object"}, reasoning=True)]
    rng = random.Random(2)
    for grammar in grammars:
        m = structured.new_matcher(tok, grammar, max_tokens=40)
        ids = []
        while not m.is_stopped():
            assert len(ids) < 40
            words = np.frombuffer(m.llm.compute_bitmask(), np.int32).copy()
            m.refine(words)
            t = int(rng.choice(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))))
            assert m.consume_token(t)
            ids.append(t)
        assert m.fallbacks == 0
        assert _ended(tok, ids) == _assistant_ids(tok, parse_output(tok, ids)), tok.decode(ids, skip_special=False)
