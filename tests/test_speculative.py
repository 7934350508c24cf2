"""Speculative decoding (`infer/speculative/decoder.py`, `batch_sampling.verify_rows`).

References: the same engine without speculation (greedy token for token), a brute-force n-gram lookup, and the
target's own processed distribution (chi-squared over many seeded draws).
"""

import dataclasses

import numpy as np
import pytest
import scipy.stats

import jax
import jax.numpy as jnp

import small4_jax
from infer.cli import engine_kwargs
from infer.engine.engine import Engine, SamplingOptions, merge_outputs
from infer.generate import parse_args
from infer.server.core import Server
from infer.server.metrics import metrics_text
from infer.speculative.decoder import SpeculativeConfig, ngram_lookup
from small4_jax.decode.sampler import RowSampling, TokenHistory, sampling_logits, verify_rows
from small4_jax.errors import InputError

# 12 usable pages of 8 tokens for 4 rows of up to 64: rows are preempted when long ones grow together. Every engine
# here has the same shapes, so they share compiled steps.
ENGINE = dict(max_batch=4, page_size=8, prefill_chunk=16, prefill_batch=2, batch_buckets=(4,), page_buckets=(8,),
              max_model_len=64, num_pages=13)


@pytest.fixture(scope="module")
def model():
    config = small4_jax.load_config("configs/tiny.yaml").replace(max_position_embeddings=64)
    return small4_jax.init_model(config, seed=3)


def _run(engine, prompts, options, max_steps=400):
    events = {i: [] for i in range(len(prompts))}
    for i, (p, o) in enumerate(zip(prompts, options)):
        engine.submit(p, o, callback=events[i].append)
    for _ in range(max_steps):
        engine.step()
        if all(e and e[-1].finished for e in events.values()):
            return [merge_outputs(events[i]) for i in range(len(prompts))]
    raise AssertionError("requests did not finish")


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:  # repeated phrases, so prompt lookup has something to find
        phrase = rng.integers(40, 500, 5).tolist()
        out.append(([1] + phrase * 8)[:n])
    return out


def test_ngram_lookup_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens = rng.integers(0, 4, rng.integers(1, 30)).tolist()
        room, nmax, nmin = int(rng.integers(0, 5)), int(rng.integers(1, 5)), 1
        want = []
        for n in range(min(nmax, len(tokens) - 1), nmin - 1, -1):
            starts = [s for s in range(len(tokens) - n) if tokens[s: s + n] == tokens[len(tokens) - n:]]
            if starts:
                want = tokens[starts[-1] + n: starts[-1] + n + room]
                break
        got = ngram_lookup(np.asarray(tokens, np.int32), room, nmax, nmin)
        assert got == (want if room else []), (tokens, room, nmax)


def test_bad_speculative_flags():
    with pytest.raises(InputError, match="expected one of 'ngram', 'eagle:DIR'"):
        SpeculativeConfig.parse("medusa")
    with pytest.raises(InputError, match="eagle:DIR"):
        SpeculativeConfig.parse("eagle")
    with pytest.raises(InputError, match="--num-draft-tokens"):
        SpeculativeConfig.parse("ngram", 0)


def test_speculative_flags_of_generate_and_serve():
    from infer.serve import parse_args as serve_args

    argv = ["--config", "configs/tiny.yaml", "--speculative", "eagle:/ckpt/draft", "--num-draft-tokens", "3"]
    want = SpeculativeConfig("eagle", "/ckpt/draft", 3)
    assert engine_kwargs(parse_args([*argv, "--prompt", "x"]))["speculative"] == want
    assert engine_kwargs(serve_args(argv))["speculative"] == want
    assert engine_kwargs(parse_args(["--config", "c", "--prompt", "x"]))["speculative"] is None


