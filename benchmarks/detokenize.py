"""Per-token host cost of streaming detokenisation (`small4_jax.inputs.tokenizer.StreamDecoder`) against output length.

    python benchmarks/detokenize.py                     # the real Tekken vocabulary (mistral-common's tekken_240911)
    python benchmarks/detokenize.py --lengths 1024 32768 --window 1000

A long text (this repository's sources and docs, plus emoji and CJK so byte-fallback tokens occur) is encoded with
the real 131K-token Tekken vocabulary and streamed through a decoder one id at a time. For each length L it reports
the median and mean microseconds per push over the `window` tokens ending at L; the ratio of the longest to the
shortest length is the acceptance figure (issue 13: within 1.5x at 32K vs 1K). `--full` also times the old way
(decode everything so far on every token) for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def real_tekken():
    import mistral_common

    from small4_jax.inputs.tokenizer import TekkenTokenizer

    return TekkenTokenizer(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")


def corpus_ids(tok, n: int) -> list[int]:
    texts = [p.read_text() for p in sorted(REPO.glob("**/*.py")) + sorted(REPO.glob("**/*.md"))]
    text = "\n".join(texts) + "\n日本語のテキスト 🙂👍🏽 café 🇫🇷\n"
    ids = tok.encode(text, bos=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def per_token_us(tok, ids, ends, window, full=False):
    """{end: (median, mean) microseconds per push over the `window` ids ending at `end`}."""
    from small4_jax.inputs.tokenizer import StreamDecoder

    dec = StreamDecoder(tok)
    out, times, done = {}, [], set(ends)
    for i, t in enumerate(ids, 1):
        t0 = time.perf_counter()
        if full:  # the old decoder: decode the whole output on every token
            dec_text = tok.decode(ids[:i])
            dec_text.endswith("\ufffd")
        else:
            dec.push(t)
        times.append((time.perf_counter() - t0) * 1e6)
        if i in done:
            w = times[-window:]
            out[i] = (statistics.median(w), statistics.mean(w))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--full", action="store_true", help="also time full re-decoding (slow at long lengths)")
    args = p.parse_args(argv)
    tok = real_tekken()
    ids = corpus_ids(tok, max(args.lengths))
    report = {"vocab_size": tok.vocab_size, "window": args.window}
    res = per_token_us(tok, ids, args.lengths, args.window)
    report["stream_us_per_token"] = {str(k): {"median": round(m, 2), "mean": round(a, 2)} for k, (m, a) in res.items()}
    lo, hi = min(args.lengths), max(args.lengths)
    report["ratio_median"] = round(res[hi][0] / res[lo][0], 3)
    report["ratio_mean"] = round(res[hi][1] / res[lo][1], 3)
    if args.full:
        short = [n for n in args.lengths if n <= 8192]
        full = per_token_us(tok, ids[: max(short)], short, args.window, full=True)
        report["full_decode_us_per_token"] = {str(k): round(m, 1) for k, (m, _) in full.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
