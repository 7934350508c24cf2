"""benchmarks/moe_gmm.py --small: every peer runs, passes the correctness gate, and the gate catches a wrong kernel."""

import jax.numpy as jnp
import pytest

from benchmarks import moe_gmm

ARGS = ["--small", "--tokens", "8", "--routings", "skewed", "--iters", "1"]


def test_small_benchmark_runs_every_peer_after_checking_it(capsys):
    results = moe_gmm.main(ARGS)
    out = capsys.readouterr().out
    level_a = [r for r in results if r["level"] == "A"]
    assert {(r["proj"], r["pass_"]) for r in level_a} == {("gate_up", "fwd"), ("gate_up", "dx"), ("down", "fwd"),
                                                          ("down", "dx")}
    for r in level_a:
        for name in ("pallas", "ragged_dot", "dense"):
            assert "time_s" in r["impls"][name], (r["proj"], r["pass_"], name, r["impls"][name])
        assert r["impls"]["pallas"]["rel_err"] < 1e-2
    block = [r for r in results if r["level"] == "B"]
    assert block and block[0]["impls"]["pallas"]["rel_err"] < 2e-2
    assert "speedup" in out and "interpret mode" in out


def test_correctness_gate_rejects_a_wrong_kernel(monkeypatch):
    monkeypatch.setattr(moe_gmm, "gmm", lambda a, b, s, transpose_rhs=False: jnp.zeros(
        (a.shape[0], b.shape[1] if transpose_rhs else b.shape[2]), a.dtype) + 1.0)
    with pytest.raises(AssertionError, match="relative error"):
        moe_gmm.main(ARGS + ["--levels", "A"])
