"""DPO (train/dpo.py): the preference-row validator's file:line errors, and one optimizer step's loss, rewards,
margin and accuracy against a straightforward reference: numpy log-softmax of the full logits of the base with the
adapter merged into its weights (policy) and of the plain base (the reference policy the step gets by zeroing the
adapter), the step run on one device and on an 8-device mesh."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from small4_jax.lora import adapters as lora
from small4_jax.nn.model import init_model
from small4_jax.parallel.sharding import make_mesh
from train import config as run_config
from train import dpo, loop
from train.data import read_jsonl
from train.validate_data import main as validate_main
from train.trainer import Run, build_model, load_tokenizer, optimizer, put_batch, schedule

ROOT = Path(__file__).resolve().parent.parent


def test_bad_preference_rows_are_reported_by_file_and_line(tmp_path, capsys):
    good = json.loads((ROOT / "data/dpo_train.jsonl").read_text().splitlines()[0])
    rows = [good, dict(good, chosen={"role": "user", "content": "x"}),
            dict(good, messages=good["messages"] + [{"role": "assistant", "content": "hi"}]),
            dict(good, rejected={"role": "assistant", "content": 3})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    rows, errors = read_jsonl([path], validate=dpo.validate_pair)
    assert len(rows) == 1
    assert [str(e) for e in errors] == [
        f"{path}:2: 'chosen' must be an assistant message {{'role': 'assistant', 'content': ...}}",
        f"{path}:3: the prompt's last message must be the user's or a tool's, got 'assistant'",
        f"{path}:4: rejected: messages[1]: content must be a string",
        f"{path}:5: bad JSON (Expecting property name enclosed in double quotes at column 2)",
    ]
    d = run_config.load(ROOT / "configs/dpo-tiny.yaml").to_dict()
    d["data"]["train"] = [str(path)]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert validate_main(["--config", str(tmp_path / "c.yaml")]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == str(errors[0])
    assert "4 bad row(s) in 1 file(s); 1 good row(s)" in out.err
    d["data"]["train"] = [str(ROOT / "data/dpo_train.jsonl")]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert validate_main(["--config", str(tmp_path / "c.yaml")]) == 0
    assert capsys.readouterr().out.startswith("train: 32 preference pairs")


def _reference_logps(forward, model, batch) -> np.ndarray:
    """Sum over the reply of log softmax(logits)[target], from the full [rows, S, vocab] logits, in numpy."""
    x = {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in batch.items()}
    logits = np.asarray(forward(model, x["inputs"], x["positions"], x["segments"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, x["targets"][..., None], -1)[..., 0]
    return (tok * x["weights"]).sum(-1).reshape(-1, 2)


def _numpy_losses(z, b, kind, eps):
    if kind == "ipo":
        return (z / b - 1 / (2 * b)) ** 2
    return (1 - eps) * np.log1p(np.exp(-z)) + eps * np.log1p(np.exp(z))


def test_ipo_loss_formula():
    pol, ref = np.array([[-3.0, -5.0], [-4.0, -2.5]]), np.array([[-3.5, -4.0], [-4.0, -3.0]])
    z = 0.3 * ((pol - ref)[:, 0] - (pol - ref)[:, 1])
    losses, m = dpo.dpo_loss(pol, ref, 0.3, "ipo")
    np.testing.assert_allclose(np.asarray(losses), _numpy_losses(z, 0.3, "ipo", 0.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["accuracy"]), [1.0, 0.0])


def test_dpo_step_matches_a_numpy_reference_on_one_device_and_on_a_mesh(tmp_path):
    """One optimizer step's loss, rewards, margin and accuracy against numpy: the reference policy is the plain base,
    the policy is the base with the adapter merged into its weights (`lora.merge_into`: no adapter code), both
    scored from their full logits. The step runs on one device and on train.mesh data=2,expert=2,tensor=2 (8
    simulated devices) through SFT's placement (`trainer.build_model`, `trainer.Run`, `trainer.put_batch`): both
    equal the reference."""
    kind = "sigmoid"
    d = run_config.load(ROOT / "configs/dpo-tiny.yaml").to_dict()
    d["dpo"].update(beta=0.5, label_smoothing=0.1)
    d["train"].update(batch_size=4, grad_accum=2)
    cfg = run_config.from_dict(d)
    tok = load_tokenizer(cfg)
    pairs = dpo.load_pairs(cfg.data.train, tok, cfg.data.seq_len)
    batch = pairs.take(np.arange(4))
    forward = nnx.jit(lambda m, ids, pos, seg: m(ids, positions=pos, segment_ids=seg))
    ref = _reference_logps(forward, init_model(cfg.model, seed=cfg.base.seed, dtype=cfg.base.dtype), batch)
    tx = optimizer(cfg)
    b = cfg.dpo.beta
    for mesh in (None, make_mesh({"data": 2, "expert": 2, "tensor": 2})):
        model = build_model(cfg, mesh)
        graphdef, params, frozen = loop.split(model)
        # a non-identity adapter (the same on both), so the policy differs from the reference
        rng = np.random.default_rng(1)
        params = jax.tree.map(lambda x: jax.device_put(np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(x.dtype),
                                                       x.sharding), params)
        run = Run(cfg, tmp_path / str(mesh is not None), mesh, params, tx.init(params), None, frozen, rows_per_step=4)
        if mesh is not None:  # the adapters live sharded beside their base
            assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                       for x in jax.tree.leaves(run.params))
        update = dpo.make_update(graphdef, cfg, tx, schedule(cfg))
        _, _, m = update(run.params, run.opt_state, run.frozen, put_batch(batch, 2, mesh), np.int32(0))
        run.mngr.close()
        if mesh is None:
            nnx.update(model, params)
            plain = init_model(cfg.model, seed=cfg.base.seed, dtype=cfg.base.dtype)
            policy = _reference_logps(forward, lora.merge_into(plain, model), batch)
            r = b * (policy - ref)
            z = r[:, 0] - r[:, 1]
            losses = _numpy_losses(z, b, kind, cfg.dpo.label_smoothing)
            assert np.abs(z).min() > 1e-3  # the adapter made the policy differ from the reference on every pair
        np.testing.assert_allclose(float(m["loss"]), losses.mean(), rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(float(m["margin"]), z.mean(), rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(float(m["rewards_chosen"]), r[:, 0].mean(), rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(float(m["rewards_rejected"]), r[:, 1].mean(), rtol=2e-4, atol=1e-5)
        assert float(m["accuracy"]) == pytest.approx((z > 0).mean())
        np.testing.assert_allclose(float(m["logp_chosen"]), policy[:, 0].mean(), rtol=2e-4)
