"""Fine-tuning data: mistral-finetune JSONL rows -> token ids + loss mask -> packed rows with segment ids.

Row schema (mistral-finetune's, plus reasoning chunks):
- pretraining: {"text": "..."}: every token is trained on;
- instruct: {"messages": [...], "tools": [...]?}: roles system / user / assistant / tool. Assistant `content` is a
  string or a list of chunks {"type": "text", "text"} / {"type": "thinking", "thinking"} ([THINK] ... [/THINK]);
  assistant `tool_calls`: [{"id": 9 alphanumerics, "type": "function", "function": {"name", "arguments": JSON
  string}}], each answered by a {"role": "tool", "tool_call_id", "content"} message; `"weight": 0` on an assistant
  message leaves it out of the loss; the last message is the assistant's.
Loss is on assistant tokens only (their text, reasoning, tool calls and closing </s>). User `content` may also be a list
of text and image chunks ({"type": "image_url", "image_url": "data:..." or {"url": ...}}, or {"type": "image",
"image": ...}); an image is a data: URL or a file inside the JSONL file's directory (small4_jax.inputs.images: never a
fetch), tokenised with its pixels by mistral-common (tekken.json with image settings); its features fill the
[IMG] tokens (the vision encoder and projector stay frozen).

Tokenisation follows the checkpoint's tokenizer. For tekken.json the chat layout is mistral-common's own encoder
(`InstructTokenizer.encode_*_message`, called message by message exactly as `encode_instruct` does, so the ids equal
mistral-common's and each message's span is known). For sentencepiece the same v13 layout is written here from the
tokenizer's control tokens: <s> [SYSTEM_PROMPT]s[/SYSTEM_PROMPT] [AVAILABLE_TOOLS]json[/AVAILABLE_TOOLS] (before
the first user turn) [INST]u[/INST] [THINK]r[/THINK]a [TOOL_CALLS]name[ARGS]args </s> [TOOL_RESULTS]c[/TOOL_RESULTS].

Packing: examples are shuffled by seed, then packed greedily into rows of `seq_len` (+1 for the shifted target); each
document gets its own segment id (attention never crosses documents) and positions restarting at 0; an example
longer than a row is truncated (counted in the stats); a row whose trained tokens would all be cut off is an error
naming file:line, and so is a line that is not valid UTF-8. Batches are a pure function of (seed, step): epoch e visits
the rows in permutation(seed, e), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from small4_jax.errors import InputError
from small4_jax.inputs.images import is_image_part, prepare_messages
from small4_jax.inputs.tokenizer import TekkenTokenizer

ROLES = ("system", "user", "assistant", "tool")
_TOOL_ID = re.compile(r"[A-Za-z0-9]{9}")


class DataError(InputError):
    """One or more dataset rows are invalid; the message lists each as file:line: reason."""


@dataclasses.dataclass(frozen=True)
class RowError:
    file: str
    line: int  # 1-based; 0 for a whole-file problem
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


# ----------------------------------------------------------------------------------------------------------------------
# Validation.
def _content_text(content: Any, role: str, where: str) -> str | None:
    """None if fine, else the reason."""
    if isinstance(content, str):
        return None
    if role == "user" and isinstance(content, list):  # text and image chunks (mistral-finetune's image rows)
        for j, chunk in enumerate(content):
            ok = is_image_part(chunk) or (isinstance(chunk, dict) and chunk.get("type") == "text"
                                          and isinstance(chunk.get("text"), str))
            if not ok:
                return (f"{where}: content[{j}] must be {{'type': 'text', 'text': str}} or an image "
                        "{'type': 'image_url', 'image_url': 'data:...'}")
        return None
    if role != "assistant" or not isinstance(content, list):
        return f"{where}: content must be a string"
    for j, chunk in enumerate(content):
        if not isinstance(chunk, dict):
            return f"{where}: content[{j}] must be an object"
        kind = chunk.get("type")
        if kind == "text" and isinstance(chunk.get("text"), str):
            continue
        if kind == "thinking" and isinstance(chunk.get("thinking"), str):
            continue
        return f"{where}: content[{j}] must be {{'type': 'text', 'text': str}} or {{'type': 'thinking', 'thinking': str}}"
    return None


def validate_row(row: Any) -> str | None:
    """None for a valid row, else a one-line reason."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "text" in row and "messages" not in row:
        return None if isinstance(row["text"], str) and row["text"] else "'text' must be a non-empty string"
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "expected a non-empty 'messages' list or a 'text' string"
    tools = row.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "'tools' must be a list"
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return f"tools[{j}]: expected {{'type': 'function', 'function': {{'name': ...}}}}"
    open_calls: set[str] = set()
    seen_user = False
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            return f"{where}: expected an object"
        role = m.get("role")
        if role not in ROLES:
            return f"{where}: unknown role {role!r}; expected one of {list(ROLES)}"
        if "weight" in m and m["weight"] not in (0, 1):
            return f"{where}: weight must be 0 or 1, got {m['weight']!r}"
        calls = m.get("tool_calls") if role == "assistant" else None
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                return f"{where}: tool_calls must be a list"
            for j, c in enumerate(calls):
                w = f"{where}.tool_calls[{j}]"
                if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
                    return f"{w}: expected {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}"
                cid = c.get("id")
                if not isinstance(cid, str) or not _TOOL_ID.fullmatch(cid):
                    return f"{w}: id {cid!r} must be 9 letters or digits"
                fn = c["function"]
                if not isinstance(fn.get("name"), str) or not fn["name"]:
                    return f"{w}: function.name must be a non-empty string"
                args = fn.get("arguments")
                if not isinstance(args, str):
                    return f"{w}: function.arguments must be a JSON string, got {type(args).__name__}"
                try:
                    json.loads(args)
                except json.JSONDecodeError:
                    return f"{w}: function.arguments is not valid JSON: {args[:40]!r}"
                open_calls.add(cid)
            if m.get("content") in (None, ""):
                continue
        if role == "tool":
            cid = m.get("tool_call_id")
            if cid not in open_calls:
                return f"{where}: tool_call_id {cid!r} answers no earlier tool call"
            open_calls.discard(cid)
        if "content" not in m:
            return f"{where}: missing content"
        reason = _content_text(m["content"], role, where)
        if reason:
            return reason
        if role == "user":
            seen_user = True
        elif role == "assistant" and not seen_user:
            return f"{where}: assistant message before any user message"
    if msgs[-1].get("role") != "assistant":
        return f"the last message must be the assistant's, got {msgs[-1].get('role')!r}"
    if not any(m.get("role") == "assistant" and m.get("weight", 1) for m in msgs):
        return "every assistant message has weight 0: nothing to train on"
    return None


