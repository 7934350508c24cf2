"""Rewards for GRPO (train/grpo.py): built-in verifiable ones and a user's `module:function`.

`grpo.rewards` in the run config is a list of specs; a sample's reward is the sum of weight x each reward:

    rewards:
      - {type: exact}                                  # 1 if the reply equals the prompt row's "answer", else 0
      - {type: normalized, extract: "Answer: (.*)"}    # same after normalising (case, spaces, punctuation, 1.0 = 1)
      - {type: regex, pattern: "^Answer: \\d+$"}       # 1 if the pattern matches the reply (re.search), else 0
      - {type: json, required: [name, age]}            # 1 if the reply is a JSON object holding those keys, else 0
      - {type: json_schema, schema: {type: object, required: [name]}}   # 1 if the reply's JSON validates, else 0
      - {type: json_schema, schema_key: schema}        # the same against the JSON schema in the row's "schema" key
      - {type: tool_call}                              # 1 if the reply's tool calls are valid for the row's "tools"
      - {type: tool_call, no_call: 1.0}               # ... and a reply without any call scores 1 (default 0)
      - {type: length, target: 16, weight: 0.5}        # -min(1, max(0, tokens - target) / target)
      - {type: function, function: "my_pkg.rewards:score", weight: 1.0}
      - {type: function, function: "rewards/mine.py:score"}   # a file, relative to the current directory

`exact` / `normalized` read the prompt row's "answer" (a row without one is a bad row). `extract`: a regular expression; the reply's text is its first group's (or whole match's) text
at the last match; no match scores 0. A user function is called once per sample as

    score(reply: str, row: dict, token_ids: list[int]) -> float

with the reply's text (thinking segments removed), the prompt's JSONL row (its "messages", "answer" and any other
keys the user put there) and the generated token ids; it must return a finite number (a function that cannot be
called that way is refused at start; one that raises or returns anything else stops the run naming it, the reply
and the row).

`json_schema`: the reply (surrounding whitespace ignored) must parse as JSON and validate against the JSON schema
given in the spec (`schema`) or in each prompt row under the key `schema_key` (a row without it, or with a value
that is not a valid schema, is a bad row: train.validate_data names it by file:line). Validation is `jsonschema`'s
(the schema's own `$schema` draft, Draft 2020-12 when it names none); a reply that is not JSON scores 0.

`tool_call`: the reply's tool calls (`[TOOL_CALLS]name[ARGS]{json}`, read from the generated token ids by the
server's own parser, `infer.chat.parse_output`, thinking segments skipped) are checked against the prompt row's
`tools` (OpenAI / Mistral function format, `{"type": "function", "function": {"name", "parameters"}}`; the key is
`tools_key`, default "tools"). The reply scores 1 when it makes at least one call and every call names a declared
tool and its arguments are a JSON object that validates against that tool's `parameters` schema (no `parameters`:
any object); 0 when any call fails. A reply with no call scores `no_call` (default 0: the reward is for calling
well; set 1.0 where declining to call is as good, e.g. rows whose right answer is plain text). A row without the
key declares no tools, so any call in its replies scores 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import jsonschema
import numpy as np

from infer.chat import parse_output
from small4_jax.errors import ConfigError

TYPES = ("exact", "normalized", "regex", "json", "json_schema", "tool_call", "length", "function")
_KEYS = {"exact": {"extract"}, "normalized": {"extract"}, "regex": {"pattern"}, "json": {"required"},
         "json_schema": {"schema", "schema_key"}, "tool_call": {"tools_key", "no_call"}, "length": {"target"},
         "function": {"function"}}


def normalize(text: str) -> str:
    """Lower case, punctuation (except inside numbers) and surrounding spaces dropped, spaces collapsed, numbers in
    canonical form (1.0 -> 1, 007 -> 7)."""
    def number(m):
        v = float(m.group(0).replace(",", ""))
        return str(int(v)) if v == int(v) else repr(v)

    text = re.sub(r"-?\d[\d,]*(\.\d+)?", number, text.lower())
    text = "".join(" " if c in string.punctuation and c not in ".-" else c for c in text)
    text = re.sub(r"(?<!\d)[.](?!\d)", " ", text)
    return " ".join(text.split())


def _extract(pattern: re.Pattern | None, text: str) -> str | None:
    if pattern is None:
        return text
    found = list(pattern.finditer(text))
    if not found:
        return None
    m = found[-1]
    return m.group(1) if m.groups() else m.group(0)


def _row_text(row: dict) -> str:
    text = json.dumps(row, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def _needs_answer(kind: str):
    return lambda row: None if "answer" in row else f"no 'answer' key (the {kind} reward compares the reply with it)"


def _answer(row: dict) -> str:
    answer = row.get("answer")
    return "" if answer is None else str(answer)


class Reward:
    """The reward of a config: `reward(reply, row, token_ids) -> {name: weighted value, ..., "reward": total}`;
    `check_row(row)` is None for a prompt row the rewards can score, else a one-line reason (a missing schema)."""

    def __init__(self, parts: list, checks: list, where: str):
        self.parts, self.checks, self.where = parts, checks, where

    def __call__(self, reply: str, row: dict, token_ids: list[int]) -> dict[str, float]:
        out = {}
        for name, weight, fn in self.parts:
            try:
                got = fn(reply, row, token_ids)
            except Exception as e:  # noqa: BLE001 - a user's reward: say which one failed, on what
                raise ConfigError(f"{self.where}: reward {name} raised {type(e).__name__}: {e} (on the reply "
                                  f"{reply[:80]!r} to the prompt row {_row_text(row)})") from e
            try:
                value = float(got) if not isinstance(got, (str, bytes)) and np.ndim(got) == 0 else None
            except (TypeError, ValueError):
                value = None
            if value is None:
                raise ConfigError(f"{self.where}: reward {name} returned {got!r}; expected a number")
            if not math.isfinite(value):
                raise ConfigError(f"{self.where}: reward {name} returned {value} (not finite)")
            out[name] = out.get(name, 0.0) + weight * value
        out["reward"] = sum(out.values())
        return out

    def check_row(self, row: dict) -> str | None:
        for check in self.checks:
            reason = check(row)
            if reason:
                return reason
        return None


def build(specs: Sequence[dict], where: str = "grpo.rewards", tokenizer=None) -> Reward:
    """The reward of a config's specs; `tokenizer` (the run's) is needed by `tool_call`, which parses token ids."""
    if not specs:
        raise ConfigError(f"{where}: list at least one reward")
    parts, checks = [], []
    for i, spec in enumerate(specs):
        w = f"{where}[{i}]"
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise ConfigError(f"{w}: expected a mapping with type one of {list(TYPES)}, got {spec!r}")
        kind = spec["type"]
        unknown = sorted(set(spec) - {"type", "weight", "name"} - _KEYS[kind])
        if unknown:
            raise ConfigError(f"{w}: unknown key(s) {unknown} for type {kind}; expected some of "
                              f"{sorted(_KEYS[kind] | {'weight', 'name'})}")
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{w}: weight must be a number, got {weight!r}")
        name = spec.get("name", kind if kind != "function" else spec.get("function", "function"))
        if kind == "json_schema":
            fn, check = _json_schema(spec, w)
        elif kind == "tool_call":
            fn, check = _tool_call(spec, w, tokenizer)
        elif kind in ("exact", "normalized"):
            fn, check = _one(kind, spec, w), _needs_answer(kind)
        else:
            fn, check = _one(kind, spec, w), None
        parts.append((name, float(weight), fn))
        if check is not None:
            checks.append(check)
    return Reward(parts, checks, where)


# ----------------------------------------------------------------------------------------------------------------------
# JSON-schema validity and tool calls.
class _Validators:
    """jsonschema validators by schema (rows repeat theirs), each schema checked once against its metaschema."""

    def __init__(self):
        self.cache: dict[str, jsonschema.protocols.Validator | str] = {}

    def get(self, schema) -> jsonschema.protocols.Validator | str:
        """The schema's validator, or a one-line reason it is not a JSON schema."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self.cache:
            if not isinstance(schema, (dict, bool)):
                self.cache[key] = f"expected a JSON schema (an object), got {type(schema).__name__}"
            else:
                cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
                try:
                    cls.check_schema(schema)
                    self.cache[key] = cls(schema)
                except jsonschema.SchemaError as e:
                    self.cache[key] = f"not a valid JSON schema ({e.message})"
        return self.cache[key]


