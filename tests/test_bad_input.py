"""Bad input on every command-line tool and endpoint: one exact `error:` line and exit status 2 (HTTP 400), found
before any model is built; --help without JAX; batch output that survives a kill; config typos named.

Most cases call each tool's `main(argv)` in-process with the model builders replaced by a function that fails the
test, so "before the model is built" is checked, not assumed, and no case compiles anything.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ckpt_utils import tiny_hf_config

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs/tiny.yaml")
SPM = str(REPO / "small4_jax/assets/tiny_spm.model")


@pytest.fixture
def no_build(monkeypatch):
    """Any model build fails the test: every error below must come before one."""
    import small4_jax.ckpt.load
    import small4_jax.nn.model

    def built(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(small4_jax.nn.model, "init_model", built)
    monkeypatch.setattr(small4_jax.ckpt.load, "from_pretrained", built)
    monkeypatch.setattr("train.trainer.build_model", built)


def _error(main, argv, capsys, status=2) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def no_tokenizer_ckpt(tmp_path_factory):
    """A checkpoint directory with a config.json and no tokenizer (weights are never reached)."""
    path = tmp_path_factory.mktemp("notok")
    d = tiny_hf_config(vocab_size=512).to_dict()
    d["model_type"] = "mistral4"
    (path / "config.json").write_text(json.dumps(d))
    return path


# ---- --help ----------------------------------------------------------------------------------------------------------
def test_help_of_every_cli_answers_without_importing_jax():
    script = """
import runpy, sys, time
mods = ["infer.generate", "infer.serve", "train.validate_data", "train.finetune", "train.export",
        "small4_jax.convert", "small4_jax.distributed", "launch/local.py"]
