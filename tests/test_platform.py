"""Platform resolution follows the devices a program is placed on, and `moe_impl: auto`'s first-use self-check falls
back to ragged_dot with one warning when the kernel fails (the failure injected on this CPU machine)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from small4_jax import kernels, platform
from small4_jax.tools import aot
from small4_jax.nn import moe
from small4_jax.kernels.gmm import api as gmm_pkg
from small4_jax.kernels.gmm import pallas_triton


def _on_cpu(x):
    """`x` placed on the CPU: on a GPU machine (gpu_suite.sh's kernel tests) the default device is the GPU."""
    return jax.device_put(x, jax.devices("cpu")[0])


def test_cpu_arrays_and_meshes_resolve_to_cpu():
    x = _on_cpu(jnp.ones(4))
    mesh = jax.make_mesh((8,), ("expert",), devices=jax.devices("cpu"))
    assert platform.platform_of(x) == "cpu"
    assert platform.platform_of(mesh) == "cpu"
    if jax.default_backend() == "cpu":  # nothing placed: the default backend decides
        assert platform.platform_of() == "cpu"
    assert moe.resolve_impl("auto", x) == "ragged_dot"
    assert gmm_pkg.default_interpret(x)


@pytest.mark.gpu_compile
def test_gpu_devices_decide_over_the_default_backend():
    """Arrays placed on (compile-only) GPUs resolve to the GPU, whatever the default backend (the CPU here, the GPU
    in gpu_suite.sh): eagerly, under jit, inside a shard_map, and through the default device; the first argument that
    names devices wins."""
    mesh = aot.gpu_mesh("h100", {"data": 1, "expert": 8, "tensor": 1})
    assert platform.platform_of(mesh) == "gpu"
    assert platform.platform_of(_on_cpu(jnp.ones(2)), mesh) == "cpu"
    assert platform.platform_of(None, "auto", mesh.abstract_mesh) == "gpu"
    seen = {}

    def f(x):
        seen["jit"] = platform.platform_of(x)
        seen["impl"] = moe.resolve_impl("auto", x)
        seen["interpret"] = gmm_pkg.default_interpret(x)

        def body(y):
            seen["shard_map"] = platform.platform_of(y)
            return y

        return jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))(x)

    jax.jit(f).lower(aot.spec((16, 4), jnp.float32, mesh, P("expert")))
    assert seen == {"jit": "gpu", "impl": "pallas", "interpret": False, "shard_map": "gpu"}
    with jax.default_device(mesh.devices.flat[0]):
        assert platform.platform_of() == "gpu"


def test_self_check_compares_the_kernel_with_its_reference(monkeypatch):
    cpu = jax.devices("cpu")[0]
    kernels.gmm_self_check(cpu, interpret=True)  # the real kernel, interpreted: passes
    monkeypatch.setattr(pallas_triton, "gmm_pallas", lambda lhs, rhs, *a, **k: jnp.zeros(
        (lhs.shape[0], rhs.shape[1] if k["transpose_rhs"] else rhs.shape[2]), k["out_dtype"]))
    with pytest.raises(AssertionError, match="gmm differs from its reference"):
        kernels.gmm_self_check(cpu, interpret=True)


def _pretend_gpu(monkeypatch, check):
    """'auto' as on a machine with a GPU: the platform says GPU, and the self-check runs `check` on a device."""
    monkeypatch.setattr(moe, "_SELF_CHECK", {})
    monkeypatch.setattr(platform, "on_gpu", lambda *placed: True)
    monkeypatch.setattr(platform, "runnable_gpu", lambda: jax.devices("cpu")[0])
    monkeypatch.setattr(kernels, "gmm_self_check", check)


def test_auto_falls_back_to_ragged_dot_with_one_warning_when_the_kernel_fails(monkeypatch):
    if not pallas_triton.available():
        pytest.skip("this jax has no Pallas Triton backend")
    calls = []

    def broken(device):
        calls.append(device)
        raise RuntimeError("Failed to parse Triton module: 'arith.select' op failed to verify\nsecond line")

    _pretend_gpu(monkeypatch, broken)
    with pytest.warns(RuntimeWarning) as record:
        assert moe.resolve_impl("auto") == "ragged_dot"
    assert len(record) == 1
    msg = str(record[0].message)
    assert "RuntimeError: Failed to parse Triton module: 'arith.select' op failed to verify" in msg
    assert "second line" not in msg
    assert "falling back to 'ragged_dot'" in msg and "32x" in msg and "[rows, E, N]" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second check, no second warning
        assert moe.resolve_impl("auto") == "ragged_dot"
        assert moe.resolve_impl("pallas") == "pallas"  # an explicit choice is never second-guessed
    assert len(calls) == 1


def test_auto_picks_the_kernel_when_its_check_passes(monkeypatch):
    if not pallas_triton.available():
        pytest.skip("this jax has no Pallas Triton backend")
    _pretend_gpu(monkeypatch, lambda device: gmm_pkg.self_check(device, interpret=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert moe.resolve_impl("auto") == "pallas"
    assert moe._SELF_CHECK == {("cpu", 0): None}


def test_routed_experts_with_auto_runs_the_fallback_after_a_failed_check(monkeypatch):
    """The model-level path: a failing check makes `auto` compute with ragged_dot, which still matches dense."""
    if not pallas_triton.available():
        pytest.skip("this jax has no Pallas Triton backend")

    def broken(device):
        raise RuntimeError("ptxas fatal: out of registers")

    _pretend_gpu(monkeypatch, broken)
    rng = np.random.default_rng(0)
    e, h, f, n, k = 4, 16, 8, 6, 2
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, e, (n, k)), jnp.int32)
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    gate_up = jnp.asarray(rng.standard_normal((e, h, 2 * f)) * 0.3, jnp.float32)
    down = jnp.asarray(rng.standard_normal((e, f, h)) * 0.3, jnp.float32)
    with pytest.warns(RuntimeWarning, match="ptxas fatal: out of registers"):
        got = moe.routed_experts(x, ids, w, gate_up, down, impl="auto")
    want = moe.routed_experts(x, ids, w, gate_up, down, impl="dense")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
