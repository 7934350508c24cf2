"""Per-token host cost of structured-output masks (`infer.structured.fill_masks`) with the real Tekken vocabulary.

    python benchmarks/structured_mask.py [--rows 1 16] [--repeats 5] [--walk 200]

Each case is timed twice: llguidance's mask alone (`canonical=False`), and narrowed to the canonical tokens
(`structured.Constrained.refine`: chunk junctions, BPE pair validity, lookahead through forced text), the default.
`canon_build_s` is the one-off cost of the canonical tables for this vocabulary (`TekkenTokenizer.canon()`).
Pair-validity rows (cached per previous token) are cleared before every pass, so repeats do not flatter them;
the per-tail class-string tables (a few hundred distinct tails, bounded) stay warm as in a running server.
Per row-token figures: median, mean and max of wall time over the walk, and the mean of process CPU time (what
counts on a shared machine) (free-string steps cost the most: most of the
vocabulary is allowed there and checked against the previous token).

mistral-common ships the real 131,072-token Tekken vocabulary (`tekken_240911.json`, a v3 file); this writes a
copy with Small 4's v15 layout (its special tokens at their ids, `[THINK]`, `[TOOL_CALLS]`, `[ARGS]`, ...; as
`small4_jax/assets/make_tiny_tekken.py` does at toy size) so mistral-common's grammar factory accepts it. For a JSON
schema answer and a forced tool call it walks a valid output token by token, filling the bitmask of `rows`
requests at each token (one llguidance call over all rows, as the engine does each step), and reports microseconds
per step and per row-token (median over the output, after one warm-up pass that compiles the grammar's lexer).
In the engine this runs on the host while the device computes the step's logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "small4_jax" / "assets"))


def real_v15_tekken(directory: Path):
    import mistral_common
    from make_tiny_tekken import NAMED_SPECIALS

    from small4_jax.inputs.tokenizer import TekkenTokenizer

    data = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    n = data["config"]["default_num_special_tokens"]
    data["config"]["version"] = "v15"
    data["special_tokens"] = [{"rank": i, "token_str": NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                              for i in range(n)]
    data["model_settings_builder"] = {
        "reasoning_effort": {"type": "enum", "values": ["none", "high"], "default": "none", "accepts_none": True}}
    path = directory / "tekken.json"
    path.write_text(json.dumps(data))
    return TekkenTokenizer(path)


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "hotel": {"type": "object", "properties": {"name": {"type": "string"}, "stars": {"enum": [1, 2, 3, 4, 5]}},
              "required": ["name", "stars"]}}, "required": ["city", "days", "tags", "hotel"]}
ANSWER = {"city": "Paris", "days": 4, "tags": ["museums", "food", "walks along the Seine"],
          "hotel": {"name": "Hôtel du Louvre", "stars": 4}}
TOOLS = [{"type": "function", "function": {"name": "book_trip", "parameters": SCHEMA}}]


def time_masks(tok, grammar, ids, rows, repeats, canonical):
    from infer import structured

    words = (tok.vocab_size + 31) // 32
    per_step, cpu = [], []
    for rep in range(repeats + 1):
        matchers = [structured.new_matcher(tok, grammar, canonical=canonical) for _ in range(rows)]
        tok.canon()._valid_cache.clear()  # pair-validity rows cold each pass (the class-string tables stay warm)
        mask = np.zeros((rows, words), np.int32)
        for t in ids:
            t0, c0 = time.perf_counter(), time.process_time()
            structured.fill_masks(tok, [(m, i) for i, m in enumerate(matchers)], mask)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            allowed = (mask[0, t // 32] >> (t % 32)) & 1
            assert allowed, f"token {t} of the valid output is masked"
            for m in matchers:
                assert m.consume_token(t)
            if rep:  # the first pass warms the lexer up
                per_step.append(dt)
                cpu.append(dc)
    med = statistics.median(per_step)
    return {"tokens": len(ids), "us_per_step": round(med * 1e6, 1), "us_per_row_token": round(med * 1e6 / rows, 1),
            "us_per_row_token_mean": round(statistics.mean(per_step) * 1e6 / rows, 1),
            "us_per_row_token_max": round(max(per_step) * 1e6 / rows, 1),
            "cpu_us_per_row_token_mean": round(statistics.mean(cpu) * 1e6 / rows, 1)}


def random_walk(tok, grammar, steps, seed=0):
    """A random model's worst case: each token drawn uniformly from the canonical mask (free JSON strings and keys,
    a cold pair-validity row after almost every token). Process CPU time of `refine` per token."""
    import random

    from infer import structured

    rng = random.Random(seed)
    m, fallbacks = structured.new_matcher(tok, grammar), 0
    cpu = []
    while len(cpu) < steps:
        if m.is_stopped():  # an answer ended ('{}' is one token): the next one
            fallbacks += m.fallbacks
            m = structured.new_matcher(tok, grammar)
        words = np.frombuffer(m.llm.compute_bitmask(), np.int32).copy()
        c0 = time.process_time()
        m.refine(words)
        cpu.append(time.process_time() - c0)
        allowed = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))
        m.consume_token(int(rng.choice(allowed)))
    return {"tokens": len(cpu), "cpu_us_per_token_median": round(statistics.median(cpu) * 1e6, 1),
            "cpu_us_per_token_mean": round(statistics.mean(cpu) * 1e6, 1), "fallbacks": fallbacks + m.fallbacks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--walk", type=int, default=200, help="tokens of the random-walk case")
    args = p.parse_args(argv)
    from infer import structured

    with tempfile.TemporaryDirectory() as d:
        tok = real_v15_tekken(Path(d))
        msgs = [{"role": "user", "content": "plan a trip"}]
        text = json.dumps(ANSWER, ensure_ascii=False)
        cases = {
            "json_schema": (structured.chat_grammar(tok, msgs, response_format={
                "type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}),
                tok.encode(text, bos=False) + [tok.eos_id]),
            "tool_call": (structured.chat_grammar(tok, msgs, tools=TOOLS, tool_choice="required"),
                          [tok.token_id("[TOOL_CALLS]"), *tok.encode("book_trip", bos=False), tok.token_id("[ARGS]"),
                           *tok.encode(text, bos=False), tok.eos_id]),
        }
        t0 = time.perf_counter()
        tok.canon()
        report = {"vocab_size": tok.vocab_size, "canon_build_s": round(time.perf_counter() - t0, 2)}
        for name, (grammar, ids) in cases.items():
            for rows in args.rows:
                for canonical in (False, True):
                    key = f"{name}_rows{rows}" + ("_canonical" if canonical else "_llguidance")
                    report[key] = time_masks(tok, grammar, ids, rows, args.repeats, canonical)
        report["json_object_random_walk_canonical"] = random_walk(
            tok, structured.chat_grammar(tok, msgs, response_format={"type": "json_object"}), args.walk)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
