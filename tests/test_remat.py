"""Layer rematerialisation: the same loss and gradients as without it, inside jax.jit + jax.grad of a merged model
(how the trainer calls the model), with and without LoRA adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from small4_jax.lora import adapters as lora
from small4_jax.config import Small4Config
from small4_jax.nn.model import init_model

TINY = Small4Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                    num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_position_embeddings=64, original_max_position_embeddings=8, rope_factor=4.0,
                    initializer_range=0.2, first_k_dense_replace=1)


@pytest.mark.parametrize("with_lora", [False, True])
def test_remat_gives_the_same_loss_and_gradients(with_lora):
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)), jnp.int32)
    results = []
    for remat in (False, True):
        model = init_model(TINY, seed=3)
        if with_lora:
            lora.apply_lora(model, lora.LoRAConfig(targets=["all"], rank=4, alpha=8.0))
        model.remat = remat
        wrt = lora.TRAINABLE if with_lora else nnx.Param
        graphdef, params, rest = nnx.split(model, wrt, ...)

        @jax.jit
        def loss_and_grad(params, rest):
            def loss(p):
                logits = nnx.merge(graphdef, p, rest)(ids)
                return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
            return jax.value_and_grad(loss)(params)

        results.append(loss_and_grad(params, rest))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
