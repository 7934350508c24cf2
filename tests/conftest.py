"""Test session set-up: CPU backend with 8 simulated devices, a persistent compile cache for subprocesses."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_cache = Path(__file__).resolve().parent.parent / ".cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite compiles hundreds of tiny programs on XLA:CPU; most of each compile is LLVM optimising code that then runs
# for milliseconds. jax's own switch for that case (LLVM at -O0, its expensive passes off; XLA's HLO passes and the
# numerics' rules - no fast math - are unchanged) cut tests/test_paged.py's CPU time by a third. Set in the
# environment, so the subprocesses the tests start (launch/local.py's jobs, the CLIs) inherit it. Deviceless GPU
# compiles (`gpu_compile`) run with every optimisation on: they stand for the real GPU build (pytest_runtest_protocol).
# Only on the CPU platform: on a GPU machine (benchmarks/gpu_suite.sh: JAX_PLATFORMS=cuda,cpu) every program is
# compiled as it runs in production.
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import small4_jax  # noqa: E402, F401 - first: quiets the CUDA plugin where no GPU driver is (console.quiet_cuda_plugin)
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# The cache directory above is for the subprocesses (multi-process tests compile the same programs in each
# process). This process does not write it: from a clean clone nothing is ever read back here, and in the full
# suite XLA:CPU aborted the process while serialising one executable into it (test_paged's absorbed decode with
# LoRA adapters, after ~230 earlier tests; the test passes alone).
jax.config.update("jax_enable_compilation_cache", False)


# ----------------------------------------------------------------------------------------------------------------------
# Deviceless GPU compile checks (`@pytest.mark.gpu_compile`): skipped where jax's CUDA plugin is missing, except in CI
# (CI=true or SMALL4_REQUIRE_GPU_COMPILE=1), where a missing plugin is a failure: the README's install command puts it
# there (`python -m small4_jax.aot --install-plugin`).
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_compile: compiles programs for H100/H200 (sm_90a) without a GPU")
    config.addinivalue_line("markers", "optimized: compiles with every optimisation on (long-running programs)")


_FAST_COMPILES = bool(jax.config.values.get("jax_disable_most_optimizations", False))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Fast compiles but for `gpu_compile` tests and `optimized` ones (programs that run long enough to repay LLVM's
    work: a 100-step fine-tune ran 20% longer at -O0), their module-scoped fixtures (set up inside the test) and the
    subprocesses they start included."""
    if not _FAST_COMPILES:  # (a GPU machine: nothing to switch)
        return (yield)
    fast = not any(item.get_closest_marker(m) for m in ("gpu_compile", "optimized"))
    jax.config.update("jax_disable_most_optimizations", fast)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = str(int(fast))
    try:
        return (yield)
    finally:
        jax.config.update("jax_disable_most_optimizations", _FAST_COMPILES)
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = str(int(_FAST_COMPILES))


def _require_gpu_compile() -> bool:
    flag = os.environ.get("SMALL4_REQUIRE_GPU_COMPILE", os.environ.get("CI", ""))
    return flag.lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _gpu_compile_gate(request):
    if request.node.get_closest_marker("gpu_compile") is None:
        return
    from small4_jax.tools import aot

    ok, why = aot.available()
    if not ok:
        if _require_gpu_compile():
            pytest.fail(f"deviceless GPU compile is required here (CI) but unavailable: {why}")
        pytest.skip(f"deviceless GPU compile unavailable: {why}")


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _small4_log_propagates():
    """The command-line tools stop "small4_jax" records at their own handler (small4_jax.console); a test that
    called one in-process must not hide later records from pytest's caplog, which listens on the root logger."""
    yield
    logging.getLogger("small4_jax").propagate = True


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module. The full suite (~470 tests, one process) aborted inside
    XLA:CPU compiles at test_paged, twice, after ~230 tests, while the module passes alone; every live CPU
    executable holds JIT'd code mappings, and the suspected limit is the process's mapping count
    (vm.max_map_count 65530). Not confirmed: see the session's closing note."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
