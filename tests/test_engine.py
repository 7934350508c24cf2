"""The serving engine (`infer.engine.engine`) on a tiny transformers-made checkpoint.

References: transformers' greedy `generate` on the same weights, one request at a time; the model's full forward
pass for logprobs. One engine is shared by the module (compiled: prefill [1, 16] and [2, 16], decode [8, 1]).
"""

import jax
import numpy as np
import pytest
import torch

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from infer.engine.engine import Engine, QueueFull, SamplingOptions
from small4_jax.errors import InputError
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

VOCAB = 512  # the bundled tiny tekken tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_hf_config(vocab_size=VOCAB, eos_token_id=2)  # context 64, original_max_position_embeddings 16
    hf = make_hf_model(config, seed=21)
    path = tmp_path_factory.mktemp("hf")
    save_hf(hf, path)
    model = small4_jax.from_pretrained(path, dtype="float32")
    tokenizer = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    engine = Engine(model, tokenizer, max_batch=8, page_size=8, prefill_chunk=16, prefill_batch=2, batch_buckets=(8,),
                    page_buckets=(8,))
    return hf, model, engine


def _prompts(n, seed=0, lengths=None):
    rng = np.random.default_rng(seed)
    lengths = lengths or rng.integers(2, 34, n).tolist()
    return [[1] + rng.integers(40, VOCAB, k - 1).tolist() for k in lengths]


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        seq = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=2)
    return seq[0, len(prompt):].tolist()


def _run(engine, arrivals, max_steps=500):
    """Submit (step, prompt, options) entries at their steps; step until all finish; returns merged outputs."""
    from infer.engine.engine import merge_outputs

    events = {}
    for step in range(max_steps):
        for i, (at, prompt, options) in enumerate(arrivals):
            if at == step:
                engine.submit(prompt, options, callback=lambda o, i=i: events.setdefault(i, []).append(o))
        engine.step()
        if len(events) == len(arrivals) and all(e[-1].finished for e in events.values()):
            return [merge_outputs(events[i]) for i in range(len(arrivals))]
    raise AssertionError("requests did not finish")


def test_concurrent_greedy_equals_single_and_transformers(setup):
    hf, _, engine = setup
    prompts = _prompts(8, lengths=[3, 18, 7, 25, 12, 33, 5, 20])
    max_tokens = [12, 8, 16, 10, 14, 6, 16, 9]
    steps = [0, 0, 1, 3, 3, 5, 8, 11]  # arriving while others prefill and decode
    together = _run(engine, [(s, p, SamplingOptions(max_tokens=m)) for s, p, m in zip(steps, prompts, max_tokens)])
    alone = [_run(engine, [(0, p, SamplingOptions(max_tokens=m))])[0] for p, m in zip(prompts, max_tokens)]
    generated = 0
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        ref = _hf_greedy(hf, p, m)
        assert together[i].token_ids == ref, i
        assert alone[i].token_ids == ref, i
        assert together[i].finish_reason == ("stop" if ref[-1] == 2 else "length")
        generated += len(ref)
    assert generated >= 60  # the comparison covers many tokens, not a few before EOS
    m = engine.metrics()
    assert m["running"] == 0 and m["waiting"] == 0 and m["pages_used"] == 0


def test_prefix_cache_reuses_pages_and_keeps_outputs(setup):
    hf, _, engine = setup
    shared = _prompts(1, seed=5, lengths=[26])[0]
    a, b = shared + [77, 78], shared + [91]
    before = engine.metrics()["cached_tokens"]
    first = _run(engine, [(0, a, SamplingOptions(max_tokens=6))])[0]
    second = _run(engine, [(0, b, SamplingOptions(max_tokens=6))])[0]
    assert first.cached_tokens == 0 or first.cached_tokens % 8 == 0
    assert second.cached_tokens == 24  # three full pages of the shared 26-token prefix
    assert engine.metrics()["cached_tokens"] - before >= 24
    assert first.token_ids == _hf_greedy(hf, a, 6)
    assert second.token_ids == _hf_greedy(hf, b, 6)
    # another tenant's salt or images root another key chain: nothing is shared (an adapter's identity does too:
    # tests/test_multi_lora.py; an engine without adapter slots refuses an adapter instead of ignoring it)
    with pytest.raises(InputError, match="serves no LoRA adapters"):
        engine.submit(b, SamplingOptions(max_tokens=6), adapter="other")
    for kwargs in (dict(cache_salt="tenant-2"), dict(image_hashes=["img"])):
        events = []
        engine.submit(b, SamplingOptions(max_tokens=6), callback=events.append, **kwargs)
        while not (events and events[-1].finished):
            engine.step()
        assert events[-1].cached_tokens == 0, kwargs
        assert [t for e in events for t in e.token_ids] == second.token_ids


