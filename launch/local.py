#!/usr/bin/env python3
"""Start N processes of one command on this machine, wired as one JAX job (what tests and a workstation use).

    python launch/local.py --nproc 2 --cpu-devices 4 -- python -m train.finetune --config configs/finetune-tiny.yaml
    python launch/local.py --nproc 2 -- python -m small4_jax.distributed        # start-up + preflight only

Each process gets SMALL4_COORDINATOR=127.0.0.1:<free port>, SMALL4_NUM_PROCESSES, SMALL4_PROCESS_ID and
SMALL4_NUM_HOSTS=1 (read by `small4_jax.parallel.distributed`); with --cpu-devices also SMALL4_CPU_DEVICES and
JAX_PLATFORMS=cpu. Output lines are prefixed with the process id. When one process fails, the others are stopped
(SIGTERM, SIGKILL 5 s later) and the launcher exits with the status of the first to fail; past --timeout all are
killed and the exit status is 124.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()
    stream.close()


def launch(command: list[str], nproc: int, *, cpu_devices: int | None = None, timeout: float | None = None,
           port: int | None = None, env: dict[str, str] | None = None, prefix: bool = True) -> int:
    """Run `command` as processes 0..nproc-1 of one job; return the job's exit status."""
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    base.update(SMALL4_COORDINATOR=f"127.0.0.1:{port}", SMALL4_NUM_PROCESSES=str(nproc), SMALL4_NUM_HOSTS="1")
    if cpu_devices:
        base.update(SMALL4_CPU_DEVICES=str(cpu_devices), JAX_PLATFORMS="cpu")
    procs, pumps = [], []
    for i in range(nproc):
        proc = subprocess.Popen(command, env=dict(base, SMALL4_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        procs.append(proc)
        tag = f"[{i}] " if prefix else ""
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, tag, out), daemon=True)
            t.start()
            pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    exits: queue.Queue[int] = queue.Queue()  # exit statuses in the order the processes ended
    for p in procs:
        threading.Thread(target=lambda p=p: exits.put(p.wait()), daemon=True).start()
    # SIGTERM (a scheduler, a test) stops the whole job, not just this launcher
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for _ in procs:
            # The first process to fail gives the job's status (the others may then die of its absence).
            try:
                code = exits.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                print(f"launch/local.py: timed out after {timeout:.0f}s; killing all processes", file=sys.stderr)
                status = 124
                break
            if code != 0:
                status = code
                break
    except SystemExit as e:
        status = e.code
    except KeyboardInterrupt:  # Ctrl-C: the processes (in their own sessions) are stopped below
        print("\ninterrupted: stopping every process of the job", file=sys.stderr)
        status = 130
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)
        signal.signal(signal.SIGTERM, previous)
    return status


def _stop(procs, grace: float = 5.0) -> None:
    """SIGTERM the process groups still running, then SIGKILL what is left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [options] -- command ...")
    p.add_argument("--nproc", type=int, required=True, help="number of processes")
    p.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices per process (sets JAX_PLATFORMS=cpu)")
    p.add_argument("--timeout", type=float, help="seconds before every process is killed (exit status 124)")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the command to run after --")
    problem = _check(a, command)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return launch(command, a.nproc, cpu_devices=a.cpu_devices, timeout=a.timeout, port=a.port)


def _check(a, command: list[str]) -> str | None:
    """What would make every process fail at start, said once here instead of N times by the processes."""
    import shutil

    for name in ("nproc", "cpu_devices"):
        value = getattr(a, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    if a.timeout is not None and a.timeout <= 0:
        return f"--timeout must be positive, got {a.timeout:g}"
    if shutil.which(command[0]) is None:
        return f"launch/local.py: command not found: {command[0]}"
    if a.port is not None:
        if not 0 < a.port < 65536:
            return f"--port {a.port}: expected 1-65535"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", a.port))
            except OSError:
                return f"--port {a.port}: 127.0.0.1:{a.port} is already in use"
    return None


if __name__ == "__main__":
    sys.exit(main())
