"""Structured output: llguidance grammars that force JSON (schema) answers and tool calls, as token masks.

The grammars come from mistral-common's `GrammarFactory` (Tekken tokenizers v11+): Lark grammars over the model's
own format, `[THINK]...[/THINK]` reasoning first where the tokenizer has think tokens, then either a JSON value
matching the schema (`response_format`) or `[TOOL_CALLS]name[ARGS]{json}` calls whose arguments match each tool's
parameters (`tool_choice` "required" / a named function; strict or not, the arguments are always a JSON object).
llguidance compiles a grammar into an `LLMatcher` per request; each step the engine asks every constrained row's
matcher for its allowed-token bitmask ([B, ceil(V/32)] int32, `batch_sampling.RowSampling.mask`), on the host
while the device computes the step's logits, and the sampler masks the logits on the device. After a token is
sampled the matcher consumes it.

llguidance (and jinja2, which mistral-common renders the grammars with) are imported only when a request asks for
structured output.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from small4_jax.errors import InputError
from small4_jax.tokenizer import TekkenTokenizer, Tokenizer

_lock = threading.Lock()
_EXECUTOR = None


def _factory(tokenizer: Tokenizer):
    """The (cached) mistral-common GrammarFactory of `tokenizer`; InputError where structured output is unavailable."""
    with _lock:
        factory = getattr(tokenizer, "_grammar_factory", None)
        if factory is not None:
            return factory
        if not isinstance(tokenizer, TekkenTokenizer):
            raise InputError("structured output (response_format, forced tool calls) needs a tekken.json tokenizer")
        try:
            from mistral_common.guidance.grammar_factory import GrammarFactory
        except ImportError as e:
            raise InputError(f"structured output needs mistral-common's guidance module: {e}") from None
        mt = tokenizer.mistral_tokenizer()
        if not GrammarFactory.is_supported(mt):
            raise InputError("structured output needs a Tekken tokenizer of version v11 or later")
        try:
            factory = GrammarFactory(mt)
        except ImportError as e:
            raise InputError(f"structured output needs llguidance and jinja2 (pip install llguidance): {e}") from None
        tokenizer._grammar_factory = factory
        return factory


JSON_OBJECT_SCHEMA = {"anyOf": [{"type": "object"}, {"type": "array"}]}  # mistral-common's json_object
# JSON laid out as json.dumps does (", " and ": ", no other whitespace), unless the schema sets its own layout
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _compact(schema: dict) -> dict:
    if not isinstance(schema, dict) or "x-guidance" in schema:
        return schema
    return {**schema, "x-guidance": _LAYOUT}


def available(tokenizer: Tokenizer) -> bool:
    """Whether structured output works with `tokenizer` here (Tekken v11+, llguidance installed)."""
    try:
        _factory(tokenizer)
        return True
    except InputError:
        return False


def chat_grammar(tokenizer: Tokenizer, messages, *, tools=None, tool_choice=None, response_format=None,
                 parallel_tool_calls: bool = True, reasoning: bool = False) -> str | None:
    """The Lark grammar a chat answer must match, or None when nothing is forced.

    Constrained: `response_format` json_object / json_schema, and `tool_choice` "required" or a named function.
    tool_choice "auto" and "none" with a text response are left free (the model may answer in text).

    Two edits to mistral-common's grammar, so the constraint holds whatever the weights: without `reasoning`
    (reasoning_effort none, where the format has no `[THINK]` section) the optional think section is removed, and
    under a forced tool choice no free text may precede the calls (mistral-common's think template allows it, so a
    model could write text until max_tokens and never call); a `[THINK]...[/THINK]` section before them stays
    allowed when reasoning is on.
    """
    if response_format is None:
        response_format = {"type": "text"}
    rtype = response_format.get("type") if isinstance(response_format, dict) else None
    if rtype not in ("text", "json_object", "json_schema"):
        raise InputError('response_format.type must be "text", "json_object" or "json_schema"')
    forced_tools = tool_choice == "required" or isinstance(tool_choice, dict)
    if rtype == "text" and not forced_tools:
        return None
    if rtype == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InputError("response_format.json_schema must be an object with a JSON schema under 'schema'")
    factory = _factory(tokenizer)
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kwargs = {}
    if rtype == "json_object":
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "json_object", "schema": _compact(JSON_OBJECT_SCHEMA), "strict": True}}
    elif rtype == "json_schema":  # the schema is enforced whatever `strict` says
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {
            **spec, "schema": _compact(spec.get("schema", {})), "strict": True}}
    if tools and forced_tools:  # calls must name one of the tools and match its parameters schema
        tools = [{**t, "function": {**t["function"], "strict": True,
                                    "parameters": _compact(t["function"].get("parameters") or {})}}
                 if isinstance(t, dict) and isinstance(t.get("function"), dict) else t for t in tools]
    try:
        request = ChatCompletionRequest.from_openai(
            list(messages), tools=list(tools) if tools else None, tool_choice=tool_choice or "auto",
            parallel_tool_calls=parallel_tool_calls, **kwargs)
        grammar = factory.get_grammar_for_chat_request(request, factory.select_jinja_template())
    except Exception as e:  # mistral-common raises pydantic, ValueError and its own exception types
        raise InputError(f"cannot build the output grammar: {type(e).__name__}: {str(e).splitlines()[0][:300]}") \
            from None
    return _edit(grammar, reasoning=reasoning, forced_tools=forced_tools and rtype == "text")


def _edit(grammar: str, *, reasoning: bool, forced_tools: bool) -> str:
    lines = grammar.split("\n")
    for i, line in enumerate(lines):
        if not reasoning and line.startswith(("body:", "json_grammar:")):
            lines[i] = line.replace("think? ", "").replace("think ", "")
        if forced_tools and line.startswith("fcalls:"):
            lines[i] = line.replace("fcalls: content? ", "fcalls: ").replace("fcalls: pretool_content? ", "fcalls: ")
    out = "\n".join(lines)
    if forced_tools and "content?" in out.split("fcalls:", 1)[-1].split("\n", 1)[0]:
        raise InputError("unexpected tool-call grammar from mistral-common (free text before forced calls)")
    return out


def json_schema_grammar(tokenizer: Tokenizer, schema: dict) -> str:
    """A grammar of exactly one JSON value matching `schema` (no reasoning, no text): for completions."""
    factory = _factory(tokenizer)
    return factory.get_lark_for_json_schema(factory.select_jinja_template(), schema)


def new_matcher(tokenizer: Tokenizer, grammar: str):
    """An llguidance matcher for `grammar`; InputError naming the problem for a grammar it rejects."""
    import llguidance as llg

    factory = _factory(tokenizer)
    matcher = llg.LLMatcher(factory.llg_tokenizer, llg.grammar_from("lark", grammar))
    if matcher.is_error():
        raise InputError(f"invalid output grammar: {matcher.get_error()}")
    return matcher


def fill_masks(tokenizer: Tokenizer, rows: list[tuple[object, int]], mask: np.ndarray) -> None:
    """Write the allowed-token bitmask of each (matcher, row) into `mask` [B, W] int32 (in parallel, off the GIL).

    Words past the tokenizer's vocabulary (a model vocabulary padded beyond it) are zeroed: never allowed."""
    global _EXECUTOR
    import llguidance as llg
    import llguidance.numpy as llnp

    if not rows:
        return
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor()
    words = (_factory(tokenizer).llg_tokenizer.vocab_size + 31) // 32
    buf = np.full((len(rows), words), -1, np.int32)
    llnp.fill_next_token_bitmask_par(_EXECUTOR, [(m, i) for i, (m, _) in enumerate(rows)], buf)
    for i, (_, row) in enumerate(rows):
        mask[row, : buf.shape[1]] = buf[i]
        mask[row, buf.shape[1] :] = 0


def parse_json(text: str):
    """json.loads with the error as an InputError (for tests and callers that validate)."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"not JSON: {e}") from None
