"""Two processes x 4 CPU devices on localhost, started by launch/local.py: the job equals one process.

Covered: start-up + preflight, forward logits on a mesh spanning both processes, save on one mesh and restore on
another (and a single-process checkpoint restored on 8 devices), a collective hang turned into an error, a LoRA
fine-tune, and one request through the serving engine.
"""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from small4_jax.tools.convert import convert

REPO = Path(__file__).resolve().parent.parent
IDS = (np.arange(40, dtype=np.int32)[None] * 7) % 128


def _launch(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    return subprocess.run(
        [sys.executable, "launch/local.py", "--nproc", "2", "--cpu-devices", "4", "--timeout", str(timeout), "--",
         sys.executable, "tests/mp_worker.py", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 30,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_hf(make_hf_model(tiny_hf_config(), seed=17), path)
    single = np.asarray(small4_jax.from_pretrained(path, dtype="float32")(IDS))
    return path, single


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_forward_across_two_processes_equals_one(checkpoint, tmp_path):
    path, single = checkpoint
    proc = _launch("forward", path, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _close(np.load(tmp_path / "forward.npy"), single)


def test_save_on_one_mesh_restore_on_another(checkpoint, tmp_path):
    path, single = checkpoint
    convert(path, tmp_path / "converted", dtype="f32", progress=None)
    proc = _launch("save_restore", path, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = np.load(tmp_path / "save_restore.npz")
    _close(results["saved_restored"], single)
    _close(results["converted"], single)
    # and the 2-process checkpoint back in one process, on one device
    _close(np.asarray(small4_jax.from_pretrained(tmp_path / "saved", dtype="float32")(IDS)), single)


def test_a_hung_collective_becomes_an_error():
    proc = _launch("hang", timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "preflight: all-reduce did not finish within 5s" in proc.stderr


def test_lora_finetune_two_processes_equals_one(tmp_path):
    """launch/local.py runs the tiny fine-tune over 2 processes (mesh data=2 x expert=4 spanning both): the losses,
    gradient norms, eval loss and the saved LoRA parameters equal a single process on one device."""
    import json

    from flax import nnx

    from small4_jax.lora import adapters as lora
    from train import config as run_config
    from train.finetune import main as finetune
    from train.trainer import build_model, restore_lora

    common = ["--config", "configs/finetune-tiny.yaml", "--steps", "3"]
    proc = subprocess.run(
        [sys.executable, "launch/local.py", "--nproc", "2", "--cpu-devices", "4", "--timeout", "400", "--",
         sys.executable, "-m", "train.finetune", *common, "--out-dir", str(tmp_path / "two"), "--mesh",
         "data=2,expert=4,tensor=1"],
        cwd=REPO, capture_output=True, text=True, timeout=450,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert finetune(common + ["--out-dir", str(tmp_path / "one")]) == 0

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    two, one = records("two"), records("one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one):
        for key in ("loss", "grad_norm") + (("eval_loss",) if "eval_loss" in b else ()):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
    cfg = run_config.load(REPO / "configs" / "finetune-tiny.yaml")
    params = []
    for run in ("two", "one"):
        model = build_model(cfg)
        assert restore_lora(model, tmp_path / run) == 3
        params.append({p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, lora.TRAINABLE))})
    assert params[0].keys() == params[1].keys() and len(params[0]) > 0
    # Adam divides by sqrt(v): where a gradient is ~0 (an expert no token picked), a reduction-order difference of
    # 1e-9 moves that element's update by a fraction of lr (2e-2). So: (almost) every element equal to 1e-5, and
    # none off by a whole step; a wrong shard or a missed micro-batch would move most elements of a tensor by ~lr.
    diffs = np.concatenate([np.abs(params[0][p] - params[1][p]).ravel() for p in params[1]])
    assert np.mean(diffs > 1e-5) < 1e-3, np.mean(diffs > 1e-5)
    assert diffs.max() < 1e-2


def test_serve_one_request_across_two_processes(checkpoint, capsys):
    """The serving engine (through infer.generate) on a mesh spanning both processes answers one request with the
    tokens one process gives."""
    import json

    from infer.generate import main as generate

    path, _ = checkpoint
    args = ["--checkpoint", str(path), "--prompt-ids", "1,17,99,5,42,7,88,23,64,3,110,9,31,77,45,12,100,54",
            "--max-new-tokens", "12", "--json"]
    proc = subprocess.run(
        [sys.executable, "launch/local.py", "--nproc", "2", "--cpu-devices", "4", "--timeout", "240", "--",
         sys.executable, "-m", "infer.generate", *args, "--mesh", "data=1,expert=8,tensor=1"],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answers = [line for line in proc.stdout.splitlines() if line.startswith("[0] {")]
    assert len(answers) == 1 and not any(line.startswith("[1] {") for line in proc.stdout.splitlines())
    two = json.loads(answers[0][len("[0] "):])
    assert generate(args) == 0
    one = json.loads(capsys.readouterr().out.removesuffix("\n").rsplit("\n", 1)[-1])
    assert two["token_ids"] == one["token_ids"] and len(one["token_ids"]) == 12


def test_http_server_across_two_processes(capsys):
    """infer.serve on 2 processes (process 0 serves HTTP, both run the engine in lockstep) answers a completion with
    the tokens a single process generates, then shuts down cleanly on SIGTERM."""
    import json
    import signal
    import time
    import urllib.request

    from infer.generate import main as generate
    from launch.local import free_port

    port = free_port()
    job = subprocess.Popen(
        [sys.executable, "launch/local.py", "--nproc", "2", "--cpu-devices", "4", "--timeout", "600", "--",
         sys.executable, "-m", "infer.serve", "--config", "configs/tiny.yaml", "--mesh", "data=1,expert=8,tensor=1",
         "--port", str(port), "--max-batch", "4", "--num-pages", "64", "--max-model-len", "256",
         "--prefill-batch", "1", "--prefill-chunk", "16",  # few warm-up programs: 16-token chunks only
         "--served-model-name", "tiny"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 540  # the warm-up compiles every step shape on both processes first
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert job.poll() is None, job.stdout.read()
                time.sleep(0.5)
        body = json.dumps({"model": "tiny", "prompt": [1, 17, 99, 5, 42], "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        job.send_signal(signal.SIGTERM)
        out = job.communicate(timeout=60)[0]
    assert job.returncode is not None
    text = answer["choices"][0]["text"]
    assert answer["usage"]["completion_tokens"] == 8, out
    assert generate(["--config", "configs/tiny.yaml", "--prompt-ids", "1,17,99,5,42", "--max-new-tokens", "8",
                     "--json", "--tokenizer", "small4_jax/assets/tiny_tekken.json"]) == 0
    one = json.loads(capsys.readouterr().out.removesuffix("\n").rsplit("\n", 1)[-1])
    assert len(one["token_ids"]) == 8 and one["text"]  # 8 ordinary tokens: the text pins them down
    assert text == one["text"], (answer, one)


def test_adapter_load_and_unload_in_lockstep_across_two_processes(checkpoint, tmp_path):
    """load_adapter / unload_adapter on process 0 of a 2-process engine reach process 1 at the same step: requests
    with the adapter, after unloading it, and with it loaded again into the freed slot give one process's tokens."""
    import json

    from infer.engine.engine import Engine, SamplingOptions
    from small4_jax.lora import adapters as lora

    import jax.numpy as jnp
    from flax import nnx

    path, _ = checkpoint
    tuned = small4_jax.from_pretrained(path, dtype="float32")
    lora.apply_lora(tuned, lora.LoRAConfig(targets=("all",), rank=4, alpha=6.0, seed=1))
    rng = np.random.RandomState(4)  # B is zero at init: give the adapter a large effect
    nnx.update(tuned, nnx.from_flat_state([(p, v.replace(jnp.asarray(0.5 * rng.randn(*v.shape), jnp.float32)))
                                           for p, v in nnx.to_flat_state(nnx.state(tuned, lora.TRAINABLE))]))
    lora.save_peft(tuned, tmp_path / "adapter")
    kw = dict(max_batch=2, page_size=8, prefill_chunk=16, batch_buckets=(2,), page_buckets=(4,), max_model_len=32)
    proc = _launch("lora_lockstep", path, tmp_path, json.dumps(kw), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads((tmp_path / "lora_lockstep.json").read_text())
    one = Engine(small4_jax.from_pretrained(path, dtype="float32"), lora_adapters=[("a", str(tmp_path / "adapter"))],
                 **kw)
    prompt, options = IDS[0, :19].tolist(), SamplingOptions(max_tokens=6, ignore_eos=True)
    want = {a: _run_one(one, prompt, options, a) for a in ("a", None)}
    assert got["adapter"] == want["a"] and got["again"] == want["a"] and got["base"] == want[None]
    assert got["adapter"] != got["base"]


def _run_one(engine, prompt, options, adapter):
    from infer.engine.engine import merge_outputs

    events = []
    engine.submit(prompt, options, adapter=adapter, callback=events.append)
    while not (events and events[-1].finished):
        engine.step()
    return merge_outputs(events).token_ids


def _launcher_examples() -> list[list[str]]:
    """The commands of launch/local.py's docstring, as written ('python' is this interpreter)."""
    doc = (REPO / "launch" / "local.py").read_text().split('"""')[1]
    cmds = [shlex.split(line.split("#")[0]) for line in doc.splitlines() if line.strip().startswith("python launch/")]
    return [[sys.executable if a == "python" else a for a in cmd] for cmd in cmds]


def test_the_launchers_own_examples_run_as_written(tmp_path):
    """The docstring's fine-tune (no --mesh: data-parallel over both processes; a step, into a temporary out_dir)
    and its preflight, as written."""
    finetune, preflight = _launcher_examples()
    assert finetune[-4:] == ["-m", "train.finetune", "--config", "configs/finetune-tiny.yaml"]
    proc = subprocess.run([*finetune, "--steps", "1", "--out-dir", str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] step 1/1 loss " in proc.stderr and "[0] next: python -m train.export" in proc.stderr
    proc = subprocess.run(preflight, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": 2 devices, all-reduce ") == 2


def test_a_failing_process_stops_the_job_within_seconds(tmp_path):
    """Process 1 fails; process 0 would run for minutes: the failing one exits at once (no wait in jax's shutdown
    barrier), the launcher stops the other and exits with the failing status."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time\n"
        "from small4_jax.parallel import distributed\n"
        "from small4_jax.console import cli_main\n"
        "def main():\n"
        "    distributed.initialize()\n"
        "    import jax\n"
        "    print(jax.device_count(), flush=True)\n"
        "    if os.environ['SMALL4_PROCESS_ID'] == '1':\n"
        "        raise RuntimeError('process 1 failed')\n"
        "    time.sleep(600)\n"
        "    return 0\n"
        "sys.exit(cli_main(main))\n")
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "launch/local.py", "--nproc", "2", "--cpu-devices", "1", "--",
                           sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[1] RuntimeError: process 1 failed" in proc.stderr
    assert time.monotonic() - t < 120
