"""Latency layouts on 8 simulated CPU devices: tensor parallelism (`--mesh tensor=8`, with `--shard-latent-proj`,
tensor x expert) and decode context parallelism (`context_axes`: one sequence's pages split by position over a mesh
axis) give one device's greedy tokens; the merge of partial softmax statistics equals attention over all keys; the
tensor-parallel decode step compiled for 8 x H100 has at most two collectives per layer (three with the latent
projections split, reading 1/8 of every weight but the router); int4 experts split inside a group are refused.

References: the single-device engine on the same random tiny model (8 heads, so `tensor=8` shards them), and for
the partial-softmax merge the materialised reference attention over every key (`mla_reference`). "Long" positions
are cheap here: 4-token pages, so a 150-token prompt spreads 38 pages over the 8 context shards.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.engine.engine import Engine, SamplingOptions
from infer.speculative.decoder import SpeculativeConfig
from small4_jax.config import load_config
from small4_jax.errors import ConfigError, InputError
from small4_jax.kernels.mla_decode import combine_partials, mla_attention, mla_reference
from small4_jax.nn.model import abstract_model, init_model
from small4_jax.nn.paged import context_limit
from small4_jax.parallel.placement import place_model
from small4_jax.parallel.sharding import make_mesh, spec_for
from small4_jax.tools import aot, token_cost

ENGINE = dict(max_batch=2, page_size=4, prefill_chunk=32, prefill_chunks=(32,), batch_buckets=(2,), max_model_len=256)


@pytest.fixture(scope="module")
def case():
    """The model, prompts (one long, one short) and one device's greedy tokens for them."""
    config = dataclasses.replace(load_config("configs/tiny.yaml"), num_attention_heads=8, num_key_value_heads=8)
    model = init_model(config, seed=3)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(40, 512, n - 1).tolist() for n in (150, 37)]
    ref = Engine(nnx.clone(model), **ENGINE).generate(prompts, SamplingOptions(max_tokens=6))
    return model, prompts, [o.token_ids for o in ref]


def _engine(model, shape, **kw):
    mesh = make_mesh(shape)
    return Engine(place_model(nnx.clone(model), mesh), mesh=mesh, **{**ENGINE, **kw})


