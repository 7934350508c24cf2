"""Chat: OpenAI-style messages to prompt ids, and generated ids back to content, reasoning and tool calls.

Encoding (ARCHITECTURE.md §5.2). For a `tekken.json` tokenizer the prompt is built by mistral-common
(`ChatCompletionRequest.from_openai` + `MistralTokenizer.encode_chat_completion`), so the ids are exactly
mistral-common's: system prompt, `[AVAILABLE_TOOLS]`, `[MODEL_SETTINGS]{"reasoning_effort": ...}` (v15), turns,
tool calls and `[TOOL_RESULTS]`. `tool_choice`:
- "auto" (default): tools are listed and the model decides;
- "none": tools are left out of the prompt and calls are not parsed;
- "required" / {"type": "function", "function": {"name": N}}: the model must call (that) tool. The server forces it
  with a grammar (`infer.structured`, reasoning allowed first); without one (no llguidance, or
  `force_prefix=True`), the assistant turn is started with `[TOOL_CALLS]` (and `N[ARGS]`), ids that are part of
  the prompt, not of the output.
Sentencepiece tokenizers (the bundled tiny one) have no mistral-common chat model here; they get the plain
`<s>[SYSTEM_PROMPT]..[/SYSTEM_PROMPT][INST]..[/INST]answer</s>` layout, without tools or settings.

Decoding works on token ids, so it does not depend on special tokens being visible in the text:
`[THINK]...[/THINK]` becomes `reasoning_content`, `[TOOL_CALLS]name[ARGS]{json}` (repeated for parallel calls)
becomes OpenAI tool calls with fresh 9-character alphanumeric ids, everything else is `content`. `ChatParser` is
incremental: `push(id)` returns the delta to stream (a tool call's id and name once its name ends, then its
arguments as they decode, in OpenAI's streaming form).
"""

from __future__ import annotations

import dataclasses
import secrets
import string
from collections.abc import Sequence

import numpy as np

from small4_jax.errors import InputError, TokenizerError
from small4_jax.inputs.images import image_hash, prepare_messages
from small4_jax.inputs.tokenizer import StreamDecoder, TekkenTokenizer, Tokenizer

REASONING_EFFORTS = ("none", "high")  # what Mistral Small 4's tokenizer (v15 [MODEL_SETTINGS]) knows
# what clients send (OpenAI's values, Mistral's SDK adds xhigh and max); `ReasoningPolicy` maps them onto the model's
CLIENT_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max", "auto")
DEFAULT_EFFORT_MAP = {"minimal": "none", "low": "high", "medium": "high", "xhigh": "high", "max": "high"}
_ALPHANUMERIC = string.ascii_letters + string.digits


def tool_call_id() -> str:
    """A 9-character alphanumeric id, as Mistral's servers make for tool calls."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


@dataclasses.dataclass
class ChatPrompt:
    ids: list[int]  # the whole prompt, forced prefix included
    forced: list[int]  # ids that start the assistant turn (tool_choice), already in `ids`; parse them as output
    # Preprocessed images [C, H, W] (mistral-common's), in the order of their [IMG] runs in `ids`, and their
    # content hashes (small4_jax.inputs.images.image_hash), e.g. to key a prefix cache.
    images: list = dataclasses.field(default_factory=list)
    image_hashes: list[str] = dataclasses.field(default_factory=list)


def model_efforts(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The reasoning_effort values the tokenizer's chat format takes (v15: its [MODEL_SETTINGS] enum)."""
    if isinstance(tokenizer, TekkenTokenizer):
        try:
            builder = tokenizer.mistral_tokenizer().instruct_tokenizer.tokenizer.model_settings_builder
            values = tuple(str(v) for v in builder.reasoning_effort.values)
            if values:
                return values
        except Exception:  # older tokenizers have no model settings: mistral-common then refuses the field itself
            pass
    return REASONING_EFFORTS


