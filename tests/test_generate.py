"""`python -m infer.generate`: greedy parity with transformers' generate, the tiny preset, and bad input.

Most cases call `infer.generate.main` in-process so they share compiled functions; one runs the real command line.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_utils import make_hf_model, save_hf, save_native, tiny_hf_config, truncate_file
from infer.generate import main

REPO = Path(__file__).resolve().parent.parent
PROMPT = [1, 17, 99, 5, 42, 7, 88, 23, 64, 3, 110, 9, 31, 77, 45, 12, 100, 54]  # 18 tokens > original_max (16)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    # eos 127: the comparison covers whatever both stop at; this seed generates all 20 tokens.
    config = tiny_hf_config(eos_token_id=127, q_lora_rank=None, n_group=2, topk_group=1)
    hf = make_hf_model(config, seed=21)
    path = tmp_path_factory.mktemp("hf")
    save_hf(hf, path)
    return hf, path


def _last_json(out: str) -> dict:
    return json.loads(out.removesuffix("\n").rsplit("\n", 1)[-1])


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        seq = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)
    return seq[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate(hf_checkpoint, capsys):
    hf, path = hf_checkpoint
    ids = ",".join(map(str, PROMPT))
    assert main(["--checkpoint", str(path), "--prompt-ids", ids, "--temperature", "0", "--max-new-tokens", "20",
                 "--json"]) == 0
    ours = _last_json(capsys.readouterr().out)["token_ids"]
    ref = _hf_greedy(hf, PROMPT, 20)
    assert len(ref) >= 16
    assert ours == ref


def test_greedy_equals_transformers_native_layout_and_grouped_routing(tmp_path, capsys):
    # eos 2 as the native params.json implies (it carries no special ids)
    config = tiny_hf_config(n_group=4, topk_group=2, num_experts_per_tok=3)
    hf = make_hf_model(config, seed=5)
    save_native(hf, tmp_path)
    assert main(["--checkpoint", str(tmp_path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "16",
                 "--json"]) == 0
    ours = _last_json(capsys.readouterr().out)["token_ids"]
    ref = _hf_greedy(hf, PROMPT, 16)
    assert len(ref) == 16
    assert ours == ref


def test_sampling_is_seeded(hf_checkpoint, capsys):
    _, path = hf_checkpoint
    args = ["--checkpoint", str(path), "--prompt-ids", "1,2,3", "--temperature", "0.9", "--top-k", "40", "--top-p",
            "0.9", "--max-new-tokens", "12", "--json"]
    runs = []
    for seed in ("3", "3", "4"):
        assert main(args + ["--seed", seed]) == 0
        runs.append(_last_json(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert all(0 <= t < 128 for t in runs[2])


def _readme_quick_start() -> list[str]:
    """The quick start command exactly as README.md writes it (after `pip install -e . &&`)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return shlex.split(block.strip().split(" && ", 1)[1])


