"""The deployment planner (`python -m small4_jax.plan`): its flags, and the deployments it builds at real dims.

What it measures is tested where the programs are compiled once for the module (tests/test_gpu_compile.py: each
device's FLOPs against the one-device program's); here nothing is compiled for a GPU.
"""

import pytest

from small4_jax.config import load_config
from small4_jax.nn.paged import cache_width, default_cache_axes
from small4_jax.tools import aot, plan

MESHES = {"data1-expert8": {"data": 1, "expert": 8, "tensor": 1}, "data2-expert4": {"data": 2, "expert": 4, "tensor": 1}}


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "h100", "--devices", "8", "--mesh", "data=1,expert=4"],
     "error: --mesh data=1,expert=4 spans 4 devices, not --devices 8"),
    (["--gpu", "h300", "--devices", "8"], "error: argument --gpu: invalid choice: 'h300' (choose from h100, h200)"),
    (["--gpu", "h100", "--devices", "8", "--mesh", "data=1,exprt=8"],
     "error: --mesh: unknown mesh axis 'exprt'; expected name=size pairs over the axes data, expert, tensor, e.g. "
     "data=1,expert=8,tensor=1"),
    (["--gpu", "h100", "--devices", "8", "--finetune", "nope.yaml"], "error: --finetune nope.yaml: no such file or "
                                                                      "directory"),
    (["--devices", "8"], "error: --gpu and --devices are required (or --preset)"),
    (["--gpu", "h100", "--devices", "8", "--hosts", "3"], "error: --hosts 3 does not divide --devices 8"),
    (["--gpu", "h100", "--devices", "0"], "error: --devices 0: expected a positive integer"),
    (["--gpu", "h100", "--devices", "8", "--lora", "4"], "error: --lora 4: expected N:RANK (adapter slots and their "
                                                         "largest rank), e.g. 4:16"),
    (["--gpu", "h100", "--devices", "8", "--speculative", "ngram"],
     "error: --speculative ngram: the planner counts an EAGLE draft (--speculative eagle); n-gram drafts hold no "
     "device memory"),
])
def test_a_bad_flag_is_one_error_line(capsys, argv, message):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().replace("'h100', 'h200'", "h100, h200") == message


@pytest.mark.gpu_compile
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_the_serving_cache_is_split_over_data_and_expert(mesh):
    """The serving deployment's cache (the engine's default: 90% of what is free after the weights) is sharded over
    data x expert: each device holds 1/8 of the pages, and the prefill and decode steps take their rows sharded the
    same way (each request's pages on the shard that computes its rows)."""
    dep = plan.serve("h100", MESHES[mesh], config=load_config(plan.MODEL).replace(vision=None), layers=1)
    assert dep.devices == 8 and "cache over " + "x".join(a for a in ("data", "expert") if MESHES[mesh][a] > 1) \
        in dep.layout
    for planned in dep.programs[:2]:
        pages, ids = planned.program.args[1], planned.program.args[2]
        assert pages.sharding.shard_shape(pages.shape)[1] * 8 == pages.shape[1]
        assert ids.sharding.shard_shape(ids.shape)[0] * 8 == ids.shape[0]
    pages = dep.programs[0].program.args[1]
    assert dep.resident["cache"] * 8 == pages.size * pages.dtype.itemsize


@pytest.mark.gpu_compile
def test_the_planned_cache_is_split_as_the_engine_splits_it():
    """`--max-batch 4` on data=2,expert=4: the engine shards its cache over the batch axes whose sizes divide
    max_batch (data: 2 divides 4; data x expert = 8 does not), and the planner plans that cache, not one over all
    eight devices (both take `paged.default_cache_axes`)."""
    shape = MESHES["data2-expert4"]
    config = load_config(plan.MODEL).replace(vision=None)  # the vision tower's abstract build would cost 10 s
    dep = plan.serve("h100", shape, config=config, layers=1, engine_flags=("--max-batch", "4"))
    assert default_cache_axes(aot.gpu_mesh("h100", shape), 4) == ("data",)
    assert dep.layout.endswith("; cache over data")
    decode = dep.programs[1].program
    pages, ids = decode.args[1], decode.args[2]
    assert ids.shape[0] == 4 and ids.sharding.shard_shape(ids.shape)[0] == 2
    assert pages.sharding.shard_shape(pages.shape)[1] * 2 == pages.shape[1]


@pytest.mark.gpu_compile
def test_the_decode_row_carries_the_per_token_accounting():
    """`--mesh tensor=8 --max-batch 1` (a tiny model with 8 heads, 2 layers): the decode step's row carries
    token_cost's accounting of that compiled step: one max-length request's cache rows read whole on every device,
    the weights' shards, two collectives in the layer loop and one more a token, and the floor they imply."""
    config = load_config("configs/tiny.yaml").replace(num_attention_heads=8, num_key_value_heads=8, vision=None,
                                                      num_hidden_layers=2)
    dep = plan.serve("h100", {"tensor": 8}, config=config,
                     engine_flags=("--max-batch", "1", "--max-model-len", "2048", "--num-pages", "1024"))
    row = plan.program_row(dep, dep.programs[1], ideal=False)
    t = row["per_token_batch_1"]
    assert row["per_token_planned_batch"] == t and t["batch"] == 1 and t["context"] == 2048
    assert t["cache_read"] == 2048 * 2 * cache_width(config) * 2  # bf16, replicated over tensor
    assert t["collectives_per_layer"] == 2 and t["collectives_per_token"] == 2 * 2 + 1
    assert t["weights_ideal"] < t["weights_read"] < row["weights"]  # 1/8 of most; the routed experts' share of 4/16
    assert t["floor_ms"] == round((t["read"] / 3.35e12 + 5 * 5e-6) * 1e3, 3)
    assert "1 x 2,048: 0.00 GB, 2, 0.03 ms" in plan.table([row])


