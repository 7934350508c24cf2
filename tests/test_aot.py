"""The deviceless GPU compile harness itself: a sharded matmul compiles for 8 x H200 with the memory XLA plans."""

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from small4_jax.tools import aot


@pytest.mark.gpu_compile
def test_sharded_matmul_compiles_for_h200_with_per_device_memory():
    mesh = aot.gpu_mesh("h200", {"data": 1, "expert": 8, "tensor": 1})
    x = aot.spec((4096, 1024), jnp.bfloat16, mesh, P("expert", None))
    w = aot.spec((1024, 2048), jnp.bfloat16, mesh)
    c = aot.compile_for(lambda x, w: x @ w, x, w, mesh=mesh)
    # Per device: a 512 x 1024 row block of x and all of w in, a 512 x 2048 block out (bf16).
    assert c.memory.argument == (512 * 1024 + 1024 * 2048) * 2
    assert c.memory.output == 512 * 2048 * 2
    assert not c.uses_triton
    assert "NVIDIA H200" in mesh.devices.flat[0].device_kind


def test_targets_describe_the_devices_memory():
    assert aot.device_memory_bytes("h100") == 84942979072  # what an H100 SXM 80 GB reports (79.1 GiB)
    assert aot.device_memory_bytes("h200") > 140 * 10**9
    with pytest.raises(ValueError, match="unknown GPU target 'a100'"):
        aot.target_config("a100")


@pytest.mark.gpu_compile
def test_a_gemm_under_the_layer_scan_writes_its_weight_slice_unless_the_kernel_reads_the_stack():
    """Why the stacked layers' dense weights are still copied on a GPU (benchmarks/RESULTS.md, "Dense weights under
    the layer scan"): with jaxlib 0.10.2's XLA, a dot under `lax.scan` over a weight stack [L, K, N] writes its layer's
    slice to a temporary each iteration (Triton GEMM fusions do not take a dynamic-slice operand), and XLA's
    dynamic-slice fusion, which would let cuBLAS read the slice in place, fails to compile. `kernels.gmm(layer=)`
    (one group) reads the stack in place. `Compiled.written_arrays` finds the copies. With jaxlib 0.11 (the GPU
    machines') the copy is an asynchronous fusion pair, and cuBLAS GEMMs (`xla_gpu_enable_triton_gemm=false`) read
    the slice in place through the dynamic-slice fusion that fails to compile under 0.10.2."""
    import jax

    from small4_jax import kernels

    layers, k, n = 3, 1024, 512
    mesh = aot.gpu_mesh("h100", {"x": 1}, topology="1x1x1")
    args = (aot.spec((16, k), jnp.bfloat16, mesh), aot.spec((layers, k, n), jnp.bfloat16, mesh))

    def xla_dots(x, w):  # h @ W_i @ W_i^T, both products reading layer i of the scanned stack
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi @ wi.T).astype(h.dtype), None), x, w)[0]

    def kernel(x, w):  # the same with the stack closed over and read at layer i by the grouped matmul (one group)
        stack, rows = w[:, None], jnp.full((1,), x.shape[0], jnp.int32)

        def body(h, i):
            y = jnp.tanh(kernels.gmm(h, stack, rows, layer=i))
            return jnp.tanh(kernels.gmm(y, stack, rows, layer=i, transpose_rhs=True)).astype(h.dtype), None

        return jax.lax.scan(body, x, jnp.arange(layers, dtype=jnp.int32))[0]

    layer_bytes = k * n * 2
    sliced = aot.compile_for(xla_dots, *args, mesh=mesh).written_arrays(layer_bytes)
    # One copy of the layer, in the loop body: a fusion (jaxlib 0.10), or an asynchronous fusion-start / fusion-done
    # pair counted once at its -done (jaxlib 0.11, the GPU machines').
    assert [(a.op.removesuffix("-done"), a.shape) for a in sliced] == [("fusion", (1, k, n))]
    assert sliced[0].writes == layers  # in the scan's loop body: once per layer
    c = aot.compile_for(kernel, *args, mesh=mesh)
    assert c.triton_calls == 2 and c.written_arrays(layer_bytes) == []
    assert c.memory.temp < layer_bytes
    cublas = {"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_enable_triton_gemm": False}
    try:
        in_place = aot.compile_for(xla_dots, *args, mesh=mesh, compiler_options=cublas)
    except Exception as e:  # noqa: BLE001 - jax's runtime error type moved between versions
        assert jax.__version__.startswith("0.10.")  # jaxlib 0.10's XLA: the fusion fails to compile
        assert "BufferAllocation::Slice not assigned for instruction p2" in str(e)
    else:  # jaxlib 0.11's XLA: cuBLAS reads the layer's slice of the stack in place (a dynamic-slice fusion), no copy
        assert "dynamic-slice-fusion" in in_place.compiled.as_text()
        assert not [a for a in in_place.written_arrays(layer_bytes) if a.shape[-2:] == (k, n)]


@pytest.mark.gpu_compile
def test_the_scan_copies_benchmark_finds_the_dense_weight_copies_of_the_decode_step():
    """benchmarks/scan_copies.py at the real dims (a scan of two layers: XLA drops a loop of one): the compiled decode
    step on 8 x H200 copies each layer's attention projections and shared expert (~0.1 GiB a layer a device;
    RESULTS.md), not its routed experts (read in place). With `dense_impl: gmm` the dense projections read their
    stacks in place too: the only layer-weight copy left is absorbed MLA's kv_b (3 MiB, folded into the query per
    head), and the temporaries shrink by the largest copy (o_proj's 32 MiB)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "benchmarks/scan_copies.py", "--layers", "2", "--variants", "default",
                           "dense-gmm"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr

    def row(variant):
        number = r"([\d.]+) \| "
        found = re.search(rf"^\| {variant} \| yes \| {number * 4}(.*) \| \d+ \|$", proc.stdout, re.M)
        assert found, proc.stdout
        return (*(float(found.group(i)) for i in range(1, 5)), found.group(5).split(", "))

    temp, copies, per_layer, per_step, copied = row("default")
    assert {"self_attn.o_proj", "self_attn.q_b_proj", "mlp.shared_experts.down_proj"} <= set(copied)
    assert not any(c.startswith("mlp.experts.") for c in copied)
    assert 90 < per_layer < 120 and abs(per_step - per_layer * 36 / 1024) < 0.01 and copies >= 8
    assert temp >= 32  # o_proj's 4096 x 4096 bf16 copy is the largest temporary
    gmm_temp, gmm_copies, gmm_per_layer, _, gmm_copied = row("dense-gmm")
    assert gmm_copied == ["self_attn.kv_b_proj"] and gmm_copies == 1 and gmm_per_layer == 3.0  # [256, 6144] bf16
    assert gmm_temp < 8 and gmm_temp < temp - 24