def test_tensor_parallel_greedy_equals_one_device(case):
    """`--mesh tensor=8 --shard-latent-proj`: heads, the shared expert and the routed experts' width over `tensor`
    (gate_up interleaved per shard), and q_a_proj / kv_a_proj by their input dim (each device holds 1/8 of their
    rows, the partial sums all-reduced); the plain `tensor=8` attention runs in the context-parallel and mixed tests
    below. The option on a mesh without a tensor axis is refused."""
    model, prompts, ref = case
    engine = _engine(model, {"tensor": 8}, shard_latent_proj=True)
    experts = engine.model.layer_stacks[0].mlp.experts
    assert experts.gate_up_blocks == 8
    assert len(experts.gate_up[...].sharding.device_set) == 8
    attn = engine.model.layer_stacks[0].self_attn
    assert attn.latent_split
    for linear in (attn.q_a_proj, attn.kv_a_proj_with_mqa):
        kernel = linear.kernel[...]  # [layers, in, out]
        assert kernel.sharding.shard_shape(kernel.shape) == (kernel.shape[0], kernel.shape[1] // 8, kernel.shape[2])
    out = engine.generate(prompts, SamplingOptions(max_tokens=6))
    assert [o.token_ids for o in out] == ref
    with pytest.raises(InputError, match=r"shard_latent_proj \(--shard-latent-proj\) splits q_a_proj and kv_a_proj "
                                         r"over the 'tensor' mesh axis, but the mesh \{'expert': 8\} has no tensor "
                                         r"axis > 1"):
        Engine(nnx.clone(model), mesh=make_mesh({"expert": 8}), shard_latent_proj=True, **ENGINE)


def test_context_parallel_greedy_equals_one_device(case):
    """`--mesh tensor=8 --context-axes tensor`: one sequence's pages dealt over the 8 devices by position, each
    holding 1/8 of the cache; a repeated prompt takes its full pages from the prefix cache, each on its shard."""
    model, prompts, ref = case
    engine = _engine(model, {"tensor": 8}, context_axes=("tensor",))
    assert engine.pages.sharding.shard_shape(engine.pages.shape)[1] == engine.pages.shape[1] // 8
    out = engine.generate(prompts, SamplingOptions(max_tokens=6))
    assert [o.token_ids for o in out] == ref
    again = engine.generate(prompts[:1], SamplingOptions(max_tokens=6))
    assert again[0].token_ids == ref[0]
    assert engine.stats["cached_tokens"] == (len(prompts[0]) - 1) // 4 * 4


def test_expert_tensor_mix_with_context_parallel_speculative_verify(case):
    """`--mesh expert=2,tensor=4 --context-axes expert`: experts over expert, their width, the shared expert and the
    heads over tensor (gate_up in 4 blocks), one sequence's pages over expert; n-gram drafts verified 4 at a time
    (T = 5 per row) over the split cache."""
    model, prompts, ref = case
    engine = _engine(model, {"expert": 2, "tensor": 4}, context_axes=("expert",),
                     speculative=SpeculativeConfig("ngram", num_draft_tokens=4))
    assert engine.model.layer_stacks[0].mlp.experts.gate_up_blocks == 4
    assert engine.pages.sharding.shard_shape(engine.pages.shape)[1] == engine.pages.shape[1] // 2
    out = engine.generate(prompts, SamplingOptions(max_tokens=6))
    assert [o.token_ids for o in out] == ref
    assert engine.speculator.stats["spec_verify_rows"] > 0


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_partial_softmax_merge_equals_attention_over_all_keys(impl):
    """Each of S shards attends over its own pages (page j on shard j % S, `context_limit` its visible keys) and
    returns (output, log-sum-exp); `combine_partials` of the S partials equals the reference over every key, for
    decode and a verify step (T = 3), including queries that see no key of some shard."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    ks = jax.random.split(jax.random.key(seed), 4)
    b, t, nh, r, dr, page, width, shards = 2, 3, 4, 32, 16, 4, 12, 4
    num_pages = 1 + b * width
    pages = jax.random.normal(ks[0], (1, num_pages, page, r + dr))
    q_lat = jax.random.normal(ks[1], (b, t, nh, r))
    q_pe = jax.random.normal(ks[2], (b, t, nh, dr))
    scale = jnp.full((b, t), 0.3)
    table = 1 + np.arange(b * width, dtype=np.int32).reshape(b, width)
    ends = np.array([[2, 3, 4], [38, 39, 40]])  # row 0 sees one page: shards 1.. see nothing
    seq_index = jnp.asarray(ends, jnp.int32)
    want = mla_reference(q_lat, q_pe, pages, 0, jnp.asarray(table), seq_index, scale)

    @jax.jit
    def merged(q_lat, q_pe, pages, seq_index, scale):
        def shard(args):  # one shard's partial: its own pages, its visible keys
            local, s = args
            limit = context_limit(seq_index, page, shards, s)
            return mla_attention(q_lat, q_pe, pages, 0, local, limit, scale, impl=impl, return_lse=True)

        tables = jnp.asarray(np.stack([table[:, s::shards] for s in range(shards)]))
        outs, lses = jax.lax.map(shard, (tables, jnp.arange(shards, dtype=jnp.int32)))
        return combine_partials(outs, lses)[0]

    got = merged(q_lat, q_pe, pages, seq_index, scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")


@pytest.mark.gpu_compile
def test_tensor_parallel_decode_step_collectives_per_layer():
    """The engine's batch-1 decode step at the released dims (2 layers), fp8, compiled deviceless for 8 x H100 on
    `--mesh tensor=8`: two collectives in the layer loop (the attention output's and the MoE's all-reduce, the
    shared expert's partial sum joining the routed experts' in one), one more per token (the embedding lookup), no
    weight ever gathered, and each device reads its 1/8 of the sharded weights."""
    config = dataclasses.replace(load_config("configs/small4-119b.yaml"), num_hidden_layers=2, vision=None)
    row, compiled = token_cost.decode_row(config, "h100", {"tensor": 8}, batch=1, context=4096)
    found = aot.collectives(compiled.compiled.as_text())
    in_loop = [c for c in found if c.runs == 2]
    assert [c.op for c in in_loop] == ["all-reduce", "all-reduce"], found
    assert row.collectives_per_layer == 2 and row.collectives_per_token == 2 * 2 + 1
    assert max(c.bytes for c in found) <= 4 * config.hidden_size  # one token's f32 hidden state at most
    # replicated: q_a_proj, kv_a_proj (fp8) and the bf16 router of each layer, read whole by every device
    h = config.hidden_size
    replicated = config.num_hidden_layers * (h * (config.q_lora_rank + config.kv_lora_rank + config.qk_rope_head_dim)
                                             + 2 * h * config.n_routed_experts)
    assert row.weights_read <= row.weights_ideal + replicated * 1.01


@pytest.mark.gpu_compile
def test_sharded_latent_projections_decode_step_reads_and_collectives():
    """`--mesh tensor=8 --shard-latent-proj`, the same step: q_a_proj and kv_a_proj split by their input dim, so a
    device reads its 1/8 of every weight but the router; the price is a third collective in the layer loop, the
    two projections' partial sums all-reduced together (XLA's combiner: one [q_lora_rank + kv_lora_rank + rope]
    float32 all-reduce), and the residual stream stays whole (no reduce-scatter / all-gather)."""
    config = dataclasses.replace(load_config("configs/small4-119b.yaml"), num_hidden_layers=2, vision=None)
    row, compiled = token_cost.decode_row(config, "h100", {"tensor": 8}, batch=1, context=4096,
                                          shard_latent_proj=True)
    found = aot.collectives(compiled.compiled.as_text())
    in_loop = [c for c in found if c.runs == 2]
    assert sorted(c.op for c in in_loop) == ["all-reduce"] * 3, found
    latent = 4 * (config.q_lora_rank + config.kv_lora_rank + config.qk_rope_head_dim)
    assert sorted(c.bytes for c in in_loop) == [latent, 4 * config.hidden_size, 4 * config.hidden_size], found
    assert row.collectives_per_layer == 3 and row.collectives_per_token == 3 * 2 + 1
    router = config.num_hidden_layers * 2 * config.hidden_size * config.n_routed_experts  # bf16, whole on each
    assert row.weights_ideal < row.weights_read <= row.weights_ideal + router * 1.01


@pytest.mark.gpu_compile
def test_context_parallel_plan_row_holds_one_eighth_of_a_long_request():
    """One 262,144-token request on 8 x H100, `--mesh tensor=8 --context-axes tensor` (2 layers, fp8): each device
    holds and reads 1/8 of its cache (the pages argument's shard), with three collectives per layer (the query
    gathered over the context shards, the partial outputs with their log-sum-exps, the attention output's
    all-reduce) plus the MoE's."""
    config = dataclasses.replace(load_config("configs/small4-119b.yaml"), num_hidden_layers=2, vision=None)
    row, compiled = token_cost.decode_row(config, "h100", {"tensor": 8}, batch=1, context=262144,
                                          context_axes=("tensor",))
    assert row.cache_read == row.cache_ideal == 262144 * 2 * 320 * 2 // 8
    assert compiled.compiled.input_shardings[0][1].spec == jax.sharding.PartitionSpec(None, "tensor")
    assert row.collectives_per_layer == 4


