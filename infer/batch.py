"""Offline generation through the engine: one prompt streamed to a terminal, or a JSONL file of prompts.

Input lines (`--input prompts.jsonl`), one JSON object each; the first of these keys present is the prompt:
    {"messages": [{"role": "user", "content": "..."}, ...]}   chat (also with "tools", "reasoning_effort")
    {"prompt": "..."}                                         text (chat-formatted with --chat)
    {"prompt_ids": [1, 2, 3]}                                 ids, used as given
plus optional "id", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "system", "stop", and
"adapter" (one of the --lora NAME=DIR adapters; default --adapter, else the base model).
Output lines (`--output out.jsonl`), in input order: {"id", "token_ids", "text", "finish_reason"} and, for chat,
"reasoning_content" and "tool_calls". A malformed line is an InputError naming the file and line.

Nothing is lost: the whole input is checked and the output opened before the model is built; each result is written
and flushed as soon as the results before it are; a rerun with the same --output skips the ids already there
(a line cut short by a kill is dropped and redone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from infer.chat import ChatPrompt, encode_chat, parse_output
from infer.engine.engine import RequestOutput, SamplingOptions
from small4_jax.errors import InputError, OutputError, Small4Error
from small4_jax.inputs.images import file_part

_OPTION_KEYS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "min_p": "min_p", "seed": "seed", "stop": "stop"}


@dataclasses.dataclass
class Item:
    id: object
    prompt: ChatPrompt
    options: SamplingOptions
    chat: bool
    parse_tools: bool = False
    adapter: str | None = None  # the multi-LoRA adapter it runs with (None: the base model)


def chat_messages(text: str, system: str | None, images=()) -> list[dict]:
    """System + user turn; `images` (file paths) go before the text, as image parts."""
    messages = [{"role": "system", "content": system}] if system else []
    if images:
        parts = [file_part(p) for p in images] + [{"type": "text", "text": text}]
        return messages + [{"role": "user", "content": parts}]
    return messages + [{"role": "user", "content": text}]


def make_item(tokenizer, row: dict, defaults: SamplingOptions, *, chat: bool, system: str | None,
              reasoning_effort: str | None, index: int, images=(), adapter: str | None = None,
              adapters=()) -> Item:
    """One request from a JSONL row (or from the command line, as a row; `images`: --image files, chat only).
    adapter: the default adapter name; adapters: the names a row's "adapter" may take."""
    item = _make_item(tokenizer, row, defaults, chat=chat, system=system, reasoning_effort=reasoning_effort,
                      index=index, images=images)
    item.adapter = row.get("adapter", adapter)
    if item.adapter is not None and item.adapter not in adapters:
        raise InputError(f"adapter {item.adapter!r} is not one of the --lora NAME=DIR adapters "
                         f"({', '.join(adapters) or 'none given'})")
    return item


def _make_item(tokenizer, row: dict, defaults: SamplingOptions, *, chat: bool, system: str | None,
               reasoning_effort: str | None, index: int, images=()) -> Item:
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
        messages = (row["messages"] if "messages" in row
                    else chat_messages(row["prompt"], row.get("system", system), images))
        if not isinstance(messages, list):
            raise InputError("messages must be a list")
        prompt = encode_chat(tokenizer, messages, tools=tools, tool_choice=row.get("tool_choice"),
                             reasoning_effort=effort)
        return Item(row.get("id", index), prompt, options, True, bool(tools) and row.get("tool_choice") != "none")
    if images:
        raise InputError("--image needs a chat prompt: use --chat (or --system) with --prompt")
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


def read_items(path: str, tokenizer, defaults: SamplingOptions, vocab_size: int | None = None,
               max_len: int | None = None, **kwargs) -> list[Item]:
    """Every line of `path` as an Item; the first bad line is an InputError naming path:line."""
    items = []
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise InputError(f"--input {path}: {e.strerror}") from None
    ids = set()
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise InputError("expected a JSON object")
            item = make_item(tokenizer, row, defaults, index=len(items), **kwargs)
            bad = [t for t in item.prompt.ids if vocab_size is not None and not 0 <= t < vocab_size]
            if bad:
                raise InputError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
            check_length(item, max_len)
            key = json.dumps(item.id)
            if key in ids:
                raise InputError(f"id {item.id!r} appears twice; each line needs its own id")
            ids.add(key)
            items.append(item)
        except ValueError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        except Small4Error as e:
            raise InputError(f"{path}:{n}: {e}") from None
    if not items:
        raise InputError(f"--input {path}: no prompts")
    return items


def check_length(item: Item, max_len: int | None) -> None:
    if max_len is not None and len(item.prompt.ids) >= max_len:
        raise InputError(f"prompt has {len(item.prompt.ids)} tokens but the model's context is {max_len} "
                         "(--max-model-len); shorten the prompt")


class ResultWriter:
    """The results of a batch, one JSONL line each, in input order, flushed as soon as written.

    Opened before the model is built, so a bad --output fails at once. An existing --output file is resumed: the ids
    it holds are skipped (`todo` is what is left), a last line cut short by a kill is dropped. Without a path the
    lines go to stdout.
    """

    def __init__(self, path: str | None, items: list[Item], input_path: str = "--input"):
        self.path = path
        done: set[str] = set()
        if path is None:
            self._file = None
        else:
            if os.path.exists(path) and os.path.exists(input_path) and os.path.samefile(path, input_path):
                raise InputError(f"--output {path}: the same file as --input")
            try:
                self._file = open(path, "a+b")  # noqa: SIM115 - closed by close()
            except OSError as e:
                raise InputError(f"--output {path}: {e.strerror}") from None
            self._file.seek(0)
            data = self._file.read()
            keep = data[: data.rfind(b"\n") + 1]  # a line without its newline was cut short: redo it
            wanted = {json.dumps(it.id) for it in items}
            for n, line in enumerate(keep.splitlines(), 1):
                try:
                    key = json.dumps(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{path}:{n}: not a result line of this tool; remove the file or choose "
                                     "another --output") from None
                if key not in wanted:
                    raise InputError(f"{path}:{n}: id {json.loads(line)['id']!r} is not in {input_path}; these "
                                     "are results of another input: remove the file or choose another --output")
                done.add(key)
            if len(keep) < len(data):
                self._file.truncate(len(keep))
        self.todo = [it for it in items if json.dumps(it.id) not in done]
        self.skipped = len(items) - len(self.todo)
        self.written = self.skipped  # complete result lines in the file
        self._pending: dict[int, dict] = {}
        self._next = 0

    def add(self, i: int, row: dict) -> None:
        """The result of todo[i]; written with every result before it that is ready."""
        self._pending[i] = row
        while self._next in self._pending:
            line = (json.dumps(self._pending.pop(self._next), ensure_ascii=False) + "\n").encode("utf-8")
            if self._file is None:
                sys.stdout.write(line.decode("utf-8"))
                sys.stdout.flush()
            else:
                try:
                    self._file.write(line)
                    self._file.flush()
                except OSError as e:  # a full disk: stop at once, saying what is safe (a cut line is redone)
                    raise OutputError(f"--output {self.path}: writing a result failed ({e.strerror or e}); "
                                      f"{self.written} results are safe in it, and a rerun with the same --output "
                                      "skips them") from None
            self._next += 1
            self.written += 1

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # the buffered bytes of a failed write; the failure was reported where it happened
                pass
            self._file = None


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