def test_quick_start_prints_only_its_own_lines():
    """The README's first command, as written, in the environment a newcomer has after the README's full install
    (the CUDA plugin for deviceless compiles is installed, no GPU driver, JAX_PLATFORMS unset): the generated text
    on stdout, and on stderr our six lines and nothing else (no native CUDA-stub lines, no plugin traceback)."""
    argv = _readme_quick_start()
    assert argv[:3] == ["python", "-m", "infer.generate"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = [
        r"note: the weights are RANDOM \(configs/tiny.yaml, seed 0\), so the text is gibberish\. For real text pass "
        r"--checkpoint DIR .*",
        r"model ready in \d+\.\ds",
        r"latent cache: 48 values x 4 bytes = 192 B per token per layer, .* cache tokens fit",
        r"resident per device \(cpu:0\): weights 4\.29 MiB, cache .*",
        r"compiling the prefill step for 1 x \d+ tokens over \d+ pages \(once per shape\)\.\.\.",
        r"compiling the decode step for 1 x 1 tokens over \d+ pages \(once per shape\)\.\.\.",
    ]
    lines = proc.stderr.splitlines()
    assert len(lines) == len(expected), proc.stderr
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert proc.stdout.endswith("\n") and proc.stdout.strip()


def _error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_input_is_one_clear_line(hf_checkpoint, tmp_path, capsys):
    hf, path = hf_checkpoint
    ids = ["--prompt-ids", "1,2,3"]
    # empty prompt
    assert _error(["--config", "configs/tiny.yaml", "--prompt", ""], capsys) == "error: empty prompt: --prompt is empty"
    assert "empty prompt" in _error(["--checkpoint", str(path), "--prompt-ids", ","], capsys)
    # prompt longer than the context (max_position_embeddings = 64)
    long_ids = ",".join(["5"] * 64)
    assert "prompt has 64 tokens but the model's context is 64" in _error(
        ["--checkpoint", str(path), "--prompt-ids", long_ids], capsys)
    # unknown model_type
    bad = tmp_path / "bad_type"
    bad.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    msg = _error(["--checkpoint", str(bad)] + ids, capsys)
    assert "unsupported model_type 'llama'" in msg and str(bad / "config.json") in msg
    # missing tensor and wrong shape: one error that lists both
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.layers.1.self_attn.o_proj.weight"]
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, str(broken / "model.safetensors"))
    code = main(["--checkpoint", str(broken)] + ids)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "missing: layers.1.self_attn.o_proj.weight (expected shape [64, 64])" in err
    assert "wrong shape: norm.weight is [7], expected [64]" in err
    # truncated file
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((path / "config.json").read_text())
    (trunc / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    truncate_file(trunc / "model.safetensors", -100)
    msg = _error(["--checkpoint", str(trunc)] + ids, capsys)
    assert str(trunc / "model.safetensors") in msg and "truncated" in msg


def test_kv_cache_decode_equals_full_forward(hf_checkpoint):
    """Logits of prefill + one-token steps over the latent cache equal one full forward pass."""
    import jax.numpy as jnp

    import small4_jax

    _, path = hf_checkpoint
    model = small4_jax.from_pretrained(path, dtype="float32")
    ids = np.asarray([PROMPT + [4, 8, 15, 16, 23, 42]], np.int32)
    full = np.asarray(model(ids))
    cache = model.init_cache(1, 32)
    logits, cache = model.step(jnp.asarray(ids[:, :18]), cache)
    steps = [np.asarray(logits)]
    for t in range(18, ids.shape[1]):
        logits, cache = model.step(jnp.asarray(ids[:, t:t + 1]), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    assert int(cache.length[0]) == ids.shape[1]


def test_several_loras_each_prompt_with_its_own(tmp_path, capsys):
    """--lora NAME=DIR adapters chosen per prompt (an --input line's "adapter", else --adapter) run in one batch
    through the engine's multi-LoRA; each result = that prompt generated alone with its adapter attached the
    single-adapter way (--lora DIR), or with none. Bad choices are one clear line before the model is built."""
    import jax.numpy as jnp
    from flax import nnx

    import small4_jax
    from small4_jax.lora import adapters as lora

    config = small4_jax.load_config(REPO / "configs" / "tiny.yaml")
    for name, targets, seed in (("a", ("all",), 1), ("b", ("attention", "experts"), 2)):
        m = small4_jax.init_model(config, seed=0)  # the weights `--config configs/tiny.yaml --seed 0` builds
        lora.apply_lora(m, lora.LoRAConfig(targets=targets, rank=2, alpha=4.0, seed=seed))
        rng = np.random.RandomState(seed)
        nnx.update(m, nnx.from_flat_state([(p, v.replace(jnp.asarray(0.3 * rng.randn(*v.shape), jnp.float32)))
                                           for p, v in nnx.to_flat_state(nnx.state(m, lora.TRAINABLE))]))
        lora.save_peft(m, tmp_path / name)
    ids = ",".join(map(str, PROMPT))
    rows = [{"id": "a", "prompt_ids": PROMPT, "adapter": "a"}, {"id": "base", "prompt_ids": PROMPT, "adapter": None},
            {"id": "b", "prompt_ids": PROMPT}]  # no "adapter": --adapter b
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--config", "configs/tiny.yaml", "--max-new-tokens", "8"]
    loras = ["--lora", f"a={tmp_path / 'a'}", "--lora", f"b={tmp_path / 'b'}"]
    assert main([*common, *loras, "--adapter", "b", "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    got = {r["id"]: r["token_ids"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    want = {}
    for key, extra in (("a", ["--lora", str(tmp_path / "a")]), ("b", ["--lora", str(tmp_path / "b")]),
                       ("base", [])):
        assert main([*common, *extra, "--prompt-ids", ids, "--json"]) == 0
        want[key] = _last_json(capsys.readouterr().out)["token_ids"]
    assert got == want and len({tuple(v) for v in want.values()}) == 3
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt_ids": PROMPT, "adapter": "c"}) + "\n")
    assert _error([*common, *loras, "--input", str(tmp_path / "bad.jsonl")], capsys) == \
        f"error: {tmp_path / 'bad.jsonl'}:1: adapter 'c' is not one of the --lora NAME=DIR adapters (a, b)"
    assert _error([*common, *loras, "--adapter", "z", "--prompt-ids", ids], capsys) == \
        "error: --adapter 'z': not one of the --lora NAME=DIR adapters (a, b)"
    assert _error([*common, "--lora", str(tmp_path / "a"), *loras, "--prompt-ids", ids], capsys).startswith(
        "error: --lora: give one adapter DIR (applied to every prompt) or NAME=DIR adapters")
    assert _error([*common, "--lora", f"c={tmp_path}", "--prompt-ids", ids], capsys) == \
        f"error: --lora c={tmp_path}: not a PEFT adapter directory (adapter_config.json missing)"


def test_ctrl_c_during_compilation_exits_130_with_one_line(tmp_path):
    """SIGINT while the prefill step compiles (inside XLA, where Python's own handler cannot run): exit status 130
    at once, one line saying what was kept, no traceback, no segfault."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "Hello"}\n{"prompt": "cats"}\n')
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # compile, do not read back
    proc = subprocess.Popen([sys.executable, "-m", "infer.generate", "--config", "configs/tiny.yaml", "--input",
                             str(inp), "--output", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "compiling the prefill step" in line:  # (after the progress bar, on its line)
            break
    proc.send_signal(signal.SIGINT)
    t = time.monotonic()
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(lines) + rest
    assert time.monotonic() - t < 10
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == \
        f"interrupted: 0 of 2 results are in {out}; a rerun with the same --output skips them"
