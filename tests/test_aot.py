"""The deviceless GPU compile harness itself: a sharded matmul compiles for 8 x H200 with the memory XLA plans."""

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from small4_jax import aot


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