@dataclasses.dataclass(frozen=True)
class ReasoningPolicy:
    """How a client's `reasoning_effort` becomes one the model knows (server flags `--reasoning-effort-map`,
    `--reasoning-effort-default`).

    A value the model knows is used as is; another one goes through `mapping` (default `DEFAULT_EFFORT_MAP`:
    minimal -> none; low, medium, xhigh, max -> high). "auto" and an absent field mean `default` (None: the
    model's own default, i.e. no setting is sent)."""

    mapping: tuple[tuple[str, str], ...] = tuple(DEFAULT_EFFORT_MAP.items())
    default: str | None = None

    @classmethod
    def parse(cls, mapping: str | None = None, default: str | None = None) -> ReasoningPolicy:
        """From the flags' text: mapping "low=none,medium=high" (on top of the defaults)."""
        table = dict(DEFAULT_EFFORT_MAP)
        for item in (mapping or "").split(","):
            if not item.strip():
                continue
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or key not in CLIENT_EFFORTS or key == "auto" or not value:
                raise InputError(f"--reasoning-effort-map {item!r}: expected CLIENT=MODEL with CLIENT one of "
                                 f"{', '.join(CLIENT_EFFORTS[:-1])}")
            table[key] = value
        if default is not None and default not in CLIENT_EFFORTS[:-1]:
            raise InputError(f"--reasoning-effort-default {default!r}: expected one of {', '.join(CLIENT_EFFORTS[:-1])}")
        return cls(tuple(table.items()), default)

    def resolve(self, effort: str | None, known: Sequence[str]) -> str | None:
        if effort is None or effort == "auto":
            effort = self.default
            if effort is None:
                return None
        if effort in known:
            return effort
        if effort not in CLIENT_EFFORTS:
            raise InputError(f"reasoning_effort must be one of {list(CLIENT_EFFORTS)}, got {effort!r}")
        mapped = dict(self.mapping).get(effort)
        if mapped not in known:
            raise InputError(f"reasoning_effort {effort!r} maps to {mapped!r}, which this model does not know "
                             f"(it takes {list(known)}); see --reasoning-effort-map")
        return mapped