for m in mods:
    sys.argv = [m, "--help"]
    t = time.perf_counter()
    try:
        runpy.run_path(m, run_name="__main__") if m.endswith(".py") else runpy.run_module(m, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, (m, e.code)
    print(m, round(time.perf_counter() - t, 3), "jax" in sys.modules, file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stderr.splitlines() if line.split()[-1:] in (["True"], ["False"])]
    assert len(rows) == 8, proc.stderr
    for name, seconds, jax_loaded in rows:
        assert jax_loaded == "False", f"{name} --help imported JAX"
    assert proc.stdout.count("usage:") == 8


# ---- infer.generate --------------------------------------------------------------------------------------------------
def test_generate_rejects_bad_input_before_building_a_model(tmp_path, capsys, no_build, no_tokenizer_ckpt):
    from infer.generate import main

    def err(*argv):
        return _error(main, list(argv), capsys)

    g = ["--config", TINY]
    assert err(*g, "--prompt-ids", "1,9999,3") == \
        "error: --prompt-ids: ids [9999] are outside the vocabulary [0, 512)"
    assert err(*g, "--prompt-ids", "1,x") == "error: --prompt-ids: expected comma-separated integers, got '1,x'"
    assert err(*g, "--prompt", "hi", "--dtype", "banana") == \
        "error: --dtype 'banana': expected one of float32, bfloat16"
    assert err(*g, "--prompt", "hi", "--mesh", "data=1,exprt=4,tensor=1") == (
        "error: --mesh: unknown mesh axis 'exprt'; expected name=size pairs over the axes data, expert, tensor, "
        "e.g. data=1,expert=8,tensor=1")
    assert err(*g, "--prompt", "hi", "--mesh", "data=1,expert=4,tensor=1") == (
        "error: --mesh: data=1,expert=4,tensor=1 spans 4 devices but this job has 8 (cpu); the sizes must "
        "multiply to 8")
    assert err(*g, "--prompt", "hi", "--mesh", "data:8") == (
        "error: --mesh: 'data:8' in 'data:8' is not name=size; expected name=size pairs over the axes data, "
        "expert, tensor, e.g. data=1,expert=8,tensor=1")
    assert err(*g, "--prompt", "hi", "--mesh", "data=0,expert=8") == \
        "error: --mesh: size of axis 'data' = 0; expected a positive integer"
    assert err(*g, "--prompt", "hi", "--tokenizer", str(tmp_path / "nope.json")) == \
        f"error: --tokenizer: tokenizer path does not exist: {tmp_path / 'nope.json'}"
    assert err(*g, "--prompt", "hi", "--output", str(tmp_path / "o.jsonl")) == \
        "error: --output is for the results of --input; a single prompt prints to stdout"
    assert err(*g, "--prompt", "hi", "--max-batch", "0") == "error: --max-batch must be at least 1, got 0"
    assert err(*g, "--prompt", "hi", "--page-size", "-4") == "error: --page-size must be at least 1, got -4"
    assert err(*g, "--prompt", "hi", "--max-model-len", "5000") == (
        "error: --max-model-len 5000 exceeds the model's context of 4096 tokens (max_position_embeddings)")
    assert err(*g, "--prompt-ids", "1,2,3", "--max-model-len", "3") == (
        "error: prompt has 3 tokens but the model's context is 3 (--max-model-len); shorten the prompt")
    # chat without a tekken tokenizer: the sentencepiece one has no reasoning mode; a checkpoint without any
    assert err(*g, "--tokenizer", SPM, "--chat", "--reasoning-effort", "high", "--prompt", "hi") == \
        "error: reasoning_effort needs a tekken.json tokenizer (mistral-common chat format)"
    assert err("--checkpoint", str(no_tokenizer_ckpt), "--chat", "--prompt-ids", "1,2") == \
        "error: --chat needs a tokenizer: pass --tokenizer (a tekken.json)"
    assert err("--checkpoint", str(no_tokenizer_ckpt), "--prompt-ids", "1,600") == \
        "error: --prompt-ids: ids [600] are outside the vocabulary [0, 512)"
    assert err("--checkpoint", str(no_tokenizer_ckpt), "--prompt-ids", "1,2", "--quantize", "int4", "--activations",
               "fp8") == "error: --activations fp8 (W8A8) needs fp8 weights; --quantize int4"
    assert err("--checkpoint", str(no_tokenizer_ckpt), "--prompt", "hi") == (
        f"error: no tokenizer found in directory {no_tokenizer_ckpt}: expected tekken.json, tokenizer.model, "
        "tokenizer.model.v* or another *.model file; pass --tokenizer FILE")


def test_generate_input_lines_are_checked_before_the_build(tmp_path, capsys, no_build):
    from infer.generate import main

    good = '{"prompt": "hello"}\n'
    cases = {
        b'{"prompt": "hello"}\n{"prompt": \n': "2: not valid JSON (Expecting value: line 1 column 12 (char 11))",
        good.encode() + b'\n{"prompt": "caf\xe9"}\n': "3: not valid UTF-8 (byte 16 of the line)",
        b'{"prompt_ids": [1, 2, 700]}\n': "1: prompt ids [700] are outside the vocabulary [0, 512)",
        b'{"prompt_ids": []}\n': "1: prompt_ids must be a non-empty list of integers",
        b'{"text": "hi"}\n': '1: each line needs "messages", "prompt" or "prompt_ids"',
        b'[1, 2]\n': "1: expected a JSON object",
        b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n': "2: id 1 appears twice; each line needs its own id",
        b'{"messages": [{"role": "user"}]}\n': "1: messages[0]: 'content' is missing",
        b'{"messages": [{"role": "robot", "content": "x"}]}\n':
            "1: messages[0].role: 'robot'; expected one of system, user, assistant, tool",
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}\n':
            "1: tools[0].function.name: expected a non-empty string, got None",
        b'{"prompt": "' + b"word " * 40 + b'"}\n': "1: prompt has ",
    }
    for i, (data, want) in enumerate(cases.items()):
        path = tmp_path / f"in{i}.jsonl"
        path.write_bytes(data)
        line = _error(main, ["--config", TINY, "--input", str(path), "--max-model-len", "32"], capsys)
        assert line.startswith(f"error: {path}:{want}"), (line, want)
    assert _error(main, ["--config", TINY, "--input", str(tmp_path / "none.jsonl")], capsys) == \
        f"error: --input {tmp_path / 'none.jsonl'}: No such file or directory"
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert _error(main, ["--config", TINY, "--input", str(tmp_path / "empty.jsonl")], capsys) == \
        f"error: --input {tmp_path / 'empty.jsonl'}: no prompts"
    (tmp_path / "ok.jsonl").write_text(good)
    assert _error(main, ["--config", TINY, "--input", str(tmp_path / "ok.jsonl"), "--output",
                         "/nonexistent-dir/out.jsonl"], capsys) == \
        "error: --output /nonexistent-dir/out.jsonl: No such file or directory"
    assert _error(main, ["--config", TINY, "--input", str(tmp_path / "ok.jsonl"), "--output",
                         str(tmp_path / "ok.jsonl")], capsys) == f"error: --output {tmp_path / 'ok.jsonl'}: the same file as --input"
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "zz", "token_ids": [], "text": "", "finish_reason": "stop"}\n')
    assert _error(main, ["--config", TINY, "--input", str(tmp_path / "ok.jsonl"), "--output", str(other)],
                  capsys) == (f"error: {other}:1: id 'zz' is not in {tmp_path / 'ok.jsonl'}; these are results of "
                              "another input: remove the file or choose another --output")