def prompt_reason(row: Any, reply: dict | None = None) -> str | None:
    """None if `row` is a valid prompt for generation ({"messages": [... ending with a user or tool turn], "tools"?})
    that `reply` (an assistant message; default an empty one) would validly answer, else a one-line reason: the
    prompt rows of preference and RL data (train/dpo.py, train/grpo.py)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "expected a non-empty 'messages' list (the prompt conversation)"
    last = msgs[-1].get("role") if isinstance(msgs[-1], dict) else None
    if last not in ("user", "tool"):
        return f"the prompt's last message must be the user's or a tool's, got {last!r}"
    reply = reply if reply is not None else {"role": "assistant", "content": ""}
    return validate_row({"messages": msgs + [reply], **({"tools": row["tools"]} if "tools" in row else {})})


def read_jsonl(paths: Sequence[str | Path],
               validate=validate_row) -> tuple[list[tuple[str, int, dict]], list[RowError]]:
    """All valid rows as (file, line, row) and every bad row as a RowError; blank lines are skipped. `validate`: the
    row check (SFT rows by default; train/dpo.py's preference pairs, train/grpo.py's prompts)."""
    rows, errors = [], []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            errors.append(RowError(str(p), 0, "file not found"))
            continue
        n = 0
        with p.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                n += 1
                try:  # strict: replacement characters would train the model on U+FFFD
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    errors.append(RowError(str(p), line_no, f"not valid UTF-8 (byte {e.start + 1} of the line)"))
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.append(RowError(str(p), line_no, f"bad JSON ({e.msg} at column {e.colno})"))
                    continue
                reason = validate(row)
                if reason:
                    errors.append(RowError(str(p), line_no, reason))
                else:
                    rows.append((str(p), line_no, row))
        if n == 0:
            errors.append(RowError(str(p), 0, "empty file (no rows)"))
    return rows, errors


# ----------------------------------------------------------------------------------------------------------------------
# Tokenisation.
def _chunks(content) -> list[tuple[str, str]]:
    if isinstance(content, str):
        return [("text", content)] if content else []
    return [(c["type"], c.get("text", c.get("thinking", ""))) for c in content]


class SentencePieceChat:
    """The v13 instruct layout over a sentencepiece tokenizer's control tokens (module docstring)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.sp = {name: tokenizer.token_id(name) for name in (
            "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[THINK]", "[/THINK]")}

    def _text(self, s: str) -> list[int]:
        return self.tok.encode(s, bos=False) if s else []

    def encode(self, row: dict, *, for_generation: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, train mask) of a messages row; with for_generation the row ends with a user/tool turn (a prompt)."""
        sp, ids, mask = self.sp, [self.tok.bos_id], [False]
        tools = row.get("tools")
        first_user = True

        def add(tokens, train=False):
            ids.extend(tokens)
            mask.extend([train] * len(tokens))

        for m in row["messages"]:
            role = m["role"]
            if role == "system":
                add([sp["[SYSTEM_PROMPT]"], *self._text(m["content"]), sp["[/SYSTEM_PROMPT]"]])
            elif role == "user":
                if first_user and tools:
                    add([sp["[AVAILABLE_TOOLS]"], *self._text(json.dumps(tools, ensure_ascii=False)),
                         sp["[/AVAILABLE_TOOLS]"]])
                first_user = False
                add([sp["[INST]"], *self._text(m["content"]), sp["[/INST]"]])
            elif role == "tool":
                add([sp["[TOOL_RESULTS]"], *self._text(m["content"]), sp["[/TOOL_RESULTS]"]])
            else:
                out = []
                for kind, text in _chunks(m.get("content") or ""):
                    out += [sp["[THINK]"], *self._text(text), sp["[/THINK]"]] if kind == "thinking" else self._text(text)
                for c in m.get("tool_calls") or []:
                    fn = c["function"]
                    out += [sp["[TOOL_CALLS]"], *self._text(fn["name"]), sp["[ARGS]"], *self._text(fn["arguments"])]
                add(out + [self.tok.eos_id], train=bool(m.get("weight", 1)))
        return ids, mask


class TekkenChat:
    """mistral-common's instruct encoder, message by message, recording which ids each assistant message produced."""

    def __init__(self, tokenizer):
        self.mt = tokenizer.mistral_tokenizer()

    def encode(self, row: dict, *, for_generation: bool = False, images: list | None = None,
               image_dir=None) -> tuple[list[int], list[bool]]:
        """(ids, loss mask); the preprocessed images of the row are appended to `images` (in [IMG] order)."""
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        messages = [{k: v for k, v in m.items() if k != "weight"} for m in row["messages"]]
        messages, n_images = prepare_messages(messages, image_dir)
        if n_images and getattr(self.mt.instruct_tokenizer, "image_encoder", None) is None:
            raise DataError("the row has images but the tokenizer has no image settings ('image' in tekken.json)")
        for m in messages:
            if m["role"] == "assistant" and isinstance(m.get("content"), list):
                m["content"] = [{"type": "thinking", "thinking": c["thinking"]} if c["type"] == "thinking" else c
                                for c in m["content"]]
        weights = [m.get("weight", 1) for m in row["messages"] if m["role"] == "assistant"]
        request = ChatCompletionRequest.from_openai(messages=messages, tools=row.get("tools"))
        inst = self.mt.instruct_tokenizer
        from mistral_common.protocol.instruct.validator import ValidationMode

        validator = type(self.mt._chat_completion_request_validator)(mode=ValidationMode.finetuning)
        request = validator.validate_request(request)  # as encode_chat_completion, in fine-tuning mode
        normalized = self.mt._instruct_request_normalizer.from_chat_completion_request(request)
        first_user, last_user = inst.find_first_last_user(normalized)
        ids, mask = list(inst.start()), [False] * len(inst.start())
        n_assistant = 0
        for i, msg in enumerate(normalized.messages):
            train = False
            if isinstance(msg, UserMessage):
                toks, imgs = inst.encode_user_message(msg, normalized.available_tools, i == last_user,
                                                      i == first_user, system_prompt=normalized.system_prompt,
                                                      force_img_first=True, settings=normalized.settings)[:2]
                if images is not None:
                    images.extend(np.asarray(im, np.float32) for im in imgs or ())
            elif isinstance(msg, ToolMessage):
                toks = inst.encode_tool_message(msg, i < last_user)[0]
            elif isinstance(msg, AssistantMessage):
                toks = inst.encode_assistant_message(message=msg, is_before_last_user_message=i < last_user)
                train = bool(weights[n_assistant]) if n_assistant < len(weights) else True
                n_assistant += 1
            elif isinstance(msg, SystemMessage):
                toks = inst.encode_system_message(msg)[0]
            else:
                raise DataError(f"unsupported message type {type(msg).__name__}")
            toks = toks or []
            ids.extend(toks)
            mask.extend([train] * len(toks))
        return ids, mask