def _thinking_text(chunk: dict, where: str) -> str:
    """The text of a thinking content chunk: mistral-common's (`thinking` a string) or Mistral's API's (`thinking` a
    list of text chunks)."""
    value = chunk.get("thinking")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(c, dict) and isinstance(c.get("text", ""), str) for c in value):
        return "".join(c.get("text", "") for c in value)
    raise InputError(f"{where}.thinking: expected a string or a list of text chunks")


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Assistant turns as clients send their reasoning back: `reasoning_content` or `reasoning` (OpenAI-compatible
    servers), or thinking content chunks (Mistral's API), all become one `reasoning_content` string, which
    mistral-common encodes as `[THINK]...[/THINK]` before the turn's text. Other messages are returned as given."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            out.append(m)
            continue
        m = dict(m)
        thoughts = []
        if isinstance(m.get("content"), list):
            parts = []
            for j, c in enumerate(m["content"]):
                if isinstance(c, dict) and c.get("type") == "thinking":
                    thoughts.append(_thinking_text(c, f"messages[{i}].content[{j}]"))
                else:
                    parts.append(c)
            m["content"] = parts if parts else None
        given = [m.pop(k) for k in ("reasoning_content", "reasoning") if k in m]
        given = [g for g in given if g is not None]
        if any(not isinstance(g, str) for g in given):
            raise InputError(f"messages[{i}].reasoning_content: expected a string")
        if len(set(given)) > 1:
            raise InputError(f"messages[{i}]: 'reasoning_content' and 'reasoning' differ; send one")
        thoughts += given[:1]
        if thoughts:
            m["reasoning_content"] = "".join(thoughts)
        if m.get("prefix") is False:  # Mistral's SDK may send `prefix: false` (the default: a complete turn)
            del m["prefix"]
        out.append(m)
    return out


def _special(tokenizer: Tokenizer, piece: str) -> int | None:
    try:
        return tokenizer.token_id(piece)
    except TokenizerError:
        return None


def _tool_choice_name(tool_choice) -> str | None:
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(name, str) or not name:
            raise InputError('tool_choice must be "none", "auto", "required", "any" or '
                             '{"type": "function", "function": {"name": ...}}')
        return name
    if tool_choice not in (None, "auto", "none", "required"):
        raise InputError(f'tool_choice must be "none", "auto", "required", "any" or a function, got {tool_choice!r}')
    return None


ROLES = ("system", "user", "assistant", "tool")


def check_shape(messages, tools) -> None:
    """The structure of `messages` and `tools`, checked here so a mistake is named (`messages[1]: 'content' is
    missing`) instead of surfacing as mistral-common's validation error against the wrong field."""
    if not isinstance(messages, (list, tuple)):
        raise InputError("messages: expected a list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}]: expected an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role: {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        said = m.get("tool_calls") or m.get("reasoning_content") or m.get("reasoning")
        if "content" not in m and not (m["role"] == "assistant" and said):
            raise InputError(f"messages[{i}]: 'content' is missing")
        if m.get("content") is None and m["role"] != "assistant":
            raise InputError(f"messages[{i}].content: null; expected a string or a list of content parts")
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise InputError(f"messages[{i}].content: expected a string or a list of content parts, "
                             f"got {type(m['content']).__name__}")
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise InputError("tools: expected a list of {type: function, function: {name, parameters}} objects")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise InputError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        f = t.get("function")
        if not isinstance(f, dict):
            raise InputError(f"tools[{i}].function: expected an object with 'name' and 'parameters'")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise InputError(f"tools[{i}].function.name: expected a non-empty string, got {f.get('name')!r}")
        if not isinstance(f.get("parameters", {}), dict):
            raise InputError(f"tools[{i}].function.parameters: expected a JSON Schema object")
        check_schema(f.get("parameters") or {}, f"tools[{i}].function.parameters")
        if not isinstance(f.get("description", ""), (str, type(None))):
            raise InputError(f"tools[{i}].function.description: expected a string")


def check_schema(schema, where: str) -> None:
    """InputError naming `where` and the place inside the schema where `schema` breaks its JSON Schema meta-schema
    (the draft its `$schema` names, else the newest), regular expressions included."""
    from jsonschema.exceptions import SchemaError  # (mistral-common's dependency, imported with it)
    from jsonschema.validators import validator_for

    if not isinstance(schema, (dict, bool)):
        raise InputError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        inside = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise InputError(f"{where}{inside}: not a valid JSON schema: {e.message}") from None


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] | None = None,
    tool_choice=None,
    reasoning_effort: str | None = None,
    image_dir=None,
    force_prefix: bool = True,
) -> ChatPrompt:
    """Prompt ids for an OpenAI-style conversation; InputError (naming the problem) for a malformed one.

    Image parts (`image_url` with a `data:` URL; local files only inside `image_dir`) are checked by
    small4_jax.inputs.images and tokenised with their pixels by mistral-common.

    force_prefix: start the assistant turn with the forced tool call's ids (tool_choice required / named); False
    where a grammar (`infer.structured`) forces the call instead, which also lets reasoning come first.
    """
    if not messages:
        raise InputError("messages must be a non-empty list")
    check_shape(messages, tools)
    messages = normalize_messages(messages)
    if reasoning_effort is not None and reasoning_effort not in model_efforts(tokenizer):
        raise InputError(f"reasoning_effort must be one of {list(model_efforts(tokenizer))}, got {reasoning_effort!r}")
    if tool_choice == "any":  # Mistral's name for "required"
        tool_choice = "required"
    name = _tool_choice_name(tool_choice)
    if tool_choice == "none":
        tools = None
    elif tool_choice is not None and tool_choice != "auto" and not tools:
        raise InputError(f"tool_choice {tool_choice!r} needs tools")
    if name is not None and name not in [(t.get("function") or {}).get("name") for t in tools]:
        raise InputError(f"tool_choice names {name!r}, which is not among the tools")
    messages, n_images = prepare_messages(messages, image_dir)
    images = []
    if isinstance(tokenizer, TekkenTokenizer):
        ids, images = _encode_mistral_common(tokenizer, messages, tools, reasoning_effort, n_images)
    elif n_images:
        raise InputError("images need a tekken.json tokenizer with image settings (mistral-common chat format)")
    else:
        ids = _encode_plain(tokenizer, messages, tools, reasoning_effort)
    forced = []
    if force_prefix and (tool_choice == "required" or name is not None):
        forced = [tokenizer.token_id("[TOOL_CALLS]")]
        if name is not None:
            forced += tokenizer.encode(name, bos=False) + [tokenizer.token_id("[ARGS]")]
    return ChatPrompt(ids + forced, forced, images, [image_hash(im) for im in images])


