"""Offline generation through the engine: one prompt streamed to a terminal, or a JSONL file of prompts.

Input lines (`--input prompts.jsonl`), one JSON object each; the first of these keys present is the prompt:
    {"messages": [{"role": "user", "content": "..."}, ...]}   chat (also with "tools", "reasoning_effort")
    {"prompt": "..."}                                         text (chat-formatted with --chat)
    {"prompt_ids": [1, 2, 3]}                                 ids, used as given
plus optional "id", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "system", "stop".
Output lines (`--output out.jsonl`), in input order: {"id", "token_ids", "text", "finish_reason"} and, for chat,
"reasoning_content" and "tool_calls". A malformed line is an InputError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from infer.chat import ChatPrompt, encode_chat, parse_output
from infer.engine import RequestOutput, SamplingOptions
from small4_jax.errors import InputError, Small4Error

_OPTION_KEYS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "min_p": "min_p", "seed": "seed", "stop": "stop"}


@dataclasses.dataclass
class Item:
    id: object
    prompt: ChatPrompt
    options: SamplingOptions
    chat: bool
    parse_tools: bool = False


def chat_messages(text: str, system: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def make_item(tokenizer, row: dict, defaults: SamplingOptions, *, chat: bool, system: str | None,
              reasoning_effort: str | None, index: int) -> Item:
    """One request from a JSONL row (or from the command line, as a row)."""
    overrides = {}
    for key, field in _OPTION_KEYS.items():
        if key in row:
            overrides[field] = tuple(row[key]) if key == "stop" and isinstance(row[key], list) else row[key]
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = (overrides["stop"],)
    options = dataclasses.replace(defaults, **overrides)
    effort = row.get("reasoning_effort", reasoning_effort)
    tools = row.get("tools")
    if "messages" in row or (chat and "prompt" in row):
        if tokenizer is None:
            raise InputError("chat needs a tokenizer")
        messages = row["messages"] if "messages" in row else chat_messages(row["prompt"], row.get("system", system))
        if not isinstance(messages, list):
            raise InputError("messages must be a list")
        prompt = encode_chat(tokenizer, messages, tools=tools, tool_choice=row.get("tool_choice"),
                             reasoning_effort=effort)
        return Item(row.get("id", index), prompt, options, True, bool(tools) and row.get("tool_choice") != "none")
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids) or not ids:
            raise InputError("prompt_ids must be a non-empty list of integers")
        return Item(row.get("id", index), ChatPrompt(list(ids), []), options, False)
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise InputError("prompt must be a non-empty string")
        if tokenizer is None:
            raise InputError("a text prompt needs a tokenizer")
        return Item(row.get("id", index), ChatPrompt(tokenizer.encode(row["prompt"], bos=True), []), options, False)
    raise InputError('each line needs "messages", "prompt" or "prompt_ids"')


def read_items(path: str, tokenizer, defaults: SamplingOptions, **kwargs) -> list[Item]:
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"--input {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise InputError("expected a JSON object")
            items.append(make_item(tokenizer, row, defaults, index=len(items), **kwargs))
        except ValueError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        except Small4Error as e:
            raise InputError(f"{path}:{n}: {e}") from None
    if not items:
        raise InputError(f"--input {path}: no prompts")
    return items


def result_row(tokenizer, item: Item, out: RequestOutput) -> dict:
    ids = out.token_ids
    row = {"id": item.id, "token_ids": ids, "finish_reason": out.finish_reason}
    if item.chat:
        parsed = parse_output(tokenizer, item.prompt.forced + ids, parse_tools=item.parse_tools)
        row["text"] = parsed.content
        row["reasoning_content"] = parsed.reasoning
        row["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
        if parsed.tool_calls and out.finish_reason == "stop":
            row["finish_reason"] = "tool_calls"
    else:
        row["text"] = out.text if tokenizer is not None else ""
    return row