def test_rejection_sampling_keeps_the_target_distribution():
    """Marginal of the first token = p_0; the second token, given the first draft was accepted, = p_1 (with a
    frequency penalty that counts the accepted draft, and a logit bias)."""
    vocab, n = 6, 10000
    logits = jax.random.normal(jax.random.key(0), (1, 3, vocab)) * 1.5
    first, second = (int(x) for x in jnp.argsort(-logits[0, :2], axis=-1)[:, 1])  # the second most likely tokens
    logits = jnp.broadcast_to(logits, (n, 3, vocab))
    drafts = jnp.broadcast_to(jnp.asarray([[first, second]], jnp.int32), (n, 2))
    p = RowSampling.from_lists([1.3] * n, [0] * n, [0.97] * n, [0.0] * n, np.arange(n), [5] * n, vocab=vocab,
                               frequency=[0.7] * n, logit_bias=[{1: 0.5}] * n, slot=[0] * n)
    history = TokenHistory.create(1, vocab)
    accepted, tokens, *_ = jax.jit(verify_rows, static_argnums=5)(logits, drafts, jnp.full((n,), 2), p, history, 2)
    accepted, tokens = np.asarray(accepted), np.asarray(tokens)
    one = jax.tree.map(lambda x: x[:1], p)
    p0 = jax.nn.softmax(sampling_logits(logits[0, :1], one, history.counts[:1], history.prompt[:1]), -1)[0]
    seen = history.counts[:1].at[0, first].add(1)  # the accepted draft counts for the frequency penalty
    one1 = dataclasses.replace(one, counter=one.counter + 1)
    p1 = jax.nn.softmax(sampling_logits(logits[0, 1:2], one1, seen, history.prompt[:1]), -1)[0]

    def check(sample, target):
        target = np.asarray(target, np.float64)
        support = target > 0
        counts = np.bincount(sample, minlength=vocab)
        assert counts[~support].sum() == 0
        expected = target[support] / target[support].sum() * len(sample)
        stat = scipy.stats.chisquare(counts[support], expected)
        assert support.sum() >= 3 and stat.pvalue > 1e-3, (counts, expected)

    check(tokens[:, 0], p0)
    after = tokens[accepted >= 1, 1]
    assert 500 < len(after) < n - 500
    check(after, p1)
    assert np.all((accepted >= 1) == (tokens[:, 0] == first))


@pytest.mark.parametrize("k", [2, 4])
def test_ngram_speculative_greedy_equals_plain_greedy(model, k):
    plain = Engine(model, **ENGINE)
    spec = Engine(model, speculative=SpeculativeConfig("ngram", num_draft_tokens=k), **ENGINE)
    prompts = _prompts(k, [9, 23, 14, 30, 6])
    options = [SamplingOptions(max_tokens=m, ignore_eos=True) for m in (20, 9, 17, 25, 12)]
    options[2] = SamplingOptions(max_tokens=17)  # EOS may stop it mid-draft
    options[3] = SamplingOptions(max_tokens=25, ignore_eos=True, frequency_penalty=0.6, repetition_penalty=1.2,
                                 logit_bias={7: 2.0})  # each draft position counts the drafts before it
    want = _run(plain, prompts, options)
    got = _run(spec, prompts, options)  # 5 requests over 4 slots: mixed batches, joins and leaves
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
    m = spec.metrics()
    assert m["spec_draft_tokens"] > 0 and m["spec_accepted_tokens"] > 0
    assert m["pages_used"] == 0 and m["running"] == 0


def test_speculative_greedy_across_preemption(model):
    prompts = _prompts(11, [24, 30, 19, 27])  # four rows growing to 43-49 tokens (6-7 pages each) take turns
    options = [SamplingOptions(max_tokens=19, ignore_eos=True)] * 4
    want = _run(Engine(model, **ENGINE), prompts, options)
    spec = Engine(model, speculative=SpeculativeConfig("ngram", num_draft_tokens=2), **ENGINE)
    got = _run(spec, prompts, options)
    assert spec.metrics()["preempted"] > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_speculative_greedy_on_a_sharded_cache(model):
    """Pages sharded over data=2 (data-parallel attention; the MoE expert-parallel over expert=4, 8 devices): the
    verify step runs each shard's rows on its own pages and rollback returns pages to their shard; the greedy tokens
    are the single-device plain engine's, across preemption within a shard."""
    from flax import nnx

    from small4_jax.parallel.placement import place_model
    from small4_jax.parallel.sharding import make_mesh

    prompts = _prompts(13, [24, 30, 19, 27, 9, 14])
    options = [SamplingOptions(max_tokens=19, ignore_eos=True)] * 4 + [
        SamplingOptions(max_tokens=12, ignore_eos=True, frequency_penalty=0.5), SamplingOptions(max_tokens=15)]
    want = _run(Engine(model, **ENGINE), prompts, options)
    mesh = make_mesh({"data": 2, "expert": 4, "tensor": 1})
    spec = Engine(place_model(nnx.clone(model), mesh), mesh=mesh,
                  speculative=SpeculativeConfig("ngram", num_draft_tokens=3), **dict(ENGINE, num_pages=2 * 11))
    assert spec.cache_shards == 2
    shards, events = set(), {i: [] for i in range(len(prompts))}
    for i, (p, o) in enumerate(zip(prompts, options)):
        spec.submit(p, o, callback=events[i].append)
    for _ in range(400):
        spec.step()
        for r in spec.running:
            shards.add(r.shard)
            assert {spec.pool.shard_of(pg) for pg in r.pages} <= {r.shard}
        if all(e and e[-1].finished for e in events.values()):
            break
    got = [merge_outputs(events[i]) for i in range(len(prompts))]
    m = spec.metrics()
    assert shards == {0, 1} and m["preempted"] > 0 and m["spec_accepted_tokens"] > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert m["pages_used"] == 0


