"""End-to-end LoRA fine-tuning on the tiny model: learning, generation, export round trips, resume after SIGKILL,
non-finite loss, and the data validator on bad files.

References: transformers `Mistral4ForCausalLM` loads our merged export; PEFT loads our adapter export onto the
exported base; the uninterrupted run is the reference for the resumed one.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from small4_jax.decode import generation
from small4_jax.lora import adapters as lora
from small4_jax.inputs.tokenizer import default_tokenizer
from train import config as run_config
from train.data import prompt_ids

ROOT = Path(__file__).resolve().parent.parent
QA = [json.loads(line) for line in (ROOT / "data/demo_eval.jsonl").read_text().splitlines()]


def _config(tmp: Path, **train) -> dict:
    d = yaml.safe_load((ROOT / "configs/finetune-tiny.yaml").read_text())
    d["data"]["train"] = [str(ROOT / p) for p in d["data"]["train"]]
    d["data"]["eval"] = [str(ROOT / p) for p in d["data"]["eval"]]
    d["train"].update(out_dir=str(tmp / "run"), log_every=1000, **train)
    return d


def _write(tmp: Path, d: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo fine-tune as configured in configs/finetune-tiny.yaml (in-process)."""
    from train.trainer import train

    tmp = tmp_path_factory.mktemp("ft")
    cfg = run_config.from_dict(_config(tmp))
    t0 = time.time()
    records = train(cfg)
    return cfg, records, tmp, time.time() - t0


@pytest.mark.optimized  # sets up `trained`: 100 steps run longer at -O0 than LLVM's optimisation takes
def test_fine_tune_cuts_loss_and_generation_reproduces_answers(trained):
    from train.export import load_run

    cfg, records, tmp, seconds = trained
    assert len(records) == cfg.train.steps
    first = records[0]["loss"]
    last = np.mean([r["loss"] for r in records[-5:]])
    assert last <= 0.2 * first, (first, last)
    assert records[-1]["eval_loss"] <= 0.2 * first
    lines = (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, cfg.train.steps + 1))

    model, _, step = load_run(cfg.train.out_dir)  # fresh base + adapters restored from Orbax
    assert step == cfg.train.steps
    tok = default_tokenizer()
    for row in QA:
        question, answer = row["messages"][0], row["messages"][1]["content"]
        ids = generation.generate(model, prompt_ids(tok, [question]), max_new_tokens=40, stop_ids=[tok.eos_id])
        assert tok.decode(ids) == answer


def test_base_is_frozen_no_grad_no_optimizer_state(trained):
    import jax
    from flax import nnx

    from train.trainer import build_model, optimizer

    cfg = trained[0]
    model = build_model(cfg)
    _, params, _, frozen = nnx.split(model, lora.TRAINABLE, nnx.RngState, ...)
    opt_state = optimizer(cfg).init(params)
    n_lora = sum(x.size for x in jax.tree.leaves(params))
    n_base = sum(x.size for x in jax.tree.leaves(frozen))
    assert n_base > 10 * n_lora
    # AdamW keeps two moments per LoRA parameter and nothing for the base
    assert sum(x.size for x in jax.tree.leaves(opt_state)) <= 2 * n_lora + 16
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))


