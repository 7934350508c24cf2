"""GRPO (train/grpo.py, train/rewards.py): advantages and the clipped, KL-penalised loss against straightforward
numpy loops; the built-in rewards; routing replay (a MoE layer with forced expert ids against a plain gather
reference, the router-disagreement count against a loop); one real step of the tiny demo (engine rollouts with
their routing recorded and replayed, engine-vs-trainer log-probs and router decisions)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from small4_jax.config import load_config
from small4_jax.errors import ConfigError
from small4_jax.lora import adapters as lora
from small4_jax.nn.model import MoE, init_model
from train import config as run_config
from train import grpo, rewards
from train.data import DataError
from train.export import load_run, main as export
from train.trainer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_group_advantages_match_a_loop():
    r = np.array([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0], [0.0, 3.0, 1.0, 0.0]])
    for scale in (True, False):
        want = np.zeros_like(r)
        for i, group in enumerate(r):
            mean = sum(group) / len(group)
            std = (sum((x - mean) ** 2 for x in group) / (len(group) - 1)) ** 0.5
            for j, x in enumerate(group):
                want[i, j] = (x - mean) / (std + 1e-4) if scale else x - mean
        np.testing.assert_allclose(grpo.group_advantages(r, scale), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_policy_loss_matches_a_per_token_loop(agg):
    rng = np.random.default_rng(0)
    n, s, eps, beta = 4, 6, 0.2, 0.1
    logp, old, ref = (np.log(rng.uniform(0.05, 0.9, (n, s))) for _ in range(3))
    adv = rng.normal(size=n).astype(np.float32)
    w = (rng.uniform(size=(n, s)) > 0.3).astype(np.float32)
    loss, m = grpo.policy_loss(logp, old, ref, adv, grpo.token_coefficients(w, agg), eps, beta)
    per_seq, total, count, clipped, kl = [], 0.0, 0.0, 0.0, 0.0
    for i in range(n):
        seq, k = 0.0, 0.0
        for t in range(s):
            if not w[i, t]:
                continue
            ratio = np.exp(logp[i, t] - old[i, t])
            pg = -min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            k3 = np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            seq, k, total, count = seq + pg + beta * k3, k + 1, total + pg + beta * k3, count + 1
            clipped += abs(ratio - 1) > eps
            kl += k3
        per_seq.append(seq / max(k, 1))
    want = total / count if agg == "token" else np.mean(per_seq)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    if agg == "token":
        np.testing.assert_allclose(float(m["clip_frac"]), clipped / count, rtol=1e-5)
        np.testing.assert_allclose(float(m["kl"]), kl / count, rtol=1e-5)


def test_rewards_built_in_and_user_function(tmp_path, monkeypatch):
    row = {"messages": [], "answer": "12"}
    fn = rewards.build([{"type": "exact"}, {"type": "normalized", "extract": r"Answer: (.*)", "weight": 2.0},
                        {"type": "regex", "pattern": r"^Answer"}, {"type": "json", "required": ["a"]},
                        {"type": "length", "target": 2, "weight": 0.5}])
    got = fn("Answer: 12.0!", row, [5, 6, 7, 8])
    assert got == {"exact": 0.0, "normalized": 2.0, "regex": 1.0, "json": 0.0, "length": -0.5, "reward": 2.5}
    assert fn('{"a": 1}', row, [1])["json"] == 1.0
    (tmp_path / "my_reward.py").write_text("def score(reply, row, ids):\n"
                                           "    return len(ids) + (reply == row['answer'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.build([{"type": "function", "function": "my_reward:score"}])("12", row, [1, 2])["reward"] == 3.0
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: cannot load my_reward:nope"):
        rewards.build([{"type": "function", "function": "my_reward:nope"}])
    with pytest.raises(ConfigError, match=r"grpo.rewards\[1\]: unknown key\(s\) \['patern'\]"):
        rewards.build([{"type": "exact"}, {"type": "regex", "patern": "x"}])
    # a file path; a bool is a number; what cannot be called as (reply, row, token_ids), raises or returns no number
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.py").write_text("import math\n"
                                              "def right(reply, row, ids):\n    return reply == row['answer']\n"
                                              "def two(reply, row):\n    return 1.0\n"
                                              "def boom(reply, row, ids):\n    raise KeyError('grade')\n"
                                              "def text(reply, row, ids):\n    return '1'\n"
                                              "def nan(reply, row, ids):\n    return math.nan\n")
    monkeypatch.chdir(tmp_path)
    ref = "sub/more.py:"
    assert rewards.build([{"type": "function", "function": ref + "right"}])("12", row, [1])["reward"] == 1.0
    with pytest.raises(ConfigError, match=r"^grpo.rewards\[0\]: sub/more.py:two\(reply, row\) cannot be called as "
                                          r"\(reply, row, token_ids\)$"):
        rewards.build([{"type": "function", "function": ref + "two"}])
    with pytest.raises(ConfigError, match=r"^grpo.rewards\[0\]: sub/nope.py:f: no file "):
        rewards.build([{"type": "function", "function": "sub/nope.py:f"}])
    for name, error in (("boom", "raised KeyError: 'grade' (on the reply '7' to the prompt row "
                                 '{"messages": [], "answer": "12"})'),
                        ("text", "returned '1'; expected a number"), ("nan", "returned nan (not finite)")):
        with pytest.raises(ConfigError) as e:
            rewards.build([{"type": "function", "function": ref + name}])("7", row, [1])
        assert str(e.value) == f"grpo.rewards: reward {ref}{name} {error}"


def test_json_schema_reward(tmp_path):
    """The reply's JSON against a schema in the spec or in the row (jsonschema decides validity); a bad schema is one
    error naming the config field, a row without its schema is a bad row."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name"], "additionalProperties": False}
    fixed = rewards.build([{"type": "json_schema", "schema": schema}])
    row = {"messages": []}
    assert fixed(' {"name": "Ada", "age": 36}\n', row, [])["json_schema"] == 1.0
    for bad in ('{"age": 36}', '{"name": "Ada", "age": "36"}', '{"name": "Ada", "x": 1}', '["Ada"]', "name: Ada",
                '{"name": "Ada"} trailing', ""):
        assert fixed(bad, row, [])["json_schema"] == 0.0, bad
    per_row = rewards.build([{"type": "json_schema", "schema_key": "schema"}])
    assert per_row('[1, 2]', {"schema": {"type": "array", "items": {"type": "integer"}}}, [])["reward"] == 1.0
    assert per_row('[1, "2"]', {"schema": {"type": "array", "items": {"type": "integer"}}}, [])["reward"] == 0.0
    assert per_row.check_row({"schema": schema}) is None
    assert per_row.check_row({}) == "no 'schema' key (the JSON schema grpo.rewards[0].schema_key names)"
    assert per_row.check_row({"schema": {"type": "objekt"}}).startswith("'schema': not a valid JSON schema (")
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: schema: not a valid JSON schema \(.*objekt"):
        rewards.build([{"type": "json_schema", "schema": {"type": "objekt"}}])
    with pytest.raises(ConfigError, match=r"grpo.rewards\[1\]: type json_schema needs exactly one of schema"):
        rewards.build([{"type": "exact"}, {"type": "json_schema"}])
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: unknown key\(s\) \['schemas'\]"):
        rewards.build([{"type": "json_schema", "schemas": {}}])
    # a prompt row without the schema its reward reads is named by file:line before anything runs
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    tok = load_tokenizer(run_config.load(ROOT / "configs/grpo-tiny.yaml"))
    with pytest.raises(DataError, match=rf"{path}:1: no 'schema' key"):
        grpo.load_prompts([path], tok, 64, 4, per_row.check_row)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"]}}}


def test_tool_call_reward_reads_calls_with_the_servers_parser():
    """Replies built from token ids as the model emits them: [TOOL_CALLS]name[ARGS]{json}, parallel calls, thinking
    first. 1 when every call names a declared tool with valid arguments, 0 otherwise; no call scores no_call."""
    tok = load_tokenizer(run_config.load(ROOT / "configs/grpo-tiny.yaml"))
    calls, args, think, end = (tok.token_id(p) for p in ("[TOOL_CALLS]", "[ARGS]", "[THINK]", "[/THINK]"))

    def call(name, arguments):
        return [calls, *tok.encode(name, bos=False), args, *tok.encode(arguments, bos=False)]

    row = {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER]}
    fn = rewards.build([{"type": "tool_call"}], tokenizer=tok)
    score = lambda ids, r=row: fn("", r, ids)["tool_call"]  # noqa: E731
    assert score(call("get_weather", '{"city": "Paris"}') + [tok.eos_id]) == 1.0
    assert score(call("get_weather", '{"city": "Paris", "days": 2}') + call("get_weather", '{"city": "Rome"}')) == 1.0
    assert score([think, *tok.encode("hmm", bos=False), end] + call("get_weather", '{"city": "Oslo"}')) == 1.0
    assert score(call("get_weather", '{"city": "Paris"}') + call("get_time", '{"city": "Rome"}')) == 0.0  # undeclared
    assert score(call("get_weather", '{"days": 2}')) == 0.0  # required argument missing
    assert score(call("get_weather", '{"city": "Paris", "days": 0}')) == 0.0  # minimum
    assert score(call("get_weather", '{"city": "Par')) == 0.0  # cut off: not JSON
    assert score(call("get_weather", '"Paris"')) == 0.0  # not an object
    assert score(call("get_weather", '{"city": "Paris"}'), {"messages": []}) == 0.0  # the row declares no tools
    assert score(tok.encode("It is sunny.", bos=False)) == 0.0  # no call: no_call, default 0
    lenient = rewards.build([{"type": "tool_call", "no_call": 1.0}], tokenizer=tok)
    assert lenient("It is sunny.", row, tok.encode("It is sunny.", bos=False))["reward"] == 1.0
    # a tool without parameters takes any object
    free = {"type": "function", "function": {"name": "ping"}}
    assert fn("", {"tools": [free]}, call("ping", "{}"))["reward"] == 1.0
    assert fn.check_row(row) is None
    assert fn.check_row({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]}) \
        .startswith("tools[0].function.parameters: not a valid JSON schema (")
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: type tool_call parses the reply's token ids and needs "
                                          r"the run's tokenizer"):
        rewards.build([{"type": "tool_call"}])
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: no_call must be a number"):
        rewards.build([{"type": "tool_call", "no_call": "yes"}], tokenizer=tok)