class _Oracle:
    """A drafter that proposes exactly the target's greedy continuation (a draft equal to the target)."""

    def __init__(self, continuations):
        self.continuations = continuations

    def propose(self, engine, reqs, rooms):
        out = []
        for r, room in zip(reqs, rooms):
            full = self.continuations[tuple(r.tokens[: r.num_prompt])]
            out.append(full[r.generated: r.generated + room])
        return out


def test_a_draft_equal_to_the_target_accepts_every_token(model):
    prompts = _prompts(5, [7, 19, 12])
    options = [SamplingOptions(max_tokens=18, ignore_eos=True, logprobs=2)] * 3
    want = _run(Engine(model, **ENGINE), prompts, options)
    spec = Engine(model, speculative=SpeculativeConfig("ngram", num_draft_tokens=4), **ENGINE)
    spec.speculator.drafter = _Oracle({tuple(p): w.token_ids for p, w in zip(prompts, want)})
    got = _run(spec, prompts, options)
    m = spec.metrics()
    # 17 tokens after the prefill's first, 5 per verify step (fewer at the end): 4 steps per request
    assert m["spec_acceptance_rate"] == 1.0 and m["spec_verify_rows"] == 12 and m["spec_accepted_tokens"] == 39
    text = metrics_text(Server(spec, None, "tiny"))
    assert "small4_spec_acceptance_rate 1.0\n" in text and "small4_spec_accepted_tokens_total 39\n" in text
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        for a, b in zip(w.logprobs, g.logprobs):
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
            np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-4)


class _Fixed:
    """A drafter that always proposes the same tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, engine, reqs, rooms):
        return [self.tokens[:room] for room in rooms]


def test_speculative_sampling_matches_the_target_in_the_engine(model):
    """Seeded sampled requests: the second generated token, drawn by the verify step (the draft accepted or rejected,
    then the residual), follows the target's distribution given the first (chi-squared)."""
    prompt = _prompts(2, [12])[0]
    temp = 0.25

    def probs(context):
        logits = np.asarray(model(np.asarray([context], np.int32))[0, -1], np.float64) / temp
        p = np.exp(logits - logits.max())
        return p / p.sum()

    first = int(np.argmax(probs(prompt)))  # the prefill's most likely draw
    likely = np.argsort(-probs(prompt + [first]))[:2]
    spec = Engine(model, speculative=SpeculativeConfig("ngram", num_draft_tokens=2), **ENGINE)
    spec.speculator.drafter = _Fixed([int(t) for t in likely])  # accepted w.p. p(likely[0]), else the residual
    n = 160
    outs = spec.generate([prompt] * n, [SamplingOptions(max_tokens=4, temperature=temp, seed=s, ignore_eos=True)
                                        for s in range(n)])
    m = spec.metrics()
    assert 0 < m["spec_accepted_tokens"] < m["spec_draft_tokens"]
    # the prefill draws the first token (no speculation); the verify step draws the second given it
    by_first = {}
    for o in outs:
        by_first.setdefault(o.token_ids[0], []).append(o.token_ids[1])
    seconds = by_first[first]
    assert len(seconds) >= 50
    target = probs(prompt + [first])
    top = np.argsort(-target)[:4]
    sample = np.asarray(seconds)
    counts = np.asarray([(sample == t).sum() for t in top] + [(~np.isin(sample, top)).sum()])
    expected = np.append(target[top], 1 - target[top].sum()) * len(sample)
    assert scipy.stats.chisquare(counts, expected).pvalue > 1e-3, (counts, expected)


def test_generate_reports_its_acceptance(capsys):
    """`infer.generate --speculative` ends with the drafts' acceptance (what /metrics reports for the server)."""
    import re

    from infer.generate import main

    assert main(["--config", "configs/tiny.yaml", "--prompt-ids", "1,5,6,7,5,6,7,5,6", "--max-new-tokens", "6",
                 "--speculative", "ngram", "--num-draft-tokens", "2", "--max-model-len", "32", "--prefill-chunk",
                 "16", "--max-batch", "1", "--prefill-batch", "1"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    m = re.fullmatch(r"speculative \(ngram\): (\d+) of (\d+) draft tokens accepted \((\d+)%\), ([\d.]+) tokens per "
                     r"verify step", last)
    assert m, last
    accepted, proposed = int(m[1]), int(m[2])  # (random weights: the lookup may find nothing to draft)
    assert 0 <= accepted <= proposed and 0.0 <= float(m[4]) <= 3.0