def test_logprobs_match_the_full_forward(setup):
    _, model, engine = setup
    prompt = _prompts(1, seed=9, lengths=[10])[0]
    out = _run(engine, [(0, prompt, SamplingOptions(max_tokens=5, logprobs=3))])[0]
    seq = np.asarray([prompt + out.token_ids], np.int32)
    ref = np.asarray(torch.log_softmax(torch.tensor(np.asarray(model(seq))[0]), -1))
    assert len(out.logprobs) == 5
    for k, lp in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + k]
        assert lp.token_id == out.token_ids[k] == int(row.argmax())
        np.testing.assert_allclose(lp.logprob, row[lp.token_id], atol=1e-4)
        assert [t for t, _ in lp.top] == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:3], atol=1e-4)


def test_per_request_sampling_in_one_batch(setup):
    _, _, engine = setup
    prompt = _prompts(1, seed=3, lengths=[9])[0]
    greedy = SamplingOptions(max_tokens=10, ignore_eos=True)
    hot = dict(max_tokens=10, temperature=1.5, ignore_eos=True)
    outs = _run(engine, [
        (0, prompt, greedy),
        (0, prompt, SamplingOptions(**hot, seed=7)),
        (0, prompt, SamplingOptions(**hot, seed=7)),
        (2, prompt, SamplingOptions(**hot, seed=8)),
        (0, prompt, SamplingOptions(**hot, seed=9, top_k=1)),  # top-k 1 is greedy
        (1, prompt, SamplingOptions(**hot, seed=9, min_p=1.0)),  # only the most likely token survives min-p 1
        (0, prompt, SamplingOptions(**hot, seed=9, top_p=1e-6)),  # the smallest nucleus is the top token
    ])
    assert outs[1].token_ids == outs[2].token_ids  # same seed, same tokens, whatever the batch
    assert outs[1].token_ids != outs[3].token_ids
    assert outs[1].token_ids != outs[0].token_ids
    for i in (4, 5, 6):
        assert outs[i].token_ids == outs[0].token_ids, i
    # the same seed alone in the batch draws the same tokens
    assert _run(engine, [(0, prompt, SamplingOptions(**hot, seed=7))])[0].token_ids == outs[1].token_ids


def test_stop_strings_and_stop_ids(setup):
    _, _, engine = setup
    prompt = _prompts(1, seed=11, lengths=[6])[0]
    free = _run(engine, [(0, prompt, SamplingOptions(max_tokens=24, ignore_eos=True))])[0]
    assert len(free.text) > 12, free.text
    stop = free.text[6:9]
    cut = free.text.find(stop)
    out = _run(engine, [(0, prompt, SamplingOptions(max_tokens=24, ignore_eos=True, stop=(stop, "\x00never")))])[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:cut]
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    out = _run(engine, [(0, prompt, SamplingOptions(max_tokens=24, ignore_eos=True, stop_token_ids=(stop_id,)))])[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]


def test_streamed_text_equals_decoded_ids(setup):
    _, _, engine = setup
    events = []
    prompt = _prompts(1, seed=12, lengths=[5])[0]
    engine.submit(prompt, SamplingOptions(max_tokens=15, ignore_eos=True), callback=events.append)
    while not (events and events[-1].finished):
        engine.step()
    ids = [t for e in events for t in e.token_ids]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(ids)
    assert len(events) == 16 and events[-1].completion_tokens == 15 and events[-1].prompt_tokens == 5