def test_bad_prompt_rows_are_named(tmp_path):
    from train.data import read_jsonl

    path = tmp_path / "p.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}], "answer": "1"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}], "answer": [1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, errors = read_jsonl([path], validate=grpo.validate_prompt)
    assert len(good) == 1
    assert [str(e) for e in errors] == [
        f"{path}:2: the prompt's last message must be the user's or a tool's, got 'assistant'",
        f"{path}:3: 'answer' must be a string or a number, got list"]
    # a row an answer reward cannot grade (no "answer") is a bad row for it, not for a reward that needs none
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": rows[0]["messages"]}) + "\n")
    for specs, want in (([{"type": "regex", "pattern": "x"}], []),
                        ([{"type": "regex", "pattern": "x"}, {"type": "normalized"}],
                         [f"{path}:2: no 'answer' key (the normalized reward compares the reply with it)"])):
        check = rewards.build(specs).check_row
        _, errors = read_jsonl([path], validate=lambda r: grpo.validate_prompt(r) or check(r))
        assert [str(e) for e in errors] == want


def test_moe_replay_equals_a_plain_gather_reference():
    """MoE(x, expert_ids) (routing replay) == a plain per-token gather of the forced experts, weighted by the router's
    own softmax at those ids, renormalised and scaled; values and the gradient w.r.t. x (which reaches the router
    through the weights). A row holding -1 routes itself; the layer also returns the router's own top-k."""
    config = dataclasses.replace(load_config(ROOT / "configs/tiny.yaml"), routed_scaling_factor=2.5).with_runtime(
        moe_impl="ragged_dot")  # (the dispatch impls equal each other: test_moe.py; this one compiles fastest)
    moe = MoE(config, dtype="float32", rngs=nnx.Rngs(3))
    e, k, f = config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size
    x = jax.random.normal(jax.random.key(0), (2, 5, config.hidden_size))
    rng = np.random.default_rng(0)
    forced = np.stack([rng.permutation(e)[:k] for _ in range(10)]).astype(np.int32)
    forced[3] = -1
    w_router, gate_up, down = moe.gate.weight[...], moe.experts.gate_up[...], moe.experts.down[...]

    def reference(x):
        flat = x.reshape(-1, x.shape[-1])
        probs = jax.nn.softmax(jnp.dot(flat, w_router, precision="highest"), axis=-1)
        own = jnp.argsort(-probs, axis=-1)[:, :k]
        ids = jnp.where(jnp.asarray(forced)[:, :1] >= 0, forced, own)
        w = jnp.take_along_axis(probs, ids, axis=-1)
        w = w / w.sum(-1, keepdims=True) * 2.5
        h = jnp.einsum("nh,nkhf->nkf", flat, gate_up[ids], precision="highest")
        y = jnp.einsum("nkf,nkfh->nkh", jax.nn.silu(h[..., :f]) * h[..., f:], down[ids], precision="highest")
        return (jnp.sum(w[..., None] * y, axis=1) + moe.shared_experts(flat)).reshape(x.shape), own, ids

    cot = jax.random.normal(jax.random.key(1), x.shape)

    @jax.jit  # one program for both, values and gradients
    def both(x):
        ours, ref = moe(x, forced, return_ids=True), reference(x)
        grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * cot))(x) for f in (lambda x: moe(x, forced),
                                                                           lambda x: reference(x)[0])]
        return ours, ref, grads

    (y, used, own), (want, want_own, want_ids), (g, g_ref) = both(x)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(used, want_ids)
    np.testing.assert_array_equal(np.sort(own, -1), np.sort(want_own, -1))
    assert not np.array_equal(np.sort(used, -1), np.sort(own, -1))  # the forced ids are not the router's choice
    np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-5)