def test_result_writer_keeps_input_order_and_flushes_each_row(tmp_path):
    from infer.batch import Item, ResultWriter
    from infer.chat import ChatPrompt
    from infer.engine.engine import SamplingOptions

    items = [Item(i, ChatPrompt([1], []), SamplingOptions(), False) for i in range(3)]
    out = tmp_path / "out.jsonl"
    w = ResultWriter(str(out), items)
    w.add(1, {"id": 1})
    assert out.read_text() == ""  # waits for row 0
    w.add(0, {"id": 0})
    assert out.read_text() == '{"id": 0}\n{"id": 1}\n'  # flushed, not held until close
    w.close()
    # a kill cut the last line short: it is dropped and redone, the complete ones are skipped
    out.write_text('{"id": 0}\n{"id": 1}\n{"id": 2, "tok')
    w = ResultWriter(str(out), items)
    assert [it.id for it in w.todo] == [2] and w.skipped == 2
    assert out.read_text() == '{"id": 0}\n{"id": 1}\n'
    w.add(0, {"id": 2})
    w.close()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0, 1, 2]


def test_generate_batch_rerun_completes_a_killed_output(tmp_path, capsys):
    """Rows are on disk as they finish; a rerun after a kill computes only the missing ones, with equal results."""
    from infer.generate import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "Hello"}\n{"id": "b", "prompt_ids": [1, 5, 6]}\n{"prompt": "cats", "seed": 3}\n')
    out = tmp_path / "out.jsonl"
    argv = ["--config", TINY, "--input", str(inp), "--output", str(out), "--max-new-tokens", "3", "--max-batch", "2",
            "--max-model-len", "64", "--prefill-chunk", "16", "--prefill-batch", "1"]
    assert main(argv) == 0
    full = out.read_text()
    assert [json.loads(x)["id"] for x in full.splitlines()] == [0, "b", 2]
    lines = full.splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:10])  # killed while writing the second row
    capsys.readouterr()
    assert main(argv) == 0
    assert f"{out}: 1 of 3 results already there; 2 to go" in capsys.readouterr().err
    assert out.read_text() == full
    assert main(argv) == 0  # nothing left to do: no model is built
    assert "3 of 3 results already there; 0 to go" in capsys.readouterr().err
    assert out.read_text() == full


def test_generate_batch_stops_at_a_full_disk(tmp_path, capsys, monkeypatch):
    """A write under --output that fails (ENOSPC) stops the batch at the failing result: one error line naming the
    file and how many results are safe, exit status 1, no traceback; a rerun completes it."""
    import errno
    import io

    import infer.batch
    from infer.generate import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "Hello"}\n{"id": "b", "prompt_ids": [1, 5, 6]}\n{"prompt": "cats", "seed": 3}\n')
    out = tmp_path / "out.jsonl"
    argv = ["--config", TINY, "--input", str(inp), "--output", str(out), "--max-new-tokens", "3", "--max-batch", "1",
            "--max-model-len", "64", "--prefill-chunk", "16", "--prefill-batch", "1"]

    class FullDisk(io.BufferedRandom):
        lines = 0

        def write(self, b):
            if FullDisk.lines == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            FullDisk.lines += 1
            return super().write(b)

    monkeypatch.setattr(infer.batch, "open", lambda path, mode: FullDisk(io.FileIO(path, "a+")), raising=False)
    finished = []
    done = infer.batch.ResultWriter.add
    monkeypatch.setattr(infer.batch.ResultWriter, "add", lambda self, i, row: (finished.append(i), done(self, i, row)))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: --output {out}: writing a result failed (No space left on device); 1 results are safe in it, and "
        "a rerun with the same --output skips them")
    assert finished == [0, 1]  # the third prompt was not waited for
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0]
    monkeypatch.undo()
    assert main(argv) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0, "b", 2]