def test_exports_load_in_transformers_and_peft(trained):
    import peft
    import torch
    from ckpt_utils import pin_hf_softmax_scale
    from transformers import Mistral4ForCausalLM

    from small4_jax.nn.model import init_model
    from train.export import load_run, save_merged

    cfg, _, tmp, _ = trained
    model, _, _ = load_run(cfg.train.out_dir)
    subprocess.run([sys.executable, "-m", "train.export", "--run", cfg.train.out_dir, "--peft", str(tmp / "adapter"),
                    "--merged", str(tmp / "merged")], check=True, cwd=ROOT, capture_output=True)
    # the merged export carries the tokenizer the run trained with (base.tokenizer: the bundled sentencepiece model)
    assert (tmp / "merged" / "tokenizer.model").read_bytes() == (ROOT / cfg.base.tokenizer).read_bytes()
    # every exported file has the mode the others have (safetensors' writer alone made its files 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for d in ("adapter", "merged") for p in (tmp / d).iterdir()}
    assert len(set(modes.values())) == 1, modes
    base = init_model(model.config, seed=cfg.base.seed, dtype="float32")  # the run's random base, for PEFT
    save_merged(base, tmp / "base")

    ids = np.random.RandomState(0).randint(3, model.config.vocab_size, size=(2, 20)).astype(np.int32)
    ours = np.asarray(model(ids))  # adapters unmerged
    merged = lora.merge_into(init_model(model.config, dtype="float32"), model)
    ours_merged = np.asarray(merged(ids))
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
    assert rel(ours_merged, ours) < 1e-4

    with torch.no_grad():
        hf = pin_hf_softmax_scale(Mistral4ForCausalLM.from_pretrained(str(tmp / "merged")).float().eval())
        hf_logits = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        base_hf = pin_hf_softmax_scale(Mistral4ForCausalLM.from_pretrained(str(tmp / "base")).float())
        ref = peft.PeftModel.from_pretrained(base_hf, str(tmp / "adapter")).eval()
        peft_logits = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert rel(ours_merged, hf_logits) < 1e-4
    assert rel(ours, peft_logits) < 1e-4

    # infer.generate --lora uses the same adapter without merging
    q = ",".join(map(str, prompt_ids(default_tokenizer(), [QA[0]["messages"][0]])))
    code = subprocess.run([sys.executable, "-m", "infer.generate", "--config", str(ROOT / "configs/finetune-tiny.yaml"), "--lora",
                           str(tmp / "adapter"), "--prompt-ids", q, "--json", "--max-new-tokens", "40"],
                          cwd=ROOT, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    assert json.loads(code.stdout.strip().splitlines()[-1])["text"] == QA[0]["messages"][1]["content"]


# ----------------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL.
def _run(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "train.finetune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in recs}


@pytest.mark.optimized  # 3 runs of 14 steps
def test_sigkill_then_resume_reproduces_losses(tmp_path):
    import orbax.checkpoint as ocp

    steps = 14
    small = dict(steps=steps, ckpt_every=3, keep=2, eval_every=0, batch_size=4, grad_accum=2)
    ref_cfg = _config(tmp_path / "ref", **small)
    ref_cfg["lora"]["dropout"] = 0.1  # the dropout RNG stream must resume too
    ref_cfg["data"]["seq_len"] = 192
    (tmp_path / "ref").mkdir()
    p = _run(["--config", str(_write(tmp_path / "ref", ref_cfg))])
    assert p.wait(timeout=300) == 0, p.stderr.read()

    (tmp_path / "cut").mkdir()
    cut_cfg = dict(ref_cfg, train=dict(ref_cfg["train"], out_dir=str(tmp_path / "cut" / "run")))
    path = _write(tmp_path / "cut", cut_cfg)
    kill_at = random.Random(os.getpid()).randint(4, steps - 2)
    p = _run(["--config", str(path)])
    metrics = tmp_path / "cut" / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    # every checkpoint the manager lists is complete and readable
    mngr = ocp.CheckpointManager((tmp_path / "cut" / "run" / "checkpoints").resolve())
    listed = mngr.all_steps()
    assert listed, f"killed at step >= {kill_at} with no checkpoint"
    for s in listed:
        mngr.restore(s, args=ocp.args.StandardRestore())
    mngr.close()

    p = _run(["--config", str(path), "--resume"])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    ref, got = _losses(tmp_path / "ref" / "run"), _losses(tmp_path / "cut" / "run")
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s], kill_at)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from train.finetune import main

    d = _config(tmp_path, steps=6, ckpt_every=1, keep=3, eval_every=0)
    d["optim"].update(lr=1e30, clip_norm=None, warmup_steps=0)
    code = main(["--config", str(_write(tmp_path, d))])
    assert code == 2
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((tmp_path / "run" / "checkpoints").resolve())
    steps = mngr.all_steps()
    mngr.close()
    recs = _losses(tmp_path / "run")
    assert steps and max(steps) == max(recs) and max(recs) < 6  # saved up to the last finite step, none after
    assert all(np.isfinite(v) for v in recs.values())


