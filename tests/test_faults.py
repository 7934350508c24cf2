"""Faults beside the SIGKILL tests (test_finetune, test_convert): a corrupted latest checkpoint, a disk that fills
while a checkpoint is saved, and a server killed and restarted under load.

References: the uninterrupted run's losses for the resumed one; each client's request outcome (an answer or an
error, never a hang: every wait is bounded).
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from train import config as run_config

ROOT = Path(__file__).resolve().parent.parent


def _cfg(out: Path, **train):
    d = yaml.safe_load((ROOT / "configs/finetune-tiny.yaml").read_text())
    d["base"]["tokenizer"] = str(ROOT / d["base"]["tokenizer"])
    d["data"]["train"] = [str(ROOT / p) for p in d["data"]["train"]]
    d["data"]["eval"] = []
    d["train"].update(out_dir=str(out), log_every=1000, steps=4, ckpt_every=2, keep=3, **train)
    return run_config.from_dict(d)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4; its losses are the reference."""
    from train.trainer import train

    out = tmp_path_factory.mktemp("faults") / "run"
    records = train(_cfg(out))
    return out, {r["step"]: r["loss"] for r in records}


def test_corrupted_latest_checkpoint_resumes_from_the_one_before_loudly(four_steps, tmp_path, capsys):
    from train.trainer import train

    ref_out, ref = four_steps
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    data = list((out / "checkpoints" / "4").rglob("d/*"))
    assert data
    for f in data:  # every array chunk of step 4 cut short
        if f.is_file():
            f.write_bytes(f.read_bytes()[:8])
    # through the command line, as a user resumes: what it prints is checked too (each line once, only ours)
    from train.finetune import main as finetune

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cfg(out).to_dict()))
    capsys.readouterr()
    assert finetune(["--config", str(config), "--resume"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert sum(x.startswith(f"checkpoint step 4 in {out / 'checkpoints'} cannot be restored (") for x in lines) == 1
    assert lines.count("resuming from step 2: the newer checkpoint(s) step 4 are unreadable") == 1
    assert lines.count("resumed from step 2") == 1
    # moved aside (left in place it would block saving step 4 again: Orbax saves only past its latest step)
    assert [p.name.split("-")[:2] for p in (out / "checkpoints").glob("unreadable-*")] == [["unreadable", "4"]]
    assert sum(x.startswith(f"moved the unreadable checkpoint(s) aside in {out / 'checkpoints'}: unreadable-4-")
               for x in lines) == 1
    assert not [x for x in lines if "absl" in x or x.startswith(("INFO", "I0", "I1"))], lines
    assert len(lines) == len(set(lines)), lines
    assert lines[-2].startswith("run finished at step 4/4 (loss ")
    assert lines[-2].endswith(f"): checkpoints and metrics.jsonl in {out}")
    assert lines[-1] == f"next: python -m train.export --run {out} --peft {out / 'adapter'}"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the records past step 2 were recomputed
    # resuming the finished run says so and trains nothing
    assert finetune(["--config", str(config), "--resume"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{out}: the run is already finished (step 4 of train.steps 4); nothing to train. Raise --steps to train "
        "further.")
    assert (out / "metrics.jsonl").read_text().count("\n") == 4
    for r in records[2:]:  # the batches and state of step 2 replayed exactly
        assert abs(r["loss"] - ref[r["step"]]) < 1e-5, (r, ref)
    # every checkpoint unreadable: an error naming each, not a traceback
    from train.trainer import TrainingError

    for f in (out / "checkpoints").rglob("d/*"):
        if f.is_file():
            f.write_bytes(b"x")
    with pytest.raises(TrainingError, match=r"no checkpoint in .* can be restored: step 4: .*; step 2: "):
        train(_cfg(out), resume=True)


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_while_saving_keeps_the_previous_checkpoint(four_steps, tmp_path):
    """A small tmpfs holds the run; after the step-2 checkpoint it is filled, so saving step 4 fails."""
    from train.trainer import TrainingError, saved_steps, train

    ref_out, ref = four_steps
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("needs root to mount a small tmpfs (a full disk is simulated with a real one)")
    try:
        out = disk / "run"
        out.mkdir()
        shutil.copytree(ref_out / "checkpoints" / "2", out / "checkpoints" / "2")
        shutil.copy(ref_out / "config.yaml", out / "config.yaml")
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": ref[s]}) + "\n" for s in (1, 2)))
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave 16 KiB: less than a checkpoint (~600 KiB), more than a metrics line
            free = shutil.disk_usage(disk).free
            f.write(b"\0" * (free - (16 << 10)))
        with pytest.raises(TrainingError) as e:
            train(_cfg(out), resume=True)
        msg = str(e.value)
        assert msg.startswith(f"writing to {out} failed: no space left on the device (")
        assert msg.endswith("; the last complete checkpoint is step 2: free space and run again with --resume")
        assert saved_steps(out) == [2]
        filler.unlink()
        records = train(_cfg(out), resume=True)  # the previous checkpoint is intact
        assert [r["step"] for r in records] == [3, 4]
        assert all(abs(r["loss"] - ref[r["step"]]) < 1e-5 for r in records)
        assert saved_steps(out) == [2, 4]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---- the server killed and restarted under load ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "infer.serve", "--config", "configs/tiny.yaml", "--port", str(port),
         "--max-model-len", "64", "--max-batch", "4", "--prefill-chunk", "16", "--prefill-batch", "1"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


def _request(url: str, stream: bool) -> str:
    body = json.dumps({"model": "configs/tiny.yaml", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4, "temperature": 0, "stream": stream}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
        if stream:
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        else:
            assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")
        return "ok"
    except TimeoutError:
        return "hang"
    except (OSError, urllib.error.HTTPError, ConnectionError) as e:  # refused, reset, closed mid-body
        return "hang" if isinstance(getattr(e, "reason", None), TimeoutError) else "error"
    except Exception:  # http.client.IncompleteRead / RemoteDisconnected
        return "error"


def test_server_killed_and_restarted_under_load():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(port)
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()
    try:
        _wait_ready(url, proc)
        assert _request(url, False) == "ok"  # compiles, outside the load

        def client(i):
            while not stop.is_set():
                t = time.monotonic()
                outcomes.append((t, _request(url, stream=i % 2 == 0)))
                if outcomes[-1][1] != "ok":
                    time.sleep(0.2)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while sum(o == "ok" for _, o in outcomes) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        killed_at = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while sum(t >= killed_at for t, _ in outcomes) < 4 and time.monotonic() < deadline:  # tried while down
            time.sleep(0.1)
        relaunched_at = time.monotonic()
        proc = _serve(port)  # the same port, at once
        _wait_ready(url, proc)
        restarted_at = time.monotonic()
        deadline = time.monotonic() + 120
        while sum(o == "ok" for t, o in outcomes if t >= restarted_at) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(timeout=90)
            assert not t.is_alive(), "a client hung"
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert "hang" not in [o for _, o in outcomes]
    before = [o for t, o in outcomes if t < killed_at]
    during = [o for t, o in outcomes if killed_at <= t < relaunched_at]
    after = [o for t, o in outcomes if t >= restarted_at]
    assert before.count("ok") >= 8
    assert during and set(during) == {"error"}, during  # refused while down: an error at once, not a wait
    assert after.count("ok") >= 4
