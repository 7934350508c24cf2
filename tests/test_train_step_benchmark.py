"""Smoke test of benchmarks/train_step.py: `--small` runs on a CPU, passes its correctness gate against
transformers + PEFT and prints a table of real numbers; the FLOP convention on the proxy; no GPU -> exit 2.

Nothing is timed here beyond that one smoke run (about 30 s on a 2-core CPU).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "train_step.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import train_step  # noqa: E402

ROW = re.compile(r"^\| (small4_jax \((?:trainer|nnx) step\)|transformers\+peft) \| ([\d.]+) \| ([\d.]+)-([\d.]+) \| "
                 r"([\d,]+) \| ([\d.e+-]+) \| (-|[\d.]+%) \| (-|[\d.]+x) \|$")


def test_small_run_prints_the_table(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("first step vs transformers+peft:") and line.endswith(": ok") for line in lines)
    assert "| impl | median step ms | p10-p90 ms | tokens/s | model TFLOP/s | % of 989 TF | ours / peer |" in lines
    rows = [m.groups() for m in map(ROW.match, lines) if m]
    assert [r[0].split(" ")[0] for r in rows] == ["small4_jax", "transformers+peft"], proc.stdout
    for impl, median, p10, p90, tok_s, tflops, _, _ in rows:
        assert 0 < float(p10) <= float(median) <= float(p90), impl
        assert float(tok_s.replace(",", "")) > 0 and float(tflops) > 0, impl
    assert re.fullmatch(r"[\d.]+x", rows[0][7])  # ours / peer
    data = json.loads(out.read_text())
    ours, peer = data["rows"]
    assert abs(ours["loss"] - peer["loss"]) <= 1e-4 * abs(peer["loss"])  # float32 on both sides
    assert ours["tokens_per_s"] == pytest.approx(128 / ours["median_s"])
    assert ours["tflops"] == pytest.approx(data["flops_per_token"]["total"] * 128 / ours["median_s"] / 1e12)


def test_flops_of_the_proxy():
    """8 layers at the released width, seq 4096, r=8: the per-token count of the module docstring."""
    config = train_step.proxy_config(False, None)
    f = train_step.flops_per_token(config, 4096, 8, 8)
    per_layer = 28_049_408 + 524_288 + 5 * 3 * 4096 * 2048  # attention, router, 4 routed + 1 shared expert
    assert f["n_active"] == 8 * per_layer + 4096 * 131072  # + lm_head; the embedding is not a matmul
    assert f["linear"] == 4 * f["n_active"]  # forward + input gradients; no base weight gradients
    assert f["attention"] == 8 * 3 * 2 * 32 * (128 + 128) * 4097 / 2
    assert 0.004 < f["adapters"] / f["total"] < 0.01
    assert f["total"] == pytest.approx(7.934e9, rel=1e-3)


def test_proxy_without_a_gpu_exits_2(capsys):
    assert train_step.main([]) == 2
    assert "needs a GPU" in capsys.readouterr().err
