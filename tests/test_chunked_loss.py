"""The chunked cross-entropy (`Small4ForCausalLM.token_loss`) = a float32 log-softmax over the full logits, loss and
gradients of every parameter, for a separate and a tied head, with a chunk that does not divide the token count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from small4_jax.config import Small4Config
from small4_jax.nn.model import init_model

TINY = Small4Config(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                    num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_position_embeddings=64, original_max_position_embeddings=8, rope_factor=4.0,
                    initializer_range=0.2, first_k_dense_replace=1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_log_softmax(tied):
    rng = np.random.RandomState(1)
    b, t = 2, 13
    ids = jnp.asarray(rng.randint(0, 96, (b, t)), jnp.int32)
    targets = jnp.asarray(rng.randint(0, 96, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.rand(b, t) * (rng.rand(b, t) > 0.3), jnp.float32)  # some targets untrained
    segments = jnp.asarray(np.array([0] * 6 + [1] * 7)[None].repeat(b, 0), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(6), np.arange(7)])[None].repeat(b, 0), jnp.int32)
    model = init_model(TINY.replace(tie_word_embeddings=tied), seed=2)
    graphdef, params = nnx.split(model)

    def full(p):  # the loss as it was computed before chunking
        logits = nnx.merge(graphdef, p)(ids, positions=positions, segment_ids=segments)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights), jnp.sum(weights)

    def chunked(p):
        return nnx.merge(graphdef, p).token_loss(ids, targets, weights, positions, segments, chunk=5)

    (ref, ref_n), ref_g = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    (got, n), g = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    assert float(n) == pytest.approx(float(ref_n))
    assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref))
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        assert _rel(a, r) < 1e-5


def test_chunked_loss_holds_one_chunk_of_logits():
    """Compiled loss + gradient (XLA memory analysis): the chunked loss needs less temporary memory than one
    [tokens, vocab] float32 logits array; the unchunked loss needs several of them."""
    model = init_model(TINY.replace(vocab_size=4096, num_hidden_layers=1), seed=0)
    graphdef, params = nnx.split(model)
    b, t = 2, 256
    ids = jnp.zeros((b, t), jnp.int32)
    w = jnp.ones((b, t), jnp.float32)

    def full(p):
        logits = nnx.merge(graphdef, p)(ids)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0] * w)

    def chunked(p):
        return nnx.merge(graphdef, p).token_loss(ids, ids, w, chunk=64)[0]

    def temp_bytes(loss):
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * 4096 * 4
    assert temp_bytes(chunked) < logits_bytes < 3 * logits_bytes < temp_bytes(full)


def test_token_logprobs_on_a_mesh_each_shard_cuts_its_own_tokens():
    """`chunked_token_logprobs` (DPO's and GRPO's per-token log-probs) with the tokens split over 8 devices: each
    shard's tokens in its own chunks (the last one padded), results put back in token order, equal to the float32
    log-softmax of the full logits; and the compiled program computes no chunk on a device that does not own it
    (its FLOPs per device: 1/8 of one device's, where chunks cut across the shards put every chunk on every device)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from small4_jax.nn.model import chunked_token_logprobs
    from small4_jax.tools.aot import hlo_cost

    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.RandomState(3)
    n, dim, vocab = 8 * 13, 32, 96  # 13 tokens per shard in chunks of 5: 5, 5, 3 (+ 2 padding)
    head = nnx.Linear(dim, vocab, rngs=nnx.Rngs(0))
    h = jnp.asarray(rng.randn(n, dim), jnp.float32)
    targets = jnp.asarray(rng.randint(0, vocab, n), jnp.int32)
    z = head(h)
    ref = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(z, -1), targets[:, None], -1)[:, 0])
    f = jax.jit(lambda h, t: chunked_token_logprobs(head, h, t, 5))
    with jax.set_mesh(mesh):
        hs, ts = (jax.device_put(x, NamedSharding(mesh, P("expert"))) for x in (h, targets))
        got = f(hs, ts)
        flops = hlo_cost(f.lower(hs, ts).compile().as_text()).flops  # each loop body times its trips
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    one = hlo_cost(f.lower(h, targets).compile().as_text()).flops
    assert flops * 8 <= 1.2 * one, (flops, one)