def test_cancel_frees_pages(setup):
    _, _, engine = setup
    events = []
    rid = engine.submit(_prompts(1, seed=13, lengths=[20])[0], SamplingOptions(max_tokens=40, ignore_eos=True),
                        callback=events.append)
    for _ in range(4):
        engine.step()
    assert engine.metrics()["pages_used"] == 3 and engine.metrics()["running"] == 1
    engine.cancel(rid)
    engine.step()
    assert events[-1].finished and events[-1].finish_reason == "cancelled"
    assert engine.metrics()["pages_used"] == 0 and engine.metrics()["running"] == 0


def test_bounded_queue_and_bad_requests(setup):
    _, _, engine = setup
    small = Engine(engine.model, max_batch=8, page_size=8, max_queue=2, batch_buckets=(8,), page_buckets=(8,))
    small.submit([1, 2, 3])
    small.submit([1, 2, 3])
    with pytest.raises(QueueFull, match="queue is full"):
        small.submit([1, 2, 3])
    with pytest.raises(InputError, match="prompt has 64 tokens but the model's context is 64"):
        engine.submit([1] * 64)
    with pytest.raises(InputError, match="empty prompt"):
        engine.submit([])
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.submit([1, VOCAB])
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(min_p=2.0), dict(logprobs=21)):
        with pytest.raises(InputError):
            SamplingOptions(**bad)


def test_preemption_under_page_pressure_keeps_outputs(setup):
    hf, model, _ = setup
    # 8 usable pages of 8 tokens: three requests growing to 23-34 tokens (3-5 pages each) must take turns
    engine = Engine(model, max_batch=4, page_size=8, num_pages=9, prefill_chunk=16, batch_buckets=(4,),
                    page_buckets=(8,))
    prompts = _prompts(3, seed=17, lengths=[14, 20, 9])
    outs = _run(engine, [(0, p, SamplingOptions(max_tokens=14)) for p in prompts])
    assert engine.metrics()["preempted"] > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == _hf_greedy(hf, p, 14)


