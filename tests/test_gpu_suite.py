"""benchmarks/gpu_suite.sh's own logic, with fake steps (`--steps FILE`) in a fake $OUT: what a lent GPU's call brings
back (at most 8 files, GPU_RESULTS.md with each step under its heading as soon as it ends) when a step times out,
writes files of its own, or the whole call is killed mid-step; benchmarks/gpu_wheels.py's checks of the carried
wheels against the image; decode.py's transformers peer running out of memory (one row, not a crash). Seconds."""

import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_wheels  # noqa: E402

STEPS = r"""
step fast 2 bash -c 'printf "| a | b |\n|---|---|\n| 1 | 2 |\n" >> "$0"' "$RESULTS"
step litters 2 bash -c 'for i in $(seq 12); do echo "{}" > "$OUT/r$i.json"; done; echo wrote'
step slow 2 bash -c 'echo "| partial | row |" >> "$0"; sleep 30' "$RESULTS"
step fails 2 bash -c 'echo "loss 7.95 vs 7.95: MISMATCH"; echo "Traceback: torch.OutOfMemoryError: CUDA out of memory" >&2; exit 3'
step last 2 true
"""


def _run_suite(tmp_path, *args, steps=STEPS, wait=True, **env):
    out = tmp_path / "out"
    steps_file = tmp_path / "steps.sh"
    steps_file.write_text(steps)
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_SUITE_SITE": str(tmp_path / "site"),
           "GPU_SUITE_WHEELS": str(tmp_path / "no_wheels"), "JAX_PLATFORMS": "cpu", "GPU_SUITE_PROBE": "0", **env}
    cmd = ["bash", str(SUITE), "--steps", str(steps_file), *args]
    if not wait:
        return out, subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _sections(text):
    """'## N. name' heading -> the text under it."""
    parts = text.split("\n## ")[1:]
    return {p.split("\n", 1)[0].split(". ", 1)[1]: p.split("\n", 1)[1] for p in parts}


def test_each_step_lands_under_its_heading_and_at_most_two_files_come_back(tmp_path):
    tracked = (REPO / "benchmarks" / "RESULTS.md").read_bytes()
    out, proc = _run_suite(tmp_path, "--dry-run", DRY_STEP_LIMIT="2", GPU_SUITE_PROBE="1")  # one limit for all
    assert sorted(p.name for p in out.iterdir()) == ["GPU_RESULTS.md", "gpu_logs.tar.gz"]
    text = (out / "GPU_RESULTS.md").read_text()
    assert text.startswith("# GPU suite results\n")
    assert "- python 3." in text and "- carried wheels: none" in text
    sections = _sections(text)
    assert list(sections) == ["fast", "litters", "slow", "fails", "last"]
    assert "| 1 | 2 |" in sections["fast"] and "exit 0 in" in sections["fast"]
    assert "| partial | row |" in sections["slow"] and "**killed at its 2 s limit**" in sections["slow"]
    assert "**exit 3**" in sections["fails"] and "CUDA out of memory" in sections["fails"]
    assert "MISMATCH" in sections["fails"]  # its stdout too: a failed check prints there
    assert "exit 0 in" in sections["last"]
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/litters/r{i}.json" for i in range(1, 13)} <= names  # a step's own $OUT files: in the archive
    assert {"logs/fast/stdout.txt", "logs/fails/stderr.txt", "logs/last/stderr.txt"} <= names
    assert (REPO / "benchmarks" / "RESULTS.md").read_bytes() == tracked  # the tracked file is never written


def test_a_call_killed_mid_step_still_returns_what_ended_before(tmp_path):
    """The device kills a command at its limit, process group and all: $OUT keeps the results of the steps that
    ended and the rows the running step had appended."""
    steps = STEPS.split("step slow")[0] + (
        "step hangs 100 bash -c 'echo \"| measured | before |\" >> \"$0\"; echo $$ > \"$1\"; exec sleep 100' "
        f"\"$RESULTS\" {tmp_path}/hanging\n")
    out, proc = _run_suite(tmp_path, "--dry-run", steps=steps, wait=False)
    deadline = time.monotonic() + 60
    while not (tmp_path / "hanging").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.2)  # (the pid is written)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    os.kill(int((tmp_path / "hanging").read_text()), signal.SIGKILL)  # `timeout` made the step its own group
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "GPU_RESULTS.md" in files and "gpu_logs.tar.gz" in files
    sections = _sections((out / "GPU_RESULTS.md").read_text())
    assert list(sections) == ["fast", "litters", "hangs"]
    assert "exit 0 in" in sections["litters"] and "| measured | before |" in sections["hangs"]
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        assert "logs/litters/r12.json" in tar.getnames()


