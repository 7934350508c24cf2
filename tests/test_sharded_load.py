"""`from_pretrained(..., mesh=...)`: each tensor placed with its sharding as it loads; logits equal one device's."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from small4_jax.parallel.sharding import make_mesh


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_hf(make_hf_model(tiny_hf_config(), seed=4), path)
    return path


@pytest.mark.parametrize("shape", [{"data": 1, "expert": 8, "tensor": 1}, {"data": 2, "expert": 2, "tensor": 2}])
def test_sharded_load_matches_single_device(checkpoint, shape):
    ids = np.random.RandomState(0).randint(0, 128, size=(2, 24)).astype(np.int32)
    single = np.asarray(small4_jax.from_pretrained(checkpoint, dtype="float32")(ids))
    mesh = make_mesh(shape)
    model = small4_jax.from_pretrained(checkpoint, dtype="float32", mesh=mesh)
    stack = model.layer_stacks[-1]  # the MoE layers, stacked: the layer axis is never sharded
    tensor = "tensor" if shape["tensor"] > 1 else None
    assert stack.mlp.experts.gate_up[...].sharding.spec == P(None, "expert" if shape["expert"] > 1 else None, None,
                                                             tensor)
    assert stack.self_attn.o_proj.kernel[...].sharding.spec == P(None, tensor, None)
    assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(nnx.state(model)))
    sharded = np.asarray(model(ids))
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5 * np.abs(single).max())
