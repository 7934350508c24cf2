"""Chat encoding and output parsing (`infer.chat`) against mistral-common, on the bundled tiny Tekken v15 file.

The reference ids are built with mistral-common's own typed protocol classes (not the OpenAI dicts we translate),
and one layout is checked against the v15 format written out by hand (ARCHITECTURE.md §5.2). Parsing is checked on
assistant turns that mistral-common itself encoded.
"""

import json

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

from infer.chat import ChatParser, encode_chat, parse_output
from small4_jax.errors import InputError
from small4_jax.inputs.tokenizer import ASSETS_DIR, default_tokenizer, load_tokenizer

PARAMS = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": PARAMS}}]
ARGS = '{"location": "Paris"}'
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather in paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny, 21 degrees"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "and tomorrow?"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSETS_DIR / "tiny_tekken.json")


def _typed_request(reasoning_effort):
    return ChatCompletionRequest(
        messages=[
            SystemMessage(content="be brief"),
            UserMessage(content="weather in paris?"),
            AssistantMessage(tool_calls=[ToolCall(id="abcDEF123", function=FunctionCall(name="get_weather",
                                                                                          arguments=ARGS))]),
            ToolMessage(content="sunny, 21 degrees", tool_call_id="abcDEF123"),
            AssistantMessage(content="It is sunny."),
            UserMessage(content="and tomorrow?"),
        ],
        tools=[Tool(function=Function(name="get_weather", description="Weather now", parameters=PARAMS))],
        **({"reasoning_effort": reasoning_effort} if reasoning_effort else {}),
    )


@pytest.mark.parametrize("effort", [None, "none", "high"])
def test_chat_ids_equal_mistral_common(tok, effort):
    ours = encode_chat(tok, CONVERSATION, tools=TOOLS, reasoning_effort=effort)
    ref = tok.mistral_tokenizer().encode_chat_completion(_typed_request(effort)).tokens
    assert ours.ids == list(ref) and ours.forced == []
    text = tok.decode(ours.ids, skip_special=False)
    tools_json = json.dumps([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                               "parameters": PARAMS}}], ensure_ascii=False)
    assert text == (
        "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][AVAILABLE_TOOLS]" + tools_json + "[/AVAILABLE_TOOLS]"
        '[MODEL_SETTINGS]{"reasoning_effort": "' + (effort or "none") + '"}[/MODEL_SETTINGS]'
        "[INST]weather in paris?[/INST][TOOL_CALLS]get_weather[ARGS]" + ARGS + "</s>"
        "[TOOL_RESULTS]sunny, 21 degrees[/TOOL_RESULTS]It is sunny.</s>[INST]and tomorrow?[/INST]"
    )


def test_tool_choice(tok):
    msgs = [{"role": "user", "content": "hi"}]
    auto = encode_chat(tok, msgs, tools=TOOLS)
    assert tok.token_id("[AVAILABLE_TOOLS]") in auto.ids
    none = encode_chat(tok, msgs, tools=TOOLS, tool_choice="none")
    assert none.ids == encode_chat(tok, msgs).ids  # tools left out
    required = encode_chat(tok, msgs, tools=TOOLS, tool_choice="required")
    assert required.ids == auto.ids + [tok.token_id("[TOOL_CALLS]")] and required.forced == required.ids[-1:]
    named = encode_chat(tok, msgs, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tok.decode(named.forced, skip_special=False) == "[TOOL_CALLS]get_weather[ARGS]"
    assert named.ids == auto.ids + named.forced
    with pytest.raises(InputError, match="not among the tools"):
        encode_chat(tok, msgs, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InputError, match="tool_choice must be"):
        encode_chat(tok, msgs, tools=TOOLS, tool_choice="always")


def test_bad_requests_are_input_errors(tok):
    with pytest.raises(InputError, match="reasoning_effort must be one of"):
        encode_chat(tok, [{"role": "user", "content": "hi"}], reasoning_effort="medium")
    with pytest.raises(InputError, match="non-empty"):
        encode_chat(tok, [])
    with pytest.raises(InputError, match=r"^messages\[0\].role: 'wizard'; expected one of system, user, assistant, tool$"):
        encode_chat(tok, [{"role": "wizard", "content": "hi"}])
    with pytest.raises(InputError, match="invalid chat request"):  # what only mistral-common checks
        encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])


def _assistant_ids(tok, message):
    """The ids mistral-common writes for an assistant turn (between [/INST] and </s>)."""
    req = ChatCompletionRequest(messages=[UserMessage(content="q"), message, UserMessage(content="r")])
    ids = tok.mistral_tokenizer().encode_chat_completion(req).tokens
    start = ids.index(tok.token_id("[/INST]")) + 1
    return ids[start : ids.index(tok.eos_id, start) + 1]


def test_parse_reasoning_content_and_parallel_tool_calls(tok):
    from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk

    message = AssistantMessage(
        content=[ThinkChunk(thinking="first the city, then the unit."), TextChunk(text="Let me check.")],
        tool_calls=[ToolCall(id="call00001", function=FunctionCall(name="get_weather", arguments=ARGS)),
                    ToolCall(id="call00002", function=FunctionCall(name="get_time", arguments="{}"))],
    )
    ids = _assistant_ids(tok, message)
    assert tok.token_id("[THINK]") in ids and ids.count(tok.token_id("[TOOL_CALLS]")) == 2
    out = parse_output(tok, ids)
    assert out.reasoning == "first the city, then the unit."
    assert out.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("get_weather", {"location": "Paris"}),
                                                                          ("get_time", {})]
    assert all(len(c.id) == 9 and c.id.isalnum() and c.id.isascii() for c in out.tool_calls)
    assert out.tool_calls[0].id != out.tool_calls[1].id
    # streamed: the deltas add up to the same split, tool calls arrive whole
    parser = ChatParser(tok)
    deltas = [parser.push(t) for t in ids] + [parser.finish()]
    assert "".join(d.reasoning for d in deltas) == out.reasoning
    assert "".join(d.content for d in deltas) == out.content
    calls = [c for d in deltas for c in d.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in out.tool_calls]
    # the special tokens are hidden from the decoded text, the split still holds
    assert "[THINK]" not in tok.decode(ids) and "first the city" in tok.decode(ids)


def test_parse_plain_answer_and_disabled_parsers(tok):
    ids = _assistant_ids(tok, AssistantMessage(content="Sunny today."))
    out = parse_output(tok, ids)
    assert (out.content, out.reasoning, out.tool_calls) == ("Sunny today.", "", [])
    call_ids = _assistant_ids(tok, AssistantMessage(tool_calls=[ToolCall(id="call00001", function=FunctionCall(
        name="get_weather", arguments=ARGS))]))
    assert parse_output(tok, call_ids, parse_tools=False).tool_calls == []


def test_sentencepiece_plain_layout():
    spm = default_tokenizer()
    prompt = encode_chat(spm, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello"}])
    assert spm.decode(prompt.ids, skip_special=False) == "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]Hello[/INST]"
    with pytest.raises(InputError, match="tekken"):
        encode_chat(spm, [{"role": "user", "content": "hi"}], tools=TOOLS)