@pytest.mark.gpu_compile
@pytest.mark.parametrize("extra", ["lora", "eagle"])
def test_multi_lora_and_eagle_plans_fit_8_h100(extra):
    """Serving the 119B (full depth) on 8 x H100 with 4 adapters of rank 16 on the routed experts, or with an EAGLE
    draft: the slots (bf16, split over `expert` like the experts) or the draft and its pages are resident before the
    cache is sized, the cache still holds a 262,144-token sequence per shard, and resident + the engine's 10% for
    temporaries is within the allocator's limit."""
    kw = dict(lora=(4, 16), lora_targets=("experts",)) if extra == "lora" else dict(eagle=True)
    dep = plan.serve("h100", MESHES["data1-expert8"], **kw)
    r = dep.resident
    if extra == "lora":  # 36 layers x 16 local experts x (H J + J 2F + F J + J H) bf16, J = 5 slots x rank 16
        j = 5 * 16
        assert r["lora slots"] == 36 * 16 * (4096 * j + j * 4096 + 2048 * j + j * 4096) * 2 + 36 * 5 * 4  # + scales
    else:  # one decoder layer of the model's dims, replicated but for its experts; its pages as many as the target's
        assert 0 < r["draft"] < r["weights"] / 20
        assert r["draft cache"] * 36 == r["cache"]  # one layer's pages beside 36
    assert "refuses" not in dep.note and dep.cache_tokens // 8 >= 262_144
    limit = plan.MEM_FRACTION * aot.device_memory_bytes("h100")
    free = limit - sum(v for k, v in r.items() if k not in ("cache", "draft cache"))
    assert sum(r.values()) <= limit - 0.1 * free + 2**20  # the engine's rule: the cache takes 90% of what is free


@pytest.mark.gpu_compile
def test_grpo_plan_holds_the_weights_once_beside_the_engine_and_the_trainer():
    """configs/grpo-small4.yaml (8 prompts x 8 samples, data.seq_len 8192) on 8 x H100, one layer, nothing compiled:
    the rollout engine's steps and the trainer's programs take the same base weights, resident once; the engine
    holds one multi-LoRA slot (beside slot 0, the base) of the programs' own bytes, and a cache page for every token
    of every sample, split over `expert`; the trainer holds fp32 adapters and AdamW's two moments. `--finetune` with
    a grpo / dpo config plans that method."""
    from flax import nnx

    from small4_jax.lora.multi import AdapterIds, MultiLoRAParam

    dep = plan.finetune("h100", plan.GRPO, layers=1)
    r = dep.resident
    assert dep.name == "grpo-small4-8xH100" and set(r) == {"weights", "adapters+adam", "lora slots", "cache"}
    prefill, decode, logprobs, update = (p.program for p in dep.programs)
    slots, ids, base = nnx.split_state(decode.args[0], MultiLoRAParam, AdapterIds, ...)
    assert r["weights"] == plan.shard_bytes(update.args[2]) == plan.shard_bytes(logprobs.args[1])
    assert 0 <= r["weights"] - plan.shard_bytes(base) < 1024  # + the adapters' per-layer flags (lora.PerLayer)
    assert plan.shard_bytes(slots) == r["lora slots"] > 0 and plan.shard_bytes(ids) == 64 * 4
    params, opt_state = update.args[:2]
    assert 3 * plan.shard_bytes(params) <= r["adapters+adam"] <= 3 * plan.shard_bytes(params) + 64
    rows, table = 64, -(-(8192 + 1) // 16)  # every sample, its longest sequence's pages
    pages = decode.args[1]
    assert pages.sharding.shard_shape(pages.shape)[1] * 8 == pages.shape[1] >= 8 * (rows // 8 * table + 1)
    assert r["cache"] == plan.shard_bytes(pages) and dep.cache_tokens >= rows * 8193
    assert decode.args[2].shape == (rows, 1) and decode.args[6].shape == (rows, table)
    assert prefill.args[2].shape == (8, 8192 - 4096 + 1 + 15 - (8192 - 4096) % 16)  # the longest prompt, 16-aligned
    assert update.args[3]["inputs"].shape == (8, 8, 8192)  # grad_accum 8 micro-batches of 8 rows, one per GPU
    dpo = plan.finetune("h100", plan.DPO, layers=1)
    assert dpo.name == "dpo-small4-8xH100" and [p.program.args[3]["inputs"].shape for p in dpo.programs] == \
        [(4, 4, 2, 8192)]
    assert dpo.resident["weights"] == r["weights"]
