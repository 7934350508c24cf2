"""Multi-LoRA serving (`small4_jax/lora/multi.py`): one batch of base rows and rows of different adapters.

References: each request run alone through the same paged forward with its adapter attached the single-adapter way
(`lora.load_peft`: LoRALinear / ExpertsLoRA), and transformers + PEFT for an adapter made by peft itself.
Adapters: two written by our export (`lora.save_peft`: attention, shared and dense MLPs, all routed experts; different
ranks and alphas) and one made by peft (`get_peft_model(..., target_parameters=experts)`, random init).
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from infer.engine.engine import Engine, SamplingOptions, merge_outputs
from small4_jax.lora import adapters as lora
from small4_jax.errors import ConfigError, InputError
from small4_jax.lora.multi import MultiLoRA, MultiLoRAParam, parse_lora_flags
from small4_jax.nn.paged import PagedCache, logits_step


VOCAB = 128


def _randomise(model, seed):
    rng = np.random.RandomState(seed)
    flat = [(p, v.replace(jnp.asarray(0.05 * rng.randn(*v.shape), jnp.float32)))
            for p, v in nnx.to_flat_state(nnx.state(model, lora.TRAINABLE))]
    nnx.update(model, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_lora")
    cfg = tiny_hf_config()  # 3 layers: dense, then MoE (8 experts top-2, a shared expert)
    save_hf(make_hf_model(cfg, seed=3), root / "base")
    dirs = {}
    for name, (targets, rank, alpha, seed) in {
        "all4": (("all",), 4, 6.0, 1),
        "attn2": (("attention", "experts"), 2, 5.0, 2),
    }.items():
        m = small4_jax.from_pretrained(root / "base", dtype="float32")
        lora.apply_lora(m, lora.LoRAConfig(targets=targets, rank=rank, alpha=alpha, seed=seed))
        _randomise(m, seed + 10)
        lora.save_peft(m, root / name)
        dirs[name] = root / name
    hf = make_hf_model(cfg, seed=3)
    pcfg = peft.LoraConfig(r=3, lora_alpha=7, init_lora_weights=False,
                           target_modules=["q_a_proj", "kv_b_proj", "o_proj", "down_proj", "up_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(0)
    made = peft.get_peft_model(hf, pcfg)
    made.save_pretrained(root / "peft3")
    dirs["peft3"] = root / "peft3"
    return root, cfg, dirs, made.eval()


def _single(root, adapter_dir):
    m = small4_jax.from_pretrained(root / "base", dtype="float32")
    if adapter_dir is not None:
        lora.load_peft(m, adapter_dir)
    return m


def _forward_alone(model, ids, absorbed_steps=3):
    """Prefill ids [1, T] (expanded) then `absorbed_steps` absorbed decode steps of fixed tokens on a fresh cache;
    the logits of every step."""
    graphdef, state = nnx.split(model)
    pages = PagedCache.create(model.config, 9, 8).pages  # row 0: pages 1..8
    return _steps(graphdef, state, pages, ids, absorbed_steps, lambda: None)


def _steps(graphdef, state, pages, ids, absorbed_steps, before_step):
    b, t = ids.shape
    table = np.tile(np.arange(1, 9, dtype=np.int32)[None], (b, 1)) + 8 * np.arange(b, dtype=np.int32)[:, None]
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    slots = np.stack([np.take_along_axis(table, pos // 8, 1), pos % 8], -1).astype(np.int32)
    before_step()
    out = []
    logits, pages = logits_step(graphdef, state, pages, ids, pos, pos, slots, table, np.full((b,), t - 1, np.int32),
                                absorbed=False)
    out.append(np.asarray(logits))
    for s in range(absorbed_steps):
        p = t + s
        nxt = np.full((b, 1), 7 + s, np.int32)
        ps = np.full((b, 1), p, np.int32)
        sl = np.stack([table[:, p // 8][:, None], np.full((b, 1), p % 8)], -1).astype(np.int32)
        before_step()
        logits, pages = logits_step(graphdef, state, pages, nxt, ps, ps, sl, table, np.zeros((b,), np.int32),
                                    absorbed=True)
        out.append(np.asarray(logits))
    return out


MIXED_ROWS = [None, "all4", "attn2", "peft3", "all4"]


@pytest.fixture(scope="module")
def alone(setup):
    """Each request of the mixed batch run alone with its adapter attached the single-adapter way: (ids, logits)."""
    root, _, dirs, _ = setup
    ids = np.random.RandomState(0).randint(3, VOCAB, size=(len(MIXED_ROWS), 13)).astype(np.int32)
    want = [_forward_alone(_single(root, dirs[name] if name else None), ids[i : i + 1])
            for i, name in enumerate(MIXED_ROWS)]
    return ids, want


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "expert": 4, "tensor": 1}])
def test_mixed_batch_equals_each_request_alone(setup, alone, mesh_shape):
    """On one device, and on 8 (the routed experts expert-parallel inside their shard_map, expert adapters too)."""
    import contextlib

    from small4_jax.parallel.sharding import make_mesh

    root, cfg, dirs, _ = setup
    mesh = None if mesh_shape is None else make_mesh(mesh_shape)
    base = small4_jax.from_pretrained(root / "base", dtype="float32", mesh=mesh)
    multi = MultiLoRA(base, slots=5, rank=4, mesh=mesh)
    for name in ("all4", "attn2", "peft3"):
        multi.load(name, dirs[name])
    assert isinstance(base.layers[2].mlp.experts.lora, nnx.Module)
    if mesh is not None:  # the experts' slots are split over `expert` as the experts are, not copied on every device
        stack = base.layer_stacks[1].mlp.experts.lora.gate_up_a[...]  # [L, E, H, S*R]
        assert stack.sharding.shard_shape(stack.shape)[1] * 4 == stack.shape[1]
    rows = MIXED_ROWS
    ids, alone_logits = alone
    graphdef, state = nnx.split(base)
    pages = PagedCache.create(base.config, 1 + 8 * len(rows), 8).pages
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        got = _steps(graphdef, state, pages, ids, 3,
                     lambda: multi.set_ids(state, [multi.slot_of(n) for n in rows]))
    for i, name in enumerate(rows):
        want = alone_logits[i]
        for step, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_allclose(g[i], w[0], atol=1e-5, rtol=0, err_msg=f"row {i} ({name}), step {step}")
    # the adapters matter (also the experts': attn2 has only attention and expert adapters)
    assert np.abs(got[0][1] - got[0][0]).max() > 1e-2 and np.abs(got[-1][2] - got[-1][0]).max() > 1e-2


def test_peft_made_adapter_matches_transformers_peft(setup):
    root, cfg, dirs, made = setup
    base = small4_jax.from_pretrained(root / "base", dtype="float32")
    multi = MultiLoRA(base, slots=2, rank=3)
    multi.load("peft3", dirs["peft3"])
    ids = np.random.RandomState(1).randint(3, VOCAB, size=(2, 11)).astype(np.int32)
    graphdef, state = nnx.split(base)
    multi.set_ids(state, [1, 0])
    got = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids))
    with torch.no_grad():
        want = made(torch.tensor(ids[:1], dtype=torch.long)).logits.numpy()
        with made.disable_adapter():
            plain = made(torch.tensor(ids[1:], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], plain[0], atol=1e-4, rtol=0)
    assert np.abs(want[0] - plain[0]).max() > 1e-2


def test_engine_mixes_adapters_and_keys_the_prefix_cache_by_adapter(setup):
    root, cfg, dirs, _ = setup
    kw = dict(max_batch=4, page_size=8, prefill_chunk=16, batch_buckets=(4,), page_buckets=(4,), max_model_len=32)
    engine = Engine(small4_jax.from_pretrained(root / "base", dtype="float32"),
                    lora_adapters=[("all4", str(dirs["all4"])), ("peft3", str(dirs["peft3"]))], max_loras=3, **kw)
    # the slots are resident before the cache and the start-up report lists them beside every other item
    slots = sum(x.nbytes for x in jax.tree.leaves(nnx.state(engine.model, MultiLoRAParam)))
    assert engine.memory["lora slots"] == slots > 0 and "lora slots" in engine.report
    assert engine.memory["weights"] + slots == sum(x.nbytes for x in jax.tree.leaves(engine.state))
    prompt = np.random.RandomState(2).randint(3, VOCAB, 19).tolist()
    opts = SamplingOptions(max_tokens=6, ignore_eos=True)

    def run(adapters):
        events = {i: [] for i in range(len(adapters))}
        for i, a in enumerate(adapters):
            engine.submit(prompt, opts, callback=events[i].append, adapter=a)
        while not all(e and e[-1].finished for e in events.values()):
            engine.step()
        return [merge_outputs(events[i]) for i in range(len(adapters))]

    mixed = run([None, "all4", "peft3"])
    alone = {a: run([a])[0] for a in (None, "all4", "peft3")}
    for out, a in zip(mixed, [None, "all4", "peft3"]):
        assert out.token_ids == alone[a].token_ids, a
        assert alone[a].cached_tokens == 16  # the mixed run cached two pages of each adapter's own rows
    assert len({tuple(o.token_ids) for o in mixed}) == 3
    with pytest.raises(InputError, match="unknown adapter 'nope'"):
        engine.submit(prompt, opts, adapter="nope")
    # load a third adapter at run time into the spare slot (compiling nothing); unload frees it; the base is untouched
    from jax import monitoring

    compiles = []

    def listen(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kw.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listen)
    try:
        engine.load_adapter("attn2", str(dirs["attn2"]))
        assert run(["attn2"])[0].token_ids != alone[None].token_ids
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert not [c for c in compiles if "run" in str(c) or "step" in str(c)], compiles
    with pytest.raises(InputError, match="all 3 adapter slots are in use"):
        engine.load_adapter("again", str(dirs["attn2"]))
    engine.unload_adapter("attn2")
    assert sorted(engine.lora.adapters) == ["all4", "peft3"]
    assert run([None])[0].token_ids == alone[None].token_ids


def test_bad_lora_flags_and_adapters(setup, tmp_path):
    root, _, dirs, _ = setup
    assert parse_lora_flags(["a=/x", "b=/y/z"]) == [("a", "/x"), ("b", "/y/z")]
    with pytest.raises(InputError, match="expected NAME=DIR"):
        parse_lora_flags(["/x"])
    base = small4_jax.from_pretrained(root / "base", dtype="float32")
    multi = MultiLoRA(base, slots=2, rank=2)
    with pytest.raises(ConfigError, match="rank 4, above --max-lora-rank 2"):
        multi.load("all4", dirs["all4"])
    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        multi.load("x", tmp_path)
    # slots only where --lora-targets may put adapters: an adapter on other modules is refused, naming one
    targeted = MultiLoRA(small4_jax.from_pretrained(root / "base", dtype="float32"), slots=2, rank=4,
                         targets=("attention",), dtype=jnp.bfloat16)
    assert all("self_attn" in path for path in targeted.sites)
    slots = nnx.to_flat_state(nnx.state(targeted.model, MultiLoRAParam))
    assert {v[...].dtype for path, v in slots if path[-1] != "scales"} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ConfigError, match=r"mlp\..* is not among the modules the server holds adapter slots for "
                                          r"\(--lora-targets\)"):
        targeted.load("all4", dirs["all4"])


def _http(url, path, body=None, key="k"):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_selects_adapters_by_model_and_loads_them_behind_the_key(setup):
    from infer.serve import Running, Server

    root, _, dirs, _ = setup
    engine = Engine(small4_jax.from_pretrained(root / "base", dtype="float32"), max_batch=2, page_size=8,
                    prefill_chunk=16, batch_buckets=(2,), page_buckets=(4,), max_model_len=32,
                    lora_adapters=[("all4", str(dirs["all4"]))], max_loras=2, max_lora_rank=4)
    prompt = np.random.RandomState(4).randint(3, VOCAB, 9).tolist()
    want = {a: engine.generate([prompt], SamplingOptions(max_tokens=5, ignore_eos=True))[0].token_ids
            if a is None else None for a in (None,)}
    running = Running(Server(engine, None, "base", api_key="k"))
    try:
        status, models = _http(running.url, "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["base", "all4"]
        assert models["data"][1]["parent"] == "base"

        def complete(model):
            status, out = _http(running.url, "/v1/completions", dict(model=model, prompt=prompt, max_tokens=5,
                                                                       temperature=0, logprobs=0, ignore_eos=True))
            assert status == 200, out
            assert out["model"] == model  # an adapter's answers name the adapter, not the base
            lp = out["choices"][0]["logprobs"]
            return [int(t) for t in lp["tokens"]], lp["token_logprobs"]

        base_ids, base_lp = complete("base")
        assert base_ids == want[None]
        tuned = complete("all4")[0]
        assert tuned != want[None]
        status, err = _http(running.url, "/v1/completions", dict(model="attn2", prompt=prompt, max_tokens=2))
        assert status == 400 and "'attn2' is not served here" in err["error"]["message"]
        assert _http(running.url, "/v1/load_lora_adapter", dict(lora_name="attn2", lora_path=str(dirs["attn2"])),
                     key="wrong")[0] == 401
        assert _http(running.url, "/v1/load_lora_adapter",
                     dict(lora_name="attn2", lora_path=str(dirs["attn2"])))[0] == 200
        assert [m["id"] for m in _http(running.url, "/v1/models")[1]["data"]] == ["base", "all4", "attn2"]
        ids, lp = complete("attn2")  # a weak adapter may keep the greedy ids; it moves the logprobs
        assert ids != tuned and np.abs(np.asarray(lp[:1]) - np.asarray(base_lp[:1])).max() > 1e-4
        status, err = _http(running.url, "/v1/load_lora_adapter", dict(lora_name="x", lora_path=str(root)))
        assert status == 400 and "not a PEFT adapter directory" in err["error"]["message"]
        corrupt = root / "corrupt"  # a damaged adapter file: a JSON 400 naming it (was a text/plain 500)
        shutil.copytree(dirs["attn2"], corrupt)
        (corrupt / "adapter_model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{")
        status, err = _http(running.url, "/v1/load_lora_adapter", dict(lora_name="y", lora_path=str(corrupt)))
        assert status == 400 and err["error"]["message"].startswith(
            f"{corrupt / 'adapter_model.safetensors'}: truncated or corrupt safetensors file"), err
        assert _http(running.url, "/v1/unload_lora_adapter", dict(lora_name="all4"))[0] == 200
        assert [m["id"] for m in _http(running.url, "/v1/models")[1]["data"]] == ["base", "attn2"]
        assert complete("base")[0] == want[None]
    finally:
        running.stop()
