"""Smoke tests of benchmarks/decode.py (--small) and benchmarks/serve_load.py: they run and report sane numbers."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import decode  # noqa: E402
import serve_load  # noqa: E402

from small4_jax.config import Small4Config  # noqa: E402


def test_decode_benchmark_small(capsys, tmp_path):
    md = tmp_path / "RESULTS.md"
    assert decode.main(["--small", "--no-peer", "--iters", "2", "--batches", "1,4", "--contexts", "32",
                        "--markdown", str(md)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 32), (4, 32)]
    assert all(r["tokens_per_s"] > 0 and r["floor_ms"] > 0 and r["ttft_ms"] > 0 for r in rows)
    assert "| 4 | 32 |" in md.read_text()


def test_floor_bytes_of_the_proxy():
    """8-layer bf16 proxy at batch 1: attention + router + 5 experts per layer, plus the lm_head and the cache."""
    config = Small4Config.from_yaml(REPO / "configs" / "small4-119b.yaml").replace(num_hidden_layers=8)
    per_layer = 28_049_408 + 524_288 + 5 * 3 * 4096 * 2048  # attention, router, 4 + 1 experts (ARCHITECTURE.md §1.8)
    expected = 2 * (8 * per_layer + 4096 * 131072 + 4096) + 1024 * 640 * 8
    assert decode.floor_bytes(config, "bfloat16", 1, 1024) == expected


def test_serve_load_small():
    result = serve_load.run(None, requests=8, concurrency=4, max_tokens=4)
    assert result["ok"] == 8 and result["failed"] == 0 and result["output_tokens"] == 32