def chat_encoder(tokenizer):
    return TekkenChat(tokenizer) if isinstance(tokenizer, TekkenTokenizer) else SentencePieceChat(tokenizer)


def encode_row(row: dict, tokenizer, chat=None, images: list | None = None,
               image_dir=None) -> tuple[list[int], list[bool]]:
    """(ids, loss mask) of one valid row; mask[i] says whether token i is a training target. The row's preprocessed
    images are appended to `images` (image parts need a tekken.json tokenizer)."""
    if "messages" not in row:
        ids = tokenizer.encode(row["text"], bos=True, eos=True)
        return ids, [False] + [True] * (len(ids) - 1)
    chat = chat or chat_encoder(tokenizer)
    if isinstance(chat, TekkenChat):
        return chat.encode(row, images=images, image_dir=image_dir)
    if any(isinstance(m.get("content"), list) and any(is_image_part(c) for c in m["content"])
           for m in row["messages"]):
        raise DataError("image chunks need a tekken.json tokenizer with image settings")
    return chat.encode(row)


def prompt_ids(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """Ids of a conversation that ends with a user (or tool) turn, ready for generation (no assistant reply yet)."""
    chat = chat_encoder(tokenizer)
    if isinstance(chat, TekkenChat):
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        req = ChatCompletionRequest.from_openai(messages=messages, tools=tools)
        return list(chat.mt.encode_chat_completion(req).tokens)
    return chat.encode({"messages": messages, "tools": tools})[0]


# ----------------------------------------------------------------------------------------------------------------------
# Packing and batching.
@dataclasses.dataclass
class Packed:
    """Rows of seq_len: inputs, targets (next ids), weights (1.0 where the target is trained), segment ids (0 =
    padding), positions (per document)."""

    inputs: np.ndarray  # [N, S] int32
    targets: np.ndarray  # [N, S] int32
    weights: np.ndarray  # [N, S] float32
    segments: np.ndarray  # [N, S] int32
    positions: np.ndarray  # [N, S] int32
    # per row, the preprocessed images whose features fill its [IMG] inputs, in order (empty lists: text only)
    images: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def has_images(self) -> bool:
        return any(self.images)

    def take(self, idx) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self) if f.name != "images"}

    def take_images(self, idx) -> list:
        """The images of rows `idx`, row after row (the order of their [IMG] tokens in `take(idx)["inputs"]`)."""
        return [im for i in np.asarray(idx).reshape(-1) for im in (self.images[i] if self.images else ())]