def _encode_mistral_common(tokenizer: TekkenTokenizer, messages, tools, reasoning_effort, n_images=0):
    """(ids, preprocessed images) from mistral-common's encode_chat_completion."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    mt = tokenizer.mistral_tokenizer()
    if n_images and getattr(mt.instruct_tokenizer, "image_encoder", None) is None:
        raise InputError(f"{tokenizer.path}: this tokenizer has no image settings ('image' in tekken.json); the "
                         "request has images")
    kwargs = {}
    if reasoning_effort is not None:
        kwargs["reasoning_effort"] = reasoning_effort
    try:
        request = ChatCompletionRequest.from_openai(list(messages), tools=list(tools) if tools else None, **kwargs)
        encoded = mt.encode_chat_completion(request)
        return list(encoded.tokens), [np.asarray(im, np.float32) for im in encoded.images]
    except Exception as e:  # mistral-common raises pydantic, ValueError and its own exception types
        raise InputError(f"invalid chat request: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" for c in content):
        return "".join(str(c.get("text", "")) for c in content)
    raise InputError("message content must be a string or a list of text parts")


def _encode_plain(tokenizer: Tokenizer, messages, tools, reasoning_effort) -> list[int]:
    if tools:
        raise InputError("tools need a tekken.json tokenizer (mistral-common chat format)")
    if reasoning_effort not in (None, "none"):
        raise InputError("reasoning_effort needs a tekken.json tokenizer (mistral-common chat format)")
    ids = [tokenizer.bos_id]
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        text = _text(m.get("content")) if isinstance(m, dict) else ""
        if role == "system":
            ids += [tokenizer.token_id("[SYSTEM_PROMPT]"), *tokenizer.encode(text, bos=False),
                    tokenizer.token_id("[/SYSTEM_PROMPT]")]
        elif role == "user":
            ids += [tokenizer.token_id("[INST]"), *tokenizer.encode(text, bos=False), tokenizer.token_id("[/INST]")]
        elif role == "assistant":
            ids += [*tokenizer.encode(text, bos=False), tokenizer.eos_id]
        else:
            raise InputError(f"message role must be system, user or assistant here, got {role!r}")
    return ids


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as generated

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


@dataclasses.dataclass
class ChatDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)  # calls completed by this token
    # OpenAI's streaming form of the calls' progress: {"index", "id", "type", "function": {"name", "arguments": ""}}
    # once a call's name is known, then {"index", "function": {"arguments": fragment}} as its arguments decode;
    # the fragments of a call concatenate to its final `arguments`
    tool_call_deltas: list[dict] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.tool_call_deltas)


class ChatParser:
    """Splits generated ids into content, reasoning and tool calls as they arrive.

    A tool call's arguments stream as they decode (leading and trailing whitespace held back, as the complete
    call's arguments are stripped; "{}" for none), so the streamed fragments and the final call agree."""

    def __init__(self, tokenizer: Tokenizer, *, parse_tools: bool = True, parse_reasoning: bool = True):
        self.tokenizer = tokenizer
        ids = {p: _special(tokenizer, p) for p in ("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]")}
        self.think = ids["[THINK]"] if parse_reasoning else None
        self.end_think = ids["[/THINK]"] if parse_reasoning else None
        self.tool_calls_id = ids["[TOOL_CALLS]"] if parse_tools else None
        self.args_id = ids["[ARGS]"] if parse_tools else None
        self.mode = "content"
        self._decoder = StreamDecoder(tokenizer)
        self._name: list[int] = []
        self._call: ToolCall | None = None  # the call whose arguments are streaming
        self._held = ""  # trailing whitespace of the arguments, sent only if more text follows
        self.content = ""
        self.reasoning = ""
        self.tool_calls: list[ToolCall] = []

    def push(self, token_id: int) -> ChatDelta:
        delta = ChatDelta()
        t = int(token_id)
        if t in (self.think, self.end_think, self.tool_calls_id) and t is not None:
            self._flush_text(delta)
            self._close_call(delta)
            self.mode = {self.think: "reasoning", self.end_think: "content", self.tool_calls_id: "name"}[t]
        elif self.mode == "name" and t == self.args_id:
            self._open_call(delta)
            self.mode = "args"
        elif self.mode == "name":
            self._name.append(t)
        elif self.mode == "args":
            self._add_args(delta, self._decoder.push(t))
        else:
            self._add_text(delta, self._decoder.push(t))
        return delta

    def finish(self) -> ChatDelta:
        delta = ChatDelta()
        self._flush_text(delta)
        self._close_call(delta)
        return delta

    def _add_text(self, delta: ChatDelta, text: str) -> None:
        if self.mode == "reasoning":
            delta.reasoning += text
            self.reasoning += text
        else:
            delta.content += text
            self.content += text

    def _flush_text(self, delta: ChatDelta) -> None:
        if self.mode in ("content", "reasoning"):
            self._add_text(delta, self._decoder.flush())
            self._decoder = StreamDecoder(self.tokenizer)

    def _open_call(self, delta: ChatDelta) -> None:
        call = ToolCall(tool_call_id(), self.tokenizer.decode(self._name).strip(), "")
        self._name, self._held, self._call = [], "", call
        self._decoder = StreamDecoder(self.tokenizer)
        self.tool_calls.append(call)
        delta.tool_call_deltas.append({"index": len(self.tool_calls) - 1, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}})

    def _add_args(self, delta: ChatDelta, text: str) -> None:
        call = self._call
        if not call.arguments and not self._held:
            text = text.lstrip()
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            call.arguments += body
            delta.tool_call_deltas.append({"index": len(self.tool_calls) - 1, "function": {"arguments": body}})

    def _close_call(self, delta: ChatDelta) -> None:
        if self.mode == "name" and self._name:  # cut off before [ARGS]: the call has no arguments
            self._open_call(delta)
            self.mode = "args"
        if self.mode == "args" and self._call is not None:
            self._add_args(delta, self._decoder.flush())
            self._decoder = StreamDecoder(self.tokenizer)
            if not self._call.arguments:
                self._call.arguments = "{}"
                delta.tool_call_deltas.append({"index": len(self.tool_calls) - 1, "function": {"arguments": "{}"}})
            delta.tool_calls.append(self._call)
        self._name, self._held, self._call = [], "", None


def parse_output(tokenizer: Tokenizer, ids: Sequence[int], **kwargs) -> ChatParser:
    """Parse all of `ids` at once; read `.content`, `.reasoning`, `.tool_calls` from the result."""
    parser = ChatParser(tokenizer, **kwargs)
    for t in ids:
        parser.push(t)
    parser.finish()
    return parser