# ----------------------------------------------------------------------------------------------------------------------
# validate_data on bad files.
BAD = {
    "bad_json.jsonl": ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                       '{"messages": [ {"role": "user"'],
    "unknown_role.jsonl": ['{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'],
    "last_not_assistant.jsonl": ['{"messages": [{"role": "user", "content": "hi"}]}',
                                 '{"text": "fine row"}',
                                 '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                                 '{"role": "user", "content": "c"}]}'],
    "bad_tool_id.jsonl": ['{"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "tool_calls": [{"id": '
                          '"abc", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", '
                          '"tool_call_id": "abc", "content": "r"}, {"role": "assistant", "content": "ok"}]}'],
    "non_string_args.jsonl": ['{"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "tool_calls": '
                              '[{"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": {"x": 1}'
                              '}}]}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"}, {"role": '
                              '"assistant", "content": "ok"}]}'],
    "empty.jsonl": [],
}
EXPECT = {  # file -> (line, words in the reason)
    "bad_json.jsonl": (2, "bad JSON"),
    "unknown_role.jsonl": (1, "unknown role 'human'"),
    "bad_tool_id.jsonl": (1, "9 letters or digits"),
    "non_string_args.jsonl": (1, "must be a JSON string"),
    "empty.jsonl": (0, "empty file"),
}


def test_validate_data_names_every_bad_line_and_trains_nothing(tmp_path, capsys):
    from train.finetune import main as finetune_main
    from train.validate_data import main as validate_main

    files = []
    for name, lines in BAD.items():
        (tmp_path / name).write_text("".join(x + "\n" for x in lines))
        files.append(str(tmp_path / name))
    d = _config(tmp_path)
    d["data"].update(train=files, eval=[])
    cfg = _write(tmp_path, d)
    assert validate_main(["--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    for name, (line, words) in EXPECT.items():
        assert any(x.startswith(f"{tmp_path / name}:{line}:") and words in x for x in out.splitlines()), (name, out)
    bad_last = [x for x in out.splitlines() if "last_not_assistant" in x]
    assert [x.split(":")[1] for x in bad_last] == ["1", "3"] and all("assistant" in x for x in bad_last)
    assert len(out.splitlines()) == 7  # nothing else flagged (the good rows are not)

    assert finetune_main(["--config", str(cfg)]) == 2
    assert "bad row" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()

    good = _write(tmp_path, _config(tmp_path))
    assert validate_main(["--config", str(good)]) == 0
    assert "ETA" in capsys.readouterr().out


def test_run_configs_parse():
    for name in ("finetune-tiny.yaml", "finetune-small4.yaml"):
        cfg = run_config.load(ROOT / "configs" / name)
        assert cfg.lora.rank > 0 and cfg.train.steps > 0 and cfg.train.loss_chunk == 1024


def test_loss_chunk_from_the_run_config_reaches_the_model(monkeypatch):
    """train.loss_chunk is the chunk the training loss runs with (trainer.configure, as build_model applies it)."""
    import dataclasses

    from small4_jax.nn.model import init_model
    from train import trainer

    cfg = run_config.load(ROOT / "configs" / "finetune-tiny.yaml")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=96, remat=True))
    model = init_model(cfg.model, dtype="float32")
    trainer.configure(model, cfg)
    assert (model.loss_chunk, model.remat) == (96, True)
    from small4_jax.nn import model as model_module

    seen, real = [], model_module.chunked_cross_entropy
    monkeypatch.setattr(model_module, "chunked_cross_entropy", lambda *a: seen.append(a[-1]) or real(*a))
    ids = np.ones((1, 8), np.int32)
    model.token_loss(ids, ids, np.ones((1, 8), np.float32))
    assert seen == [96]