def pack(examples: Sequence[tuple], seq_len: int, pad_id: int) -> tuple[Packed, int]:
    """Greedy packing in the given order of (ids, mask) or (ids, mask, images) examples; returns (rows, number of
    truncated examples). An example's images go with it (load_dataset refuses one whose images a cut would split)."""
    rows: list[list[tuple]] = [[]]
    used, truncated = 0, 0
    for ex in examples:
        ids, mask, imgs = ex[0], ex[1], (ex[2] if len(ex) > 2 else [])
        n = len(ids) - 1  # (input, target) pairs this example yields
        if n <= 0:
            continue
        if n > seq_len:
            ids, mask, n = ids[: seq_len + 1], mask[: seq_len + 1], seq_len
            truncated += 1
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask, imgs))
        used += n
    rows = [r for r in rows if r]
    shape = (len(rows), seq_len)
    out = Packed(np.full(shape, pad_id, np.int32), np.full(shape, pad_id, np.int32), np.zeros(shape, np.float32),
                 np.zeros(shape, np.int32), np.zeros(shape, np.int32))
    out.images = [[im for _, _, imgs in docs for im in imgs] for docs in rows]
    for r, docs in enumerate(rows):
        at = 0
        for seg, (ids, mask, _) in enumerate(docs, 1):
            n = len(ids) - 1
            out.inputs[r, at:at + n] = ids[:-1]
            out.targets[r, at:at + n] = ids[1:]
            out.weights[r, at:at + n] = np.asarray(mask[1:], np.float32)
            out.segments[r, at:at + n] = seg
            out.positions[r, at:at + n] = np.arange(n)
            at += n
    return out, truncated