def test_int4_experts_split_inside_a_group_are_refused():
    """int4 routed experts pack two rows a byte within each group of 128 (gcd(F, 128) for small F) along the width
    F: a `tensor` split leaving F / tp rows that are not whole groups is refused when the weights are placed
    (`sharding.spec_for`, as every loader and `place_model` call it), naming the mesh, the rows per shard and the
    group size; a split into whole groups is placed."""
    config = load_config("configs/tiny.yaml")  # F = 64: one int4 group of 64 rows
    mesh = make_mesh({"data": 4, "tensor": 2})
    message = ("int4 routed experts on the mesh data=4,tensor=2: layer_stacks/0/mlp/experts/down splits the expert "
               "width 64 over tensor (2 shards) into 32 rows per shard, not a multiple of the int4 group size 64; use "
               "a tensor size that leaves whole groups (dividing 1), or fp8 / int8 experts")
    with pytest.raises(ConfigError) as e:
        aot.placed(nnx.state(abstract_model(config, quantize="int4")), mesh)
    assert str(e.value) == message
    wide = dataclasses.replace(config, moe_intermediate_size=256)  # two groups of 128: one per shard
    state = aot.placed(nnx.state(abstract_model(wide, quantize="int4")), mesh)
    down = state["layer_stacks"][0]["mlp"]["experts"]["down"].get_value()
    assert down.sharding.shard_shape(down.shape)[-2] == down.shape[-2] // 2
    assert spec_for(("layer_stacks", 0, "mlp", "experts", "down"), down.shape, mesh) == down.sharding.spec