def test_router_disagreement_counts_like_a_loop():
    rng = np.random.default_rng(0)
    own = rng.integers(0, 6, (3, 5, 2, 3))
    recorded = np.where(rng.uniform(size=own.shape) < 0.7, own, rng.integers(0, 6, own.shape))
    recorded[0, 1] = -1  # a token the engine did not record
    recorded[:, :, 0] = -1  # a dense layer
    differ = total = 0
    for token in np.ndindex(own.shape[:3]):
        if (recorded[token] < 0).any():
            continue
        for e in recorded[token]:
            differ, total = differ + (e not in set(own[token])), total + 1
    assert float(grpo.router_disagreement(own, recorded)) == pytest.approx(differ / total)
    assert float(grpo.router_disagreement(recorded, recorded)) == 0.0


def test_one_step_of_the_demo_rolls_out_through_the_engine_on_a_mesh(tmp_path):
    """configs/grpo-tiny.yaml, one step with smaller groups and routing replay on train.mesh data=2,expert=2,tensor=2
    (8 simulated devices; the engine serves the trainer's base arrays on the same mesh): the trainer's log-probs of the
    engine's samples equal the engine's (same weights, same adapter through its PEFT export); the engine recorded
    every token's routing (prompt pages served from the cache too: else build_batch refuses the batch), its ids
    equal the trainer's own top-k (the router-disagreement metric: an off-by-one alignment would not), the
    replayed forward used exactly them; with grad_accum 2 the trainer's log-probs are taken one micro-batch at a
    time and put back in row order (a mix-up would break the equalities); the run writes what SFT runs write."""
    d = run_config.load(ROOT / "configs/grpo-tiny.yaml").to_dict()
    d["grpo"].update(group_size=4, prompts_per_step=2, max_tokens=4, kl_coef=0.05, routing="bogus")
    with pytest.raises(ConfigError, match=r"grpo.routing = 'bogus'; expected one of \['replay', 'recompute'\]"):
        run_config.from_dict(d)
    d["grpo"]["routing"] = "replay"
    d["train"].update(grad_accum=3)  # the step's 8 rollouts split into micro-batches (train.batch_size not read)
    with pytest.raises(ConfigError, match=r": train.grad_accum = 3 must divide grpo.prompts_per_step x group_size = 8 "
                                          r"\(the step's rollouts, split into micro-batches\)$"):
        run_config.from_dict(d)
    d["train"].update(steps=1, batch_size=1, grad_accum=2, out_dir=str(tmp_path / "run"),
                      mesh={"data": 2, "expert": 2, "tensor": 2})
    (rec,) = grpo.train(run_config.from_dict(d))
    assert rec["logprob_diff_max"] < 1e-4, rec
    assert rec["router_disagree_replayed"] == 0.0 and rec["router_disagree"] < 1e-3, rec
    assert 0.0 <= rec["reward"] <= 2.0 and rec["reply_tokens"] == 4.0
    assert set(rec) >= {"loss", "reward_std", "reward_normalized", "reward_data.grpo_rewards:digit_share", "kl",
                        "clip_frac", "grad_norm", "rollout_s", "update_s"}
    # the cache's pages are split over data x expert = 4 shards of 2 rows: a group (4 rows) spans 2 shards, and its
    # second sample, beside the first on its shard, reuses its full prompt page (16 of the prompt's 31 tokens)
    assert rec["cached_prompt_tokens"] == 2 * 1 * 16
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