def _json_schema(spec: dict, w: str):
    if ("schema" in spec) == ("schema_key" in spec):
        raise ConfigError(f"{w}: type json_schema needs exactly one of schema (a JSON schema) or schema_key (the "
                          "prompt row's key holding one)")
    validators = _Validators()
    if "schema" in spec:
        fixed = validators.get(spec["schema"])
        if isinstance(fixed, str):
            raise ConfigError(f"{w}: schema: {fixed}")
    else:
        key = spec["schema_key"]
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{w}: schema_key must be a row key name (a string), got {key!r}")

    def schema_of(row):
        return fixed if "schema" in spec else validators.get(row[key])

    def check(row):
        if "schema" in spec:
            return None
        if key not in row:
            return f"no '{key}' key (the JSON schema {w}.schema_key names)"
        got = validators.get(row[key])
        return f"'{key}': {got}" if isinstance(got, str) else None

    def valid(reply, row, ids):
        try:
            obj = json.loads(reply)
        except json.JSONDecodeError:
            return 0.0
        return float(schema_of(row).is_valid(obj))

    return valid, check


def _tool_call(spec: dict, w: str, tokenizer):
    if tokenizer is None:
        raise ConfigError(f"{w}: type tool_call parses the reply's token ids and needs the run's tokenizer")
    key = spec.get("tools_key", "tools")
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{w}: tools_key must be a row key name (a string), got {key!r}")
    no_call = spec.get("no_call", 0.0)
    if not isinstance(no_call, (int, float)) or isinstance(no_call, bool):
        raise ConfigError(f"{w}: no_call must be a number (the score of a reply without a tool call), got "
                          f"{no_call!r}")
    validators = _Validators()

    def declared(row) -> dict | str:
        """{tool name: validator of its parameters}, or a one-line reason the row's tools are unusable."""
        tools = row.get(key, [])
        if not isinstance(tools, list):
            return f"'{key}' must be a list of tools"
        out = {}
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return f"{key}[{j}]: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}"
            got = validators.get(fn.get("parameters", {"type": "object"}))
            if isinstance(got, str):
                return f"{key}[{j}].function.parameters: {got}"
            out[fn["name"]] = got
        return out

    def check(row):
        got = declared(row)
        return got if isinstance(got, str) else None

    def valid(reply, row, ids):
        calls = parse_output(tokenizer, ids).tool_calls
        if not calls:
            return float(no_call)
        tools = declared(row)
        for call in calls:
            if call.name not in tools:
                return 0.0
            try:
                args = json.loads(call.arguments)
            except json.JSONDecodeError:
                return 0.0
            if not isinstance(args, dict) or not tools[call.name].is_valid(args):
                return 0.0
        return 1.0

    return valid, check