# ---- config files -----------------------------------------------------------------------------------------------------
def test_config_json_typo_is_named(tmp_path, capsys, no_build):
    from infer.generate import main

    d = tiny_hf_config(vocab_size=512).to_dict()
    d["model_type"] = "mistral4"
    d["num_hiden_layers"] = d.pop("num_hidden_layers")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert _error(main, ["--checkpoint", str(tmp_path), "--prompt-ids", "1"], capsys) == (
        f"error: {tmp_path / 'config.json'}: unknown key 'num_hiden_layers'; did you mean 'num_hidden_layers'? "
        "(without it 'num_hidden_layers' takes its default)")
    d["num_hidden_layers"] = d.pop("num_hiden_layers")
    d["rope_parameters"]["factr"] = d["rope_parameters"].pop("factor")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert _error(main, ["--checkpoint", str(tmp_path), "--prompt-ids", "1"], capsys) == (
        f"error: {tmp_path / 'config.json'}: rope_parameters: unknown key 'factr'; did you mean 'factor'? "
        "(without it 'factor' takes its default)")
    # transformers' own extra keys are not typos
    d["rope_parameters"]["factor"] = d["rope_parameters"].pop("factr")
    d.update(architectures=["Mistral4ForCausalLM"], transformers_version="5.0", torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert "unknown key" not in _error(main, ["--checkpoint", str(tmp_path), "--prompt-ids", "1", "--dtype", "x"],
                                       capsys)


def _run_yaml(tmp_path, **edits) -> str:
    d = yaml.safe_load((REPO / "configs/finetune-tiny.yaml").read_text())
    d["data"]["train"] = [str(REPO / p) for p in d["data"]["train"]]
    d["data"]["eval"] = []
    d["train"]["out_dir"] = str(tmp_path / "run")
    for key, value in edits.items():
        section, field = key.split("__")
        d[section][field] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_finetune_and_validate_data_reject_bad_configs(tmp_path, capsys, no_build):
    from train.finetune import main as finetune
    from train.validate_data import main as validate

    for tool in (finetune, validate):
        cfg = _run_yaml(tmp_path, train__steps="abc")
        assert _error(tool, ["--config", cfg], capsys) == \
            f"error: {cfg}: train: field 'steps' = 'abc'; expected int"
        cfg = _run_yaml(tmp_path, train__stepz=3)
        assert _error(tool, ["--config", cfg], capsys).startswith(
            f"error: {cfg}: train: unknown key(s) ['stepz']; expected some of [")
        cfg = _run_yaml(tmp_path, train__mesh={"data": 1, "exprt": 8})
        assert _error(tool, ["--config", cfg], capsys) == (
            f"error: {cfg}: train.mesh: unknown mesh axis 'exprt'; expected name=size pairs over the axes data, "
            "expert, tensor, e.g. data=1,expert=8,tensor=1")
        cfg = _run_yaml(tmp_path, optim__lr="fast")
        assert _error(tool, ["--config", cfg], capsys) == f"error: {cfg}: optim: field 'lr' = 'fast'; expected float"
        cfg = _run_yaml(tmp_path, train__loss_chunk=0)
        assert _error(tool, ["--config", cfg], capsys) == (
            f"error: {cfg}: train.loss_chunk = 0 must be a positive number of tokens (the cross-entropy's chunk: "
            "[loss_chunk, vocab] float32 logits are held at once)")
        cfg = _run_yaml(tmp_path, train__loss_chunk="1k")
        assert _error(tool, ["--config", cfg], capsys) == \
            f"error: {cfg}: train: field 'loss_chunk' = '1k'; expected int"
    cfg = _run_yaml(tmp_path)
    assert _error(finetune, ["--config", cfg, "--mesh", "data=1,exprt=4,tensor=1"], capsys) == (
        "error: --mesh: unknown mesh axis 'exprt'; expected name=size pairs over the axes data, expert, tensor, "
        "e.g. data=1,expert=8,tensor=1")
    assert _error(finetune, ["--config", cfg, "--mesh", "data=2,expert=2"], capsys) == (
        f"error: {cfg}: train.mesh: data=2,expert=2 spans 4 devices but this job has 8 (cpu); the sizes must "
        "multiply to 8")


def test_training_rows_bad_utf8_or_training_on_nothing_are_named(tmp_path, capsys, no_build):
    from train.finetune import main as finetune
    from train.validate_data import main as validate

    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 300},
                                    {"role": "assistant", "content": "the answer"}]})
    data = tmp_path / "d.jsonl"
    data.write_bytes(good.encode() + b"\n" + good.encode().replace(b"hi", b"h\xff") + b"\n" + long.encode() + b"\n")
    d = yaml.safe_load(Path(_run_yaml(tmp_path)).read_text())
    d["data"]["train"] = [str(data)]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert validate(["--config", str(cfg)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{data}:2: not valid UTF-8 (byte 45 of the line)"]
    data.write_bytes(good.encode() + b"\n" + long.encode() + b"\n")
    assert validate(["--config", str(cfg)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{data}:2: ") and out[0].endswith(
        ": cut to data.seq_len = 256 it trains on nothing; shorten the prompt or raise data.seq_len")
    code = finetune(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: " in err and "trains on nothing" in err and "Traceback" not in err


def test_export_names_missing_steps_before_building(tmp_path, capsys, no_build):
    from train.export import main as export

    run = tmp_path / "run"
    (run / "checkpoints" / "20").mkdir(parents=True)
    (run / "checkpoints" / "40").mkdir()
    (run / "config.yaml").write_text(Path(_run_yaml(tmp_path)).read_text())
    assert _error(export, ["--run", str(run), "--step", "7", "--peft", str(tmp_path / "a")], capsys) == \
        f"error: {run}: no checkpoint for step 7; saved steps: 20, 40"
    assert _error(export, ["--run", str(tmp_path), "--peft", str(tmp_path / "a")], capsys) == \
        f"error: {tmp_path}: not a training run directory (config.yaml missing)"


def test_convert_distributed_and_launcher_bad_input(tmp_path, capsys):
    from small4_jax.tools.convert import main as convert

    assert _error(convert, ["--from", str(tmp_path / "nope"), "--to", str(tmp_path / "out")], capsys) == \
        f"error: {tmp_path / 'nope'}: checkpoint directory not found"
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import local
    finally:
        sys.path.remove(str(REPO / "launch"))
    assert _error(local.main, ["--nproc", "2", "--", "no-such-program-xyz"], capsys) == \
        "error: launch/local.py: command not found: no-such-program-xyz"
    assert _error(local.main, ["--nproc", "0", "--", "true"], capsys) == "error: --nproc must be at least 1, got 0"
    assert _error(local.main, ["--nproc", "1", "--cpu-devices", "0", "--", "true"], capsys) == \
        "error: --cpu-devices must be at least 1, got 0"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert _error(local.main, ["--nproc", "1", "--port", str(port), "--", "true"], capsys) == \
            f"error: --port {port}: 127.0.0.1:{port} is already in use"


def test_distributed_preflight_on_one_device():
    """The README's cluster check, on a machine with one device (the TypeError at distributed.py:243)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMALL4_", "SLURM_", "JOB_COMPLETION"))}
    env.update(JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "small4_jax.parallel.distributed", "--expected-devices", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("process 0/1 (single): 1 devices, all-reduce ")


# ---- the server --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server():
    """The tiny model behind the HTTP server; every request below is refused before the engine runs anything."""
    from infer.engine.engine import Engine
    from infer.serve import Running, Server
    from small4_jax.config import Small4Config
    from small4_jax.nn.model import init_model
    from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

    model = init_model(Small4Config.from_yaml(TINY), seed=0)
    tok = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    running = Running(Server(Engine(model, tok, max_batch=2, max_model_len=128, prefill_chunk=16), tok, "tiny"))
    try:
        yield running
    finally:
        running.stop()


def _post(url: str, path: str, body) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


HI = [{"role": "user", "content": "hi"}]
CHAT_CASES = [  # (body, param, message)
    (b"{not json", None, "the body is not valid JSON: Expecting property name enclosed in double quotes: line 1 "
                         "column 2 (char 1)"),
    (b"[1, 2]", None, "the body must be a JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', None,
     "the body is not valid JSON: Infinity is not a JSON number (JSON has no NaN or infinity)"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e999}', None,
     "the body is not valid JSON: 1e999 is out of the range of a 64-bit float"),
    (b'{"messages": ' + b"[" * 10000 + b"]" * 10000 + b"}", None,
     "the body is not valid JSON here: it nests deeper than the parser's limit"),
    ({"model": "gpt-4", "messages": HI}, "model", "model 'gpt-4' is not served here; GET /v1/models lists 'tiny'"),
    ({"messages": HI, "temperature": "0.5"}, None, "temperature: Input should be a valid number"),
    ({"messages": HI, "max_tokens": 2.5}, None, "max_tokens: Input should be a valid integer"),
    ({"messages": HI, "stream": "yes"}, None, "stream: Input should be a valid boolean"),
    ({"messages": HI, "top_p": 0}, None, "top_p: Input should be greater than 0"),
    ({"messages": HI, "n": 17}, None, "n: Input should be less than or equal to 16"),
    ({"messages": HI, "frobnicate": 1}, "frobnicate", "unsupported parameter 'frobnicate': this server does not "
                                                      "implement it"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens", "max_tokens must be positive (0 only with echo and logprobs), "
                                                      "got 0"),
    ({"messages": HI, "max_tokens": 200}, "max_tokens",
     "prompt (22 tokens) + max_tokens (200) exceeds the model's context of 128 tokens"),
    ({"messages": "hi"}, None, "messages: Input should be a valid list"),
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages", "messages[0]: 'content' is missing"),
    ({"messages": [{"content": "hi"}]}, "messages",
     "messages[0].role: None; expected one of system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages",
     "messages[0].content: expected a string or a list of content parts, got int"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools",
     "tools[0].function.name: expected a non-empty string, got None"),
    ({"messages": HI, "tools": [{"type": "function"}]}, "tools",
     "tools[0].function: expected an object with 'name' and 'parameters'"),
    ({"messages": HI, "tools": {"name": "f"}}, None, "tools: Input should be a valid list"),
    ({"messages": HI, "reasoning_effort": "extreme"}, "reasoning_effort",
     "reasoning_effort: Input should be 'none', 'minimal', 'low', 'medium', 'high', 'xhigh', 'max' or 'auto'"),
    ({"messages": HI, "seed": -1}, "seed", "seed: Input should be greater than or equal to 0"),
    ({"messages": HI, "top_k": 2**31}, "top_k", "top_k: Input should be less than or equal to 2147483647"),
    ({"messages": HI, "max_completion_tokens": 200}, "max_completion_tokens",
     "prompt (22 tokens) + max_completion_tokens (200) exceeds the model's context of 128 tokens"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}}}}, "response_format",
     "response_format.json_schema.schema.properties.a.minimum: not a valid JSON schema: 'x' is not of type 'number'"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "string", "pattern": "("}}}}, "response_format",
     "response_format.json_schema.schema.pattern: not a valid JSON schema: '(' is not a 'regex'"),
    ({"messages": HI, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "int"}}}}}]}, "tools",
     "tools[0].function.parameters.properties.x.type: not a valid JSON schema: 'int' is not valid under any of the "
     "given schemas"),
]
COMPLETION_CASES = [
    ({"prompt": ""}, "prompt", "empty prompt"),
    ({"prompt": [1, 2, 999]}, None, "prompt ids [999] are outside the vocabulary [0, 512)"),
    ({"prompt": [[1, 2], []]}, "prompt", "prompt[1]: empty list of token ids"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens must be positive (0 only with echo), got 0"),
    ({"prompt": "hi", "model": "tiny-2"}, "model", "model 'tiny-2' is not served here; GET /v1/models lists 'tiny'"),
    ({"prompt": "hi", "logprobs": 50}, None, "logprobs: Input should be less than or equal to 20"),
    ({"prompt": [5] * 130}, "prompt", "prompt has 130 tokens but the model's context is 128; shorten the prompt"),
]


def test_every_bad_request_is_a_400_naming_the_field(tiny_server):
    for path, cases in (("/v1/chat/completions", CHAT_CASES), ("/v1/completions", COMPLETION_CASES)):
        for body, param, message in cases:
            status, got = _post(tiny_server.url, path, body)
            assert status == 400, (body, got)
            err = got["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == 400, (body, err)
            if message is not None:
                assert err["message"] == message, (body, err["message"])
            if param is not None:  # the field, or a path inside it ("messages[0]", "tools[0].function.name")
                assert (err["param"] or "").startswith(param), (body, err)
            assert "\n" not in err["message"] and "Traceback" not in err["message"]
    assert tiny_server.server.engine.metrics()["requests"] == 0  # none reached the engine


def test_metrics_while_the_engine_thread_appends(tiny_server):
    """/metrics read the engine's token times while the engine thread appended to them: 'deque mutated during
    iteration' (a 500). The engine's own append path runs here on another thread, as fast as it can."""
    import threading

    engine = tiny_server.server.engine
    stop = threading.Event()
    empty = (None, None, None, None)

    def engine_thread():
        while not stop.is_set():
            engine.accept([], empty)

    t = threading.Thread(target=engine_thread, daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: a race shows within the loop
    t.start()
    try:
        for _ in range(30000):
            m = engine.metrics()
            assert m["tokens_per_second"] == 0.0  # rows of zero tokens
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        t.join(timeout=10)


def test_serve_command_line_rejects_bad_input_before_building(tmp_path, capsys, no_build):
    import socket

    from infer.serve import main as serve

    def err(*argv):
        return _error(serve, list(argv), capsys)

    assert err("--config", TINY, "--dtype", "banana") == "error: --dtype 'banana': expected one of float32, bfloat16"
    assert err("--config", TINY, "--mesh", "data=1,exprt=4,tensor=1") == (
        "error: --mesh: unknown mesh axis 'exprt'; expected name=size pairs over the axes data, expert, tensor, "
        "e.g. data=1,expert=8,tensor=1")
    assert err("--config", str(tmp_path / "none.yaml")) == f"error: {tmp_path / 'none.yaml'}: config file not found"
    typo = tmp_path / "typo.yaml"
    typo.write_text((REPO / "configs/tiny.yaml").read_text().replace("hidden_size:", "hiden_size:", 1))
    assert err("--config", str(typo)).startswith(f"error: {typo}: unknown field(s) hiden_size; known fields: ")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert err("--config", TINY, "--port", str(port)) == \
            f"error: --port {port}: 127.0.0.1:{port} is already in use"
    assert err("--config", TINY, "--port", "70000") == "error: --port 70000: expected 0-65535"
    assert err("--config", TINY, "--activations", "fp8") == (
        "error: --activations fp8 (W8A8) needs an FP8 checkpoint's static activation scales: pass --checkpoint DIR "
        "(a random --config model has none)")


def small4_jax_config():
    from small4_jax.config import Small4Config

    return Small4Config.from_yaml(TINY)


def test_adapters_drafter_and_resume_are_checked_before_the_build(tmp_path, capsys, no_build, monkeypatch):
    """--lora DIR / NAME=DIR (missing, corrupt), --speculative (unknown, missing EAGLE directory) on generate and
    serve, and finetune --resume with nothing to resume: each one line before any model is built."""
    from infer.generate import main as generate
    from infer.serve import main as serve
    from train.finetune import main as finetune

    missing = tmp_path / "missing"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    g = ["--config", TINY, "--prompt", "hi"]
    assert _error(generate, [*g, "--lora", str(missing)], capsys) == \
        f"error: --lora {missing}: not a PEFT adapter directory (adapter_config.json missing)"
    assert _error(generate, [*g, "--lora", str(corrupt)], capsys).startswith(
        f"error: --lora {corrupt}: {corrupt / 'adapter_model.safetensors'}: ")
    assert _error(generate, [*g, "--lora", f"a={corrupt}"], capsys).startswith(
        f"error: --lora a={corrupt}: {corrupt / 'adapter_model.safetensors'}: ")
    from small4_jax.errors import CheckpointError
    from small4_jax.lora.adapters import load_peft
    from small4_jax.nn.model import abstract_model

    # the server's /v1/load_lora_adapter reads through load_peft: the same error, a 400
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: truncated or corrupt"):
        load_peft(abstract_model(small4_jax_config()), corrupt)
    assert _error(generate, [*g, "--speculative", "bogus"], capsys) == \
        "error: --speculative 'bogus': expected one of 'ngram', 'eagle:DIR'"
    assert _error(generate, [*g, "--speculative", f"eagle:{missing}"], capsys) == \
        f"error: --speculative eagle:{missing}: not a directory"
    assert _error(serve, ["--config", TINY, "--port", "0", "--lora", f"x={missing}"], capsys) == \
        f"error: --lora x={missing}: not a PEFT adapter directory (adapter_config.json missing)"
    assert _error(serve, ["--config", TINY, "--port", "0", "--speculative", f"eagle:{tmp_path}"], capsys) == (
        f"error: --speculative eagle:{tmp_path}: no params.json or config.json (expected an EAGLE draft checkpoint "
        "directory)")
    cfg = _run_yaml(tmp_path)
    assert _error(finetune, ["--config", cfg, "--resume"], capsys) == \
        f"error: {tmp_path / 'run'}: --resume but no checkpoint in {tmp_path / 'run' / 'checkpoints'}"
    (tmp_path / "file").write_text("")
    assert _error(finetune, ["--config", cfg, "--out-dir", str(tmp_path / "file" / "run")], capsys) == \
        f"error: train.out_dir {tmp_path / 'file' / 'run'}: cannot be written (Not a directory)"
    # DPO and GRPO runs take SFT's run directory checks (train.trainer.prepare_run_dir), before any build
    def built(*a, **k):
        raise AssertionError("a model was built before the run directory was checked")

    monkeypatch.setattr("train.dpo.build_model", built)
    monkeypatch.setattr("train.grpo.load_base", built)
    for method in ("dpo", "grpo"):
        cfg = _run_yaml(tmp_path, train__method=method)
        assert _error(finetune, ["--config", cfg, "--resume"], capsys) == \
            f"error: {tmp_path / 'run'}: --resume but no checkpoint in {tmp_path / 'run' / 'checkpoints'}"
        (tmp_path / "run" / "checkpoints" / "3").mkdir(parents=True)
        assert _error(finetune, ["--config", cfg], capsys) == (f"error: {tmp_path / 'run'}: already holds checkpoints; "
                                                               "pass --resume to continue it or pick another out_dir")
        (tmp_path / "run" / "checkpoints" / "3").rmdir()


def test_non_finite_weights_are_named_at_load(tmp_path, capsys):
    """A NaN in a float checkpoint's weight: one error naming the tensor, from the Python API and the command line
    (exit 2); check_finite=False / --no-finite-check loads it anyway."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    import small4_jax
    from ckpt_utils import make_hf_model, save_hf
    from infer.generate import main as generate
    from small4_jax.errors import CheckpointError

    save_hf(make_hf_model(tiny_hf_config(), seed=3), tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    path = next(p for p in sorted(tmp_path.glob("*.safetensors")) if name in load_file(p))
    tensors = load_file(path)
    tensors[name][0, :3] = [np.nan, np.inf, np.nan]
    save_file(tensors, path, metadata={"format": "pt"})
    message = (f"{tmp_path}: tensor {name.removeprefix('model.')} holds 3 non-finite values (NaN or inf) of "
               f"{tensors[name].size}; ")
    with pytest.raises(CheckpointError) as e:
        small4_jax.from_pretrained(tmp_path, dtype="float32")
    assert str(e.value).startswith(message)
    assert _error(generate, ["--checkpoint", str(tmp_path), "--prompt-ids", "1,2", "--max-new-tokens", "1"],
                  capsys).startswith(f"error: {message}")
    model = small4_jax.from_pretrained(tmp_path, dtype="float32", check_finite=False)
    assert np.isnan(np.asarray(model.layers[1].self_attn.o_proj.kernel[...])).sum() == 2