def test_budget_parts_and_bad_arguments(tmp_path):
    steps = "step first 30 sleep 1\nstep second 100 true\n"
    out, _ = _run_suite(tmp_path, "--budget", "60", steps=steps)  # no --dry-run: GPU limits, the call's budget
    sections = _sections((out / "GPU_RESULTS.md").read_text())
    assert "exit 0 in" in sections["first"] and "limit cut" not in sections["first"]
    assert "(limit cut from 100 s to " in sections["second"] and "exit 0 in" in sections["second"]
    out, _ = _run_suite(tmp_path, "--budget", "20", steps=steps)
    assert "**skipped**" in _sections((out / "GPU_RESULTS.md").read_text())["first"]
    out, _ = _run_suite(tmp_path, "--only", "second", steps=steps)
    assert list(_sections((out / "GPU_RESULTS.md").read_text())) == ["second"]
    for bad, message in ((["--part", "3"], "--part takes 1, 2 or all, not '3'"),
                         (["--budget", "ten"], "--budget takes seconds, not 'ten'"),
                         (["--frobnicate"], "unknown argument '--frobnicate'")):
        proc = subprocess.run(["bash", str(SUITE), *bad], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr


def test_the_builtin_parts_fit_the_device_limits():
    """Each part's step limits add up to under 480 s (a call may run 600 s, start-up and set-up included)."""
    text = SUITE.read_text()
    body = text[text.index("builtin_steps() {"):text.index("\nsetup\n")]
    part1, part2 = body.split('if [ "$PART" != 1 ]')
    limits = [[int(line.split()[2]) for line in part.splitlines() if line.strip().startswith("step ")]
              for part in (part1, part2)]
    assert [len(x) for x in limits] == [4, 5]
    assert all(sum(x) < 480 for x in limits), limits


def _wheel(directory, name, version, requires=()):
    path = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def test_carried_wheels_are_checked_against_the_image(tmp_path):
    image = tmp_path / "image.txt"
    image.write_text("# a comment\npython==3.12.3\nnumpy==2.5.2\nanyio\ntyping-extensions  # unknown version\n")
    assert set(gpu_wheels.image(image)) == {"numpy", "anyio", "typing-extensions"}
    wheels = tmp_path / "w"
    wheels.mkdir()
    _wheel(wheels, "fastapi", "1.0", ["starlette>=1.0", "anyio>=4", 'uvloop; sys_platform == "win32"',
                                      'rich; extra == "all"'])
    _wheel(wheels, "starlette", "1.1", ["anyio"])
    _wheel(wheels, "mistral-common", "1.13.1", ['numpy<2.4,>=1.25; python_version <= "3.12"'])
    assert gpu_wheels.check(wheels, image_path=image) == (
        [], ['mistral-common 1.13.1 needs numpy<2.4,>=1.25; python_version <= "3.12"; the image has numpy 2.5.2 '
             "(installed --no-deps)"])
    _wheel(wheels, "starlette", "0.9")  # a second version, too old for fastapi
    _wheel(wheels, "openai", "3.0", ["httpx2>=2"])
    _wheel(wheels, "typing-extensions", "4.16.0")
    problems, _ = gpu_wheels.check(wheels, image_path=image)
    assert problems == [
        "starlette: two versions carried (0.9 and 1.1); pip stops on two",
        "typing-extensions 4.16.0: the image has typing-extensions; carrying it would shadow the image's copy",
        "openai 3.0 needs httpx2>=2: neither carried nor in the image"]
    problems, _ = gpu_wheels.check(wheels, {"typing-extensions"}, image_path=image)
    assert len(problems) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("jax==0.11.2\njax = 0.11\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: 'jax = 0.11' is not a requirement"):
        gpu_wheels.image(bad)


def test_the_image_list_pins_the_gpu_machines_versions():
    have = gpu_wheels.image()
    assert str(have["jax"]) == "jax==0.11.2" and str(have["jax-cuda13-plugin"]) == "jax-cuda13-plugin==0.11.2"
    assert str(have["numpy"]) == "numpy==2.5.2" and str(have["torch"]) == "torch==2.11.0"
    assert not {"pydantic", "fastapi", "uvicorn", "openai", "mistral-common", "llguidance", "tokamax"} & set(have)


def test_decode_peer_out_of_memory_is_one_row(monkeypatch):
    torch = pytest.importorskip("torch")
    import decode

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 GiB\nmore detail")

    monkeypatch.setattr(decode, "_peer_decode", oom)
    peer = decode.peer_decode(None, 64, 8192, 3, "cpu")
    assert peer == "out of memory: CUDA out of memory. Tried to allocate 128.00 GiB"
    row = dict(batch=64, context=8192, tokens_per_s=1000.0, step_ms=64.0, us_per_layer=16000, floor_ms=32.0,
               fraction_of_floor=0.5, copy_bandwidth_gbs=3000.0, ttft_ms=900.0, peer_tokens_per_s=None,
               peer_error=peer)
    assert decode.markdown_row(row) == ("| 64 | 8192 | 1000.0 | 64.00 | 16000 | 32.00 | 50% | 3000 | 900 | did not "
                                        "run: out of memory: CUDA out of memory. Tried to allocate 128.00 GiB |")