def _compile(pattern, w: str, key: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ConfigError(f"{w}: {key} {pattern!r} is not a regular expression ({e})") from None


def _one(kind: str, spec: dict, w: str):
    if kind in ("exact", "normalized"):
        pattern = _compile(spec.get("extract"), w, "extract")
        norm = normalize if kind == "normalized" else str.strip

        def match(reply, row, ids):
            got = _extract(pattern, reply)
            return float(got is not None and norm(got) == norm(_answer(row)))

        return match
    if kind == "regex":
        if "pattern" not in spec:
            raise ConfigError(f"{w}: type regex needs a pattern")
        pattern = _compile(spec["pattern"], w, "pattern")
        return lambda reply, row, ids: float(pattern.search(reply) is not None)
    if kind == "json":
        required = spec.get("required", [])
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise ConfigError(f"{w}: required must be a list of key names")

        def valid(reply, row, ids):
            try:
                obj = json.loads(reply)
            except json.JSONDecodeError:
                return 0.0
            return float(isinstance(obj, dict) and all(k in obj for k in required))

        return valid
    if kind == "length":
        target = spec.get("target")
        if not isinstance(target, int) or isinstance(target, bool) or target <= 0:
            raise ConfigError(f"{w}: type length needs a positive integer target (tokens), got {target!r}")
        return lambda reply, row, ids: -min(1.0, max(0, len(ids) - target) / target)
    return load_function(spec.get("function"), w)


def load_function(ref, where: str) -> Callable:
    """`module:function` (importable from the current directory or the Python path) or `path/to/file.py:function`
    (relative to the current directory) -> the callable, checked to take (reply, row, token_ids)."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(f"{where}: function must be 'module:function' or 'path/to/file.py:function', got {ref!r}")
    mod, name = ref.split(":")
    try:
        if mod.endswith(".py"):
            path = Path(mod)
            if not path.is_file():
                raise ConfigError(f"{where}: {ref}: no file {path.resolve()}")
            spec = importlib.util.spec_from_file_location(f"small4_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod)
        fn = getattr(module, name)
    except ConfigError:
        raise
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}: cannot load {ref} ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while it was imported
        raise ConfigError(f"{where}: importing {mod} raised {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{where}: {ref} is not callable")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError:
        raise ConfigError(f"{where}: {ref}{inspect.signature(fn)} cannot be called as (reply, row, token_ids)") from None
    except ValueError:  # no signature to read (a builtin): called as documented
        pass
    return fn