def test_the_rollout_engine_holds_every_sample_on_a_split_cache():
    """The engine GRPO builds on train.mesh (its cache split over data x expert = 4 shards of one row each) takes
    every sample of a step at full length: each shard holds its rows' pages beside its own null page (the rule the
    engine checks when it starts; a cache sized for one device, 18 pages, left each shard 48 of 64 tokens)."""
    from infer.engine.engine import Engine
    from small4_jax.parallel.placement import place_model
    from small4_jax.parallel.sharding import make_mesh

    d = run_config.load(ROOT / "configs/grpo-tiny.yaml").to_dict()
    d["grpo"].update(group_size=2, prompts_per_step=2, max_tokens=3)
    cfg = run_config.from_dict(d)
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    lim = grpo.Rollouts.engine_limits(cfg, 31, mesh)
    assert lim["num_pages"] == 4 * (1 * 64 // 16 + 2) and lim["max_model_len"] == 64
    model = place_model(init_model(cfg.model, seed=0, dtype="float32"), mesh)
    engine = Engine(model, load_tokenizer(cfg), **lim, prefill_chunks=(lim["prefill_chunk"],), mesh=mesh)
    assert engine.cache_shards == 4 and engine.pool.capacity >= 4 * 64 // 16


def test_a_stopped_run_resumes_exactly(tmp_path):
    """GRPO stopped after step 1 (its checkpoint: adapter, AdamW, step, data position, RNG) and resumed with --resume
    draws the same rollouts and takes the same update at step 2 as a run never stopped: every metric but the
    timings equal, metrics.jsonl holding each step once; `train.export --peft` of it gives that run's adapter."""
    d = run_config.load(ROOT / "configs/grpo-tiny.yaml").to_dict()
    d["grpo"].update(group_size=2, prompts_per_step=2, max_tokens=3)
    d["train"].update(steps=2, ckpt_every=1, out_dir=str(tmp_path / "whole"))
    whole = grpo.train(run_config.from_dict(d))
    d["train"]["out_dir"] = str(tmp_path / "stopped")
    cfg = run_config.from_dict(d)
    (first,) = grpo.train(cfg, stop_after=1)
    (second,) = grpo.train(cfg, resume=True)

    def same(r):
        return {k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"}

    assert [same(first), same(second)] == [same(r) for r in whole]
    lines = (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    # the run exports like an SFT one: its PEFT adapter on the plain base equals the never-stopped run's adapter
    assert export(["--run", str(tmp_path / "stopped"), "--peft", str(tmp_path / "adapter")]) == 0
    whole_model, _, step = load_run(tmp_path / "whole")
    plain = init_model(cfg.model, seed=cfg.base.seed, dtype=cfg.base.dtype)
    base = lora.merged_params(plain)
    assert step == 2 and lora.load_peft(plain, tmp_path / "adapter")
    want, got = lora.merged_params(whole_model), lora.merged_params(plain)
    assert want.keys() == got.keys() and any(not np.allclose(want[k], base[k]) for k in want)  # the adapter trained
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=str(k))


def test_think_mask_and_batch_alignment():
    """[THINK] ... [/THINK] (markers included) leave the loss with think: mask; reply token k's target sits at
    prompt length - 1 + k, beside the engine's log-prob of that token."""
    assert grpo.think_mask([7, 30, 8, 9, 31, 5, 2], 30, 31).tolist() == [1, 0, 0, 0, 0, 1, 1]
    assert grpo.think_mask([7, 8], None, None).tolist() == [1, 1]
    prompts = [[1, 3, 4], [1, 5]]
    routed = [np.arange(4 * 2 * 3).reshape(4, 2, 3), 100 + np.arange(3 * 2 * 3).reshape(3, 2, 3)]
    samples = [[([10, 11], [-0.5, -0.25], routed[0])], [([12, 2], [-1.0, -2.0], routed[1])]]
    b = grpo.build_batch(prompts, samples, 6, 0, [np.ones(2, np.float32), np.array([1.0, 0.0], np.float32)])
    np.testing.assert_array_equal(b["routing"][0, :4], routed[0])  # input token j's routing at position j
    np.testing.assert_array_equal(b["routing"][1, :3], routed[1])
    assert (b["routing"][0, 4:] == -1).all() and (b["routing"][1, 3:] == -1).all()
    routed[1][1] = -1
    with pytest.raises(ValueError, match=r"sample 1: the engine recorded no routing for the tokens at \[1\]"):
        grpo.build_batch(prompts, samples, 6, 0, [np.ones(2, np.float32)] * 2)
    np.testing.assert_array_equal(b["inputs"], [[1, 3, 4, 10, 0, 0], [1, 5, 12, 0, 0, 0]])
    np.testing.assert_array_equal(b["targets"], [[3, 4, 10, 11, 0, 0], [5, 12, 2, 0, 0, 0]])
    np.testing.assert_array_equal(b["weights"], [[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["engine_logp"], [[0, 0, -0.5, -0.25, 0, 0], [0, -1.0, -2.0, 0, 0, 0]])
    np.testing.assert_array_equal(b["segments"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["reply"], [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
