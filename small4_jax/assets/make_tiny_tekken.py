"""Build the bundled tiny Tekken v15 tokenizer, `tiny_tekken.json`, for serving the tiny model with chat.

Run from anywhere:

    python small4_jax/assets/make_tiny_tekken.py [OUTPUT_PATH]

The file has the layout of Mistral Small 4's `tekken.json` (ARCHITECTURE.md §5.1) at toy size, so mistral-common
encodes the real v15 chat format with it (system prompt, tools, `[MODEL_SETTINGS]`, `[THINK]`, tool calls):

    0 .. 39    special tokens with the ids of the real file: <unk>=0, <s>=1, </s>=2, [INST]=3, [/INST]=4, ...,
               [TOOL_CALLS]=9, ..., [SYSTEM_PROMPT]=17, [/SYSTEM_PROMPT]=18, [ARGS]=32, [CALL_ID]=33, [THINK]=34,
               [/THINK]=35, [MODEL_SETTINGS]=36, [/MODEL_SETTINGS]=37; the gaps are "<SPECIAL_n>" fillers
    40 .. 511  byte-level BPE: the 256 bytes, then merges learnt from the fixed text below

so vocab_size is 512, as in configs/tiny.yaml. `model_settings_builder` accepts reasoning_effort none|high
(default none), like Small 4's file, and the `image` settings are Small 4's (patch 14, merge 2, longest side 1540), so
mistral-common encodes image chats ([IMG]=10, [IMG_BREAK]=12, [IMG_END]=13) as for the real model. Deterministic: the same code always writes the same bytes.
"""

import base64
import json
import re
import sys
from collections import Counter
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "tiny_tekken.json"
VOCAB_SIZE = 512
NUM_SPECIAL = 40
# Mistral's pre-tokenisation pattern (as in its tekken files).
PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NAMED_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
    13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]",
    37: "[/MODEL_SETTINGS]",
}
WORDS = (
    "the a an and or of to in on for with is are was be it this that you we they he she what which who how why "
    "hello hi world weather today tomorrow city paris london tokyo rome temperature degrees sunny rain cloudy "
    "answer question think reason step first then so because therefore result number two three four five sum "
    "function tool call get_weather location unit celsius name arguments value please thanks user assistant "
    "system prompt brief model reads writes book list sort python code error file data time day good yes no"
).split()


def corpus() -> list[str]:
    """Fixed text: every word in a few contexts, with JSON and punctuation the chat format uses."""
    lines = []
    for i, w in enumerate(WORDS):
        nxt = WORDS[(i * 7 + 3) % len(WORDS)]
        lines.append(f"{w.capitalize()} {w} {nxt}, {w}. {nxt}? ({w}) {i % 10}")
    lines.append('{"type": "function", "function": {"name": "get_weather", "description": "", "parameters": {}}}')
    lines.append('{"location": "Paris", "unit": "celsius"} {"reasoning_effort": "none"} {"reasoning_effort": "high"}')
    return lines


def train_byte_bpe(lines: list[str], size: int) -> list[bytes]:
    """The 256 bytes, then the most frequent adjacent pair merged until `size` tokens (every token is reachable)."""
    words = Counter()
    for line in lines:
        for word in re.findall(r" ?\w+| ?[^\w\s]+|\s+", line):
            words[tuple(bytes([b]) for b in word.encode("utf-8"))] += 1
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    while len(vocab) < size:
        pairs = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            raise SystemExit(f"corpus too small: only {len(vocab)} tokens")
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties broken by the bytes: deterministic
        if a + b not in known:
            vocab.append(a + b)
            known.add(a + b)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return vocab


def build() -> dict:
    vocab = train_byte_bpe(corpus(), VOCAB_SIZE - NUM_SPECIAL)

    def token_str(b: bytes):
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return None

    specials = [NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(NUM_SPECIAL)]
    return {
        "config": {
            "pattern": PATTERN,
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": len(vocab) + NUM_SPECIAL,
            "default_num_special_tokens": NUM_SPECIAL,
            "version": "v15",
        },
        "vocab": [
            {"rank": i, "token_bytes": base64.b64encode(b).decode("ascii"), "token_str": token_str(b)}
            for i, b in enumerate(vocab)
        ],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
        "model_settings_builder": {
            "reasoning_effort": {"type": "enum", "values": ["none", "high"], "default": "none", "accepts_none": True}
        },
        # Small 4's image settings (ARCHITECTURE.md §3.4): 14-pixel patches merged 2x2, longest side 1540.
        "image": {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2},
    }


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    out.write_text(json.dumps(build(), indent=None, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
