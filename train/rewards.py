"""Rewards for GRPO (train/grpo.py): built-in verifiable ones and a user's `module:function`.

`grpo.rewards` in the run config is a list of specs; a sample's reward is the sum of weight x each reward:

    rewards:
      - {type: exact}                                  # 1 if the reply equals the prompt row's "answer", else 0
      - {type: normalized, extract: "Answer: (.*)"}    # same after normalising (case, spaces, punctuation, 1.0 = 1)
      - {type: regex, pattern: "^Answer: \\d+$"}       # 1 if the pattern matches the reply (re.search), else 0
      - {type: json, required: [name, age]}            # 1 if the reply is a JSON object holding those keys, else 0
      - {type: length, target: 16, weight: 0.5}        # -min(1, max(0, tokens - target) / target)
      - {type: function, function: "my_pkg.rewards:score", weight: 1.0}

`extract` (exact / normalized): a regular expression; the reply's text is its first group's (or whole match's) text
at the last match; no match scores 0. A user function is called once per sample as

    score(reply: str, row: dict, token_ids: list[int]) -> float

with the reply's text (thinking segments removed), the prompt's JSONL row (its "messages", "answer" and any other
keys the user put there) and the generated token ids; it must return a finite number.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import string
from collections.abc import Callable, Sequence

from small4_jax.errors import ConfigError

TYPES = ("exact", "normalized", "regex", "json", "length", "function")
_KEYS = {"exact": {"extract"}, "normalized": {"extract"}, "regex": {"pattern"}, "json": {"required"},
         "length": {"target"}, "function": {"function"}}


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


def _answer(row: dict) -> str:
    answer = row.get("answer")
    return "" if answer is None else str(answer)


def build(specs: Sequence[dict], where: str = "grpo.rewards") -> Callable[[str, dict, list[int]], dict[str, float]]:
    """The reward function of a config: (reply, row, token_ids) -> {name: weighted value, ..., "reward": total}."""
    if not specs:
        raise ConfigError(f"{where}: list at least one reward")
    parts = []
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
        parts.append((spec.get("name", kind if kind != "function" else spec.get("function", "function")), float(weight),
                      _one(kind, spec, w)))

    def reward(reply: str, row: dict, token_ids: list[int]) -> dict[str, float]:
        out = {}
        for name, weight, fn in parts:
            value = float(fn(reply, row, token_ids))
            if not math.isfinite(value):
                raise ConfigError(f"{where}: reward {name} returned {value} (not finite)")
            out[name] = out.get(name, 0.0) + weight * value
        out["reward"] = sum(out.values())
        return out

    return reward


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
    """`module:function` -> the callable (module importable from the current directory or the Python path)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f"{where}: function must be 'module:function', got {ref!r}")
    mod, name = ref.split(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}: cannot load {ref} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"{where}: {ref} is not callable")
    return fn