def test_engine_on_an_expert_parallel_mesh(setup):
    """Weights placed by the sharding rules on data=1,expert=8,tensor=1: the same greedy tokens as transformers."""
    from flax import nnx

    from small4_jax.parallel.placement import place_model
    from small4_jax.parallel.sharding import make_mesh

    hf, model, _ = setup
    mesh = make_mesh({"data": 1, "expert": 8, "tensor": 1})
    sharded = place_model(nnx.clone(model), mesh)
    assert len(sharded.layers[1].mlp.experts.gate_up[...].sharding.device_set) == 8
    engine = Engine(sharded, max_batch=8, page_size=8, prefill_chunk=16, batch_buckets=(8,), page_buckets=(8,),
                    mesh=mesh)
    assert len(engine.pages.sharding.device_set) == 8 and engine.cache_axes == ("expert",)
    pages = engine.pages  # split 8 ways (data-parallel attention over expert), not one cache copied on every device
    assert {s.data.shape[1] for s in pages.addressable_shards} == {pages.shape[1] // 8}
    prompts = _prompts(3, seed=23, lengths=[5, 17, 30])
    outs = _run(engine, [(i, p, SamplingOptions(max_tokens=8)) for i, p in enumerate(prompts)])
    for p, o in zip(prompts, outs):
        assert o.token_ids == _hf_greedy(hf, p, 8)


def test_warmup_compiles_every_step_so_requests_compile_nothing(setup):
    """One page-table width by default: warm-up compiles len(prefill buckets) + len(batch buckets) programs, one
    progress line each, and afterwards requests of every length the limits allow (1 token to the whole context),
    arriving while others run, greedy and sampled, with penalties, logit bias, logprobs and stop strings, compile
    nothing: every XLA compile in the process is counted (jax.monitoring's backend-compile event)."""
    import dataclasses

    from jax import monitoring

    _, model, _ = setup
    engine = Engine(model, load_tokenizer(ASSETS_DIR / "tiny_tekken.json"), max_batch=4, page_size=8,
                    prefill_chunk=16, prefill_batch=2)
    assert engine.page_buckets == (8,)  # the pages of the model's 64-token context
    assert engine.warmup_shapes() == [("prefill", 1, 16, 8), ("prefill", 2, 16, 8), ("decode", 1, 1, 8),
                                      ("decode", 2, 1, 8), ("decode", 4, 1, 8)]
    lines = []
    engine.warmup(progress=lines.append)
    assert len(lines) == 5 and lines[-1].startswith("warm-up 5/5: decode [4 x 1] x 8 pages compiled (")

    compiles = []

    def listen(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kw)

    context = engine.max_model_len
    lengths = [1, 3, 8, 9, 16, 17, 40, context - 1]
    kinds = [SamplingOptions(max_tokens=6), SamplingOptions(max_tokens=5, temperature=0.8, top_p=0.9, seed=1),
             SamplingOptions(max_tokens=4, presence_penalty=0.5, repetition_penalty=1.2, logit_bias={5: 3.0}),
             SamplingOptions(max_tokens=7, logprobs=3, stop=("e",), top_k=5, temperature=1.0)]
    arrivals = [(2 * i, p, dataclasses.replace(kinds[i % len(kinds)],
                                               max_tokens=min(kinds[i % len(kinds)].max_tokens, context - len(p))))
                for i, p in enumerate(_prompts(len(lengths), seed=31, lengths=lengths))]
    monitoring.register_event_duration_secs_listener(listen)
    try:
        outs = _run(engine, arrivals)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert compiles == [], f"{len(compiles)} compiles after warm-up"


def test_sharded_cache_equals_the_single_device_engine(setup):
    """Pages sharded over data=2 x expert=4 by default (data-parallel attention over both axes, `sharding.RULES`)
    with the MoE expert-parallel over expert=4: each request's pages live on the shard it was given, several shards
    serve, the cache is split in eight, and the greedy tokens are those of the single-device engine (itself =
    transformers above)."""
    from flax import nnx
    from jax.sharding import PartitionSpec

    from infer.engine.engine import merge_outputs
    from small4_jax.parallel.placement import place_model
    from small4_jax.parallel.sharding import make_mesh

    _, model, single = setup
    mesh = make_mesh({"data": 2, "expert": 4, "tensor": 1})
    dp = Engine(place_model(nnx.clone(model), mesh), max_batch=8, page_size=8, num_pages=8 * 10, prefill_chunk=16,
                prefill_batch=1, batch_buckets=(8,), mesh=mesh, record_routing=True)
    assert dp.cache_axes == ("data", "expert") and dp.cache_shards == 8 and dp.pool.capacity == 72
    assert dp.pages.sharding.spec == PartitionSpec(None, ("data", "expert"))
    assert {s.data.shape[1] for s in dp.pages.addressable_shards} == {10}  # each device holds its shard's pages
    prompts = _prompts(6, seed=29, lengths=[5, 17, 30, 9, 22, 3])
    arrivals = [(0, prompts[0]), (0, prompts[1]), (1, prompts[2]), (2, prompts[3]), (4, prompts[4]), (6, prompts[5])]
    options = SamplingOptions(max_tokens=9)
    want = _run(single, [(at, p, options) for at, p in arrivals])
    events, used = {}, set()
    for step in range(300):
        for i, (at, p) in enumerate(arrivals):
            if at == step:
                dp.submit(p, options, callback=lambda o, i=i: events.setdefault(i, []).append(o))
        dp.step()
        for r in dp.running:
            used.add(r.shard)
            assert {dp.pool.shard_of(pg) for pg in r.pages} <= {r.shard}, (r.id, r.shard, r.pages)
        if len(events) == len(arrivals) and all(e[-1].finished for e in events.values()):
            break
    got = [merge_outputs(events[i]) for i in range(len(arrivals))]
    assert len(used) > 2
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, i
    assert dp.metrics()["pages_used"] == 0
    # record_routing (GRPO's routing replay) with the rows in shard blocks: each token's recorded expert ids are the
    # top-k of the plain (unpaged, one-device) forward over the same sequence
    seqs = [p + g.token_ids for (_, p), g in zip(arrivals, got)]
    ids = np.zeros((len(seqs), max(map(len, seqs)) - 1), np.int32)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq) - 1] = seq[:-1]
    _, (_, own) = jax.jit(lambda x: model.token_logprobs(x, x, return_routing=True))(ids)
    for r, (seq, g) in enumerate(zip(seqs, got)):
        assert g.routed_experts.shape == (len(seq) - 1, *own.shape[2:]), r
        np.testing.assert_array_equal(np.sort(g.routed_experts, -1), np.sort(own[r, :len(seq) - 1], -1))