@dataclasses.dataclass
class DataStats:
    files: int
    rows: int
    tokens: int  # total ids of all examples
    train_tokens: int  # ids in the loss
    packed_rows: int
    truncated: int


def load_dataset(paths: Sequence[str | Path], tokenizer, seq_len: int, seed: int) -> tuple[Packed, DataStats]:
    """Read, validate, tokenise, shuffle (by seed) and pack. DataError lists every bad row before anything else."""
    rows, errors = read_jsonl(paths)
    if errors:
        raise DataError(f"{len(errors)} bad row(s):\n" + "\n".join(f"  {e}" for e in errors))
    chat = chat_encoder(tokenizer)
    examples = []
    for file, line, row in rows:
        images: list = []
        try:
            examples.append((*encode_row(row, tokenizer, chat, images, image_dir=Path(file).parent), images))
        except Exception as e:  # the tokenizer's own checks (mistral-common validation, ...)
            errors.append(RowError(file, line, f"cannot be tokenised: {e}"))
        else:
            # A row longer than seq_len is cut to its first seq_len + 1 ids; if no trained target survives the cut
            # (a long prompt), its weights would all be zero: an error rather than a row that trains on nothing.
            ids, mask, _ = examples[-1]
            if images and len(ids) > seq_len + 1 and any(t in _image_ids(tokenizer) for t in ids[seq_len:]):
                errors.append(RowError(file, line, f"{len(ids)} tokens with images: cut to data.seq_len = {seq_len} "
                                                   "it would split an image; raise data.seq_len or use smaller "
                                                   "images"))
                continue
            if len(ids) > seq_len + 1 and not any(mask[1:seq_len + 1]):
                first = next((i for i, m in enumerate(mask) if m and i > 0), len(ids))
                errors.append(RowError(file, line, f"{len(ids)} tokens and the first trained one is token {first + 1}: "
                                                   f"cut to data.seq_len = {seq_len} it trains on nothing; shorten "
                                                   "the prompt or raise data.seq_len"))
    if errors:
        raise DataError(f"{len(errors)} bad row(s):\n" + "\n".join(f"  {e}" for e in errors))
    order = np.random.default_rng(seed).permutation(len(examples))
    packed, truncated = pack([examples[i] for i in order], seq_len, tokenizer.pad_id or 0)
    stats = DataStats(len(paths), len(rows), sum(len(e[0]) for e in examples),
                      int(packed.weights.sum()), len(packed), truncated)
    return packed, stats


def _image_ids(tokenizer) -> set[int]:
    out = set()
    for piece in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"):
        try:
            out.add(tokenizer.token_id(piece))
        except Exception:  # noqa: BLE001 - a tokenizer without the piece
            pass
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_indices(num_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row indices of batch `step`: global positions step*B .. step*B+B-1 over per-epoch permutations."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_rows)
        out.append(_epoch_order(num_rows, seed, epoch)[i])
    return np.asarray(out)