def _hf_penalised_greedy(hf, prompt, n, rep=1.0, freq=0.0, pres=0.0, bias=None):
    """Greedy decoding over transformers' logits with the penalties and bias applied in numpy, token by token."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, -1].double().numpy()
        for t, v in (bias or {}).items():
            logits[t] += v
        counts = np.bincount(out, minlength=VOCAB) if out else np.zeros(VOCAB, int)
        seen = counts > 0
        seen[prompt] = True
        logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * (counts > 0)
        out.append(int(logits.argmax()))
        seq.append(out[-1])
        if out[-1] == 2:
            break
    return out


def test_penalties_and_logit_bias_equal_a_numpy_reference(setup):
    hf, _, engine = setup
    prompts = _prompts(4, seed=13, lengths=[9, 20, 5, 14])
    settings = [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5, presence_penalty=0.5),
                dict(presence_penalty=2.0, logit_bias={77: 4.0, 91: -100.0}), dict(frequency_penalty=-0.5)]
    arrivals = [(i, p, SamplingOptions(max_tokens=10, **kw)) for i, (p, kw) in enumerate(zip(prompts, settings))]
    got = _run(engine, arrivals)
    for (_, p, o), out in zip(arrivals, got):
        ref = _hf_penalised_greedy(hf, p, 10, o.repetition_penalty, o.frequency_penalty, o.presence_penalty,
                                   o.logit_bias)
        assert out.token_ids == ref, o
    plain = _run(engine, [(0, prompts[1], SamplingOptions(max_tokens=10))])[0]
    assert plain.token_ids != got[1].token_ids  # the penalties changed something
    forced = _run(engine, [(0, prompts[0], SamplingOptions(max_tokens=4, logit_bias={123: 100.0}))])[0]
    assert forced.token_ids == [123] * 4


def test_page_table_rows_follow_every_change_of_the_page_lists():
    """The engine's per-slot page table, updated by what changed, equals the table built from the page lists after
    random appends, rollbacks (`del pages[k:]`), preemptions (a new list) and slots passing to other requests."""
    import types

    from infer.engine.engine import Engine, PageList, _Request
    from small4_jax.nn.paged import NULL_PAGE

    rng = np.random.default_rng()
    max_batch, width = 4, 12
    eng = Engine.__new__(Engine)
    eng.max_batch, eng.page_buckets = max_batch, (5, width)
    eng._table = np.full((max_batch + 1, width), NULL_PAGE, np.int32)
    eng._table_copy = [(None, 0)] * (max_batch + 1)
    reqs = [types.SimpleNamespace(slot=s, pages=PageList()) for s in range(max_batch)]
    assert isinstance(_Request("r", [1], 1, None, 0, frozenset(), None, 0.0).pages, PageList)
    for _ in range(300):
        r = reqs[rng.integers(max_batch)]
        op = rng.integers(5)
        if op == 0:  # a decode or prefill step appends pages
            r.pages += rng.integers(1, 1000, rng.integers(1, 4)).tolist()
        elif op == 1 and r.pages:  # a speculative rollback, then new pages
            del r.pages[rng.integers(len(r.pages)):]
            r.pages += rng.integers(1, 1000, rng.integers(0, 3)).tolist()
        elif op == 2:  # preempted and readmitted (or the slot goes to a new request): a new list
            r.pages = PageList(rng.integers(1, 1000, rng.integers(0, width)).tolist())
        elif op == 3 and r.pages:
            r.pages[rng.integers(len(r.pages))] = int(rng.integers(1, 1000))
        del r.pages[width:]
        step = [q for q in reqs if rng.random() < 0.7]
        rows = len(step) + int(rng.integers(0, 2))
        n_pages = max([len(q.pages) for q in step] + [1])
        got = eng.page_table(step, rows, n_pages)
        want = np.full((rows, 5 if n_pages <= 5 else width), NULL_PAGE, np.int32)
        for i, q in enumerate(step):
            want[i, : len(q.pages)] = q.pages[: want.shape[1]]
        np.testing.assert_array_equal(got, want)
