"""Multi-process start-up: find the cluster from the environment, initialise JAX's distributed runtime, then a
preflight of the collectives with deadlines, before any weights load.

Where the cluster comes from, first match wins:
- explicit variables: `SMALL4_COORDINATOR` (host:port of process 0), `SMALL4_NUM_PROCESSES`, `SMALL4_PROCESS_ID`,
  optionally `SMALL4_NUM_HOSTS` (hosts in the job, default 1; used to reject a loopback coordinator);
- SLURM (`srun`): `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_NNODES`, `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST`; the
  coordinator is the first node at port `SMALL4_COORDINATOR_PORT` (default 12321) unless `SMALL4_COORDINATOR` is set;
- Kubernetes indexed Job / JobSet: `JOB_COMPLETION_INDEX` is the process id, `SMALL4_NUM_PROCESSES` the count, and
  `SMALL4_COORDINATOR` (e.g. `<jobset>-<job>-0-0.<jobset>:12321`) the coordinator;
- otherwise a single process.

Also read: `SMALL4_INIT_TIMEOUT` (seconds to wait for all processes, default 1800: cold gangs start slowly),
`SMALL4_CPU_DEVICES` (simulate N CPU devices per process: tests and workstations), `SMALL4_LOCAL_DEVICE_IDS`
(comma-separated GPU ids this process owns, when the scheduler does not isolate them).

Bad settings (a loopback coordinator with several hosts, counts that disagree, an id out of range) raise
`DistributedError` naming the variables. `python -m small4_jax.distributed` runs start-up + preflight and prints a
report (the launch scripts run it first).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping

from small4_jax.console import cli_main
from small4_jax.errors import Small4Error

DEFAULT_PORT = 12321
DEFAULT_INIT_TIMEOUT = 1800
LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "[::1]")


class DistributedError(Small4Error):
    """The cluster settings are inconsistent, start-up failed, or a preflight collective missed its deadline."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    coordinator: str | None  # host:port of process 0; None for a single process
    num_processes: int
    process_id: int
    num_hosts: int
    source: str  # "explicit", "slurm", "kubernetes" or "single"
    local_device_ids: tuple[int, ...] | None = None

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


# ----------------------------------------------------------------------------------------------------------------------
# Detection.
def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r}: expected an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ('gpu[01-03,07],login1') -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def detect(env: Mapping[str, str] | None = None) -> ClusterSpec:
    """The cluster this process belongs to, from the environment (see the module docstring)."""
    env = os.environ if env is None else env
    local_ids = None
    if env.get("SMALL4_LOCAL_DEVICE_IDS"):
        try:
            local_ids = tuple(int(x) for x in env["SMALL4_LOCAL_DEVICE_IDS"].split(","))
        except ValueError:
            raise DistributedError(f"SMALL4_LOCAL_DEVICE_IDS={env['SMALL4_LOCAL_DEVICE_IDS']!r}: expected comma-"
                                   "separated integers") from None
    explicit_n, explicit_id = _int(env, "SMALL4_NUM_PROCESSES"), _int(env, "SMALL4_PROCESS_ID")
    coordinator = env.get("SMALL4_COORDINATOR") or None
    port = _int(env, "SMALL4_COORDINATOR_PORT") or DEFAULT_PORT

    if explicit_id is not None:
        if explicit_n is None or coordinator is None:
            raise DistributedError("SMALL4_PROCESS_ID is set: SMALL4_NUM_PROCESSES and SMALL4_COORDINATOR are needed too")
        slurm_n = _int(env, "SLURM_NTASKS")
        if slurm_n is not None and "SLURM_PROCID" in env and slurm_n != explicit_n:
            raise DistributedError(f"SMALL4_NUM_PROCESSES={explicit_n} but SLURM_NTASKS={slurm_n}: the counts "
                                   "disagree; unset one or make them equal")
        spec = ClusterSpec(coordinator, explicit_n, explicit_id, _int(env, "SMALL4_NUM_HOSTS") or 1, "explicit",
                           local_ids)
    elif "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS") is not None:
        n, pid = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
        nodes = _int(env, "SLURM_NNODES") or 1
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        if per_node.isdigit() and int(per_node) * nodes != n:
            raise DistributedError(f"SLURM_NTASKS={n} but SLURM_NNODES={nodes} x SLURM_NTASKS_PER_NODE={per_node} = "
                                   f"{int(per_node) * nodes}: the counts disagree")
        if explicit_n is not None and explicit_n != n:
            raise DistributedError(f"SMALL4_NUM_PROCESSES={explicit_n} but SLURM_NTASKS={n}: the counts disagree")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        hosts = expand_nodelist(nodelist) if nodelist else []
        if hosts and len(hosts) != nodes:
            raise DistributedError(f"SLURM_NNODES={nodes} but the node list {nodelist!r} has {len(hosts)} hosts")
        if coordinator is None:
            if not hosts:
                raise DistributedError("SLURM: no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to find the coordinator; "
                                       "set SMALL4_COORDINATOR=host:port")
            coordinator = f"{hosts[0]}:{port}"
        spec = ClusterSpec(coordinator, n, pid, nodes, "slurm", local_ids)
    elif "JOB_COMPLETION_INDEX" in env:
        pid = _int(env, "JOB_COMPLETION_INDEX")
        if explicit_n is None:
            raise DistributedError("Kubernetes indexed job (JOB_COMPLETION_INDEX is set): set SMALL4_NUM_PROCESSES to "
                                   "the number of pods (the Job's completions / parallelism)")
        if coordinator is None:
            jobset, job = env.get("JOBSET_NAME"), env.get("REPLICATED_JOB_NAME")
            if not (jobset and job):
                raise DistributedError("Kubernetes: set SMALL4_COORDINATOR=<pod-0 host>:port (or JOBSET_NAME and "
                                       "REPLICATED_JOB_NAME for a JobSet)")
            coordinator = f"{jobset}-{job}-0-0.{jobset}:{port}"
        spec = ClusterSpec(coordinator, explicit_n, pid, _int(env, "SMALL4_NUM_HOSTS") or explicit_n, "kubernetes",
                           local_ids)
    else:
        if explicit_n not in (None, 1):
            raise DistributedError(f"SMALL4_NUM_PROCESSES={explicit_n} but no SMALL4_PROCESS_ID (nor SLURM / "
                                   "Kubernetes variables) says which process this is")
        return ClusterSpec(None, 1, 0, 1, "single", local_ids)
    _validate(spec)
    return spec


def _validate(spec: ClusterSpec) -> None:
    where = {"explicit": "SMALL4_*", "slurm": "SLURM", "kubernetes": "Kubernetes"}[spec.source]
    if spec.num_processes < 1:
        raise DistributedError(f"{where}: the number of processes is {spec.num_processes}; expected >= 1")
    if not 0 <= spec.process_id < spec.num_processes:
        raise DistributedError(f"{where}: process id {spec.process_id} is outside [0, {spec.num_processes})")
    if spec.num_hosts > spec.num_processes:
        raise DistributedError(f"{where}: {spec.num_hosts} hosts but only {spec.num_processes} processes")
    host, sep, port = (spec.coordinator or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"{where}: coordinator {spec.coordinator!r} is not host:port")
    if host in LOOPBACK and spec.num_hosts > 1:
        raise DistributedError(
            f"{where}: coordinator {spec.coordinator} is a loopback address but the job spans {spec.num_hosts} hosts; "
            "the other hosts cannot reach it. Set SMALL4_COORDINATOR to process 0's host name or IP"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Start-up.
def initialize(spec: ClusterSpec | None = None, *, timeout_s: int | None = None) -> ClusterSpec:
    """Configure JAX for this process (simulated CPU devices, distributed runtime); call before any JAX work."""
    import jax

    spec = detect() if spec is None else spec
    cpu_devices = _int(os.environ, "SMALL4_CPU_DEVICES")
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if not spec.multi_process:
        return spec
    timeout_s = timeout_s or _int(os.environ, "SMALL4_INIT_TIMEOUT") or DEFAULT_INIT_TIMEOUT
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
            initialization_timeout=timeout_s,
        )
    except Exception as e:  # the runtime's own message says what failed; add where we were looking
        raise DistributedError(
            f"process {spec.process_id}/{spec.num_processes} could not join coordinator {spec.coordinator} "
            f"({spec.source}) within {timeout_s}s: {e}"
        ) from None
    return spec


def _with_deadline(what: str, fn: Callable[[], object], deadline_s: float) -> object:
    """Run fn in a daemon thread; a collective that hangs becomes a DistributedError after deadline_s."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # reported below
            box["error"] = e

    t = threading.Thread(target=target, name=f"preflight-{what}", daemon=True)
    t.start()
    t.join(deadline_s)
    if t.is_alive():
        raise DistributedError(f"preflight: {what} did not finish within {deadline_s:.0f}s; a process is missing, "
                               "stuck, or cannot reach the others over the network")
    if "error" in box:
        raise DistributedError(f"preflight: {what} failed: {box['error']}")
    return box["value"]


def preflight(*, expected_devices: int | None = None, deadline_s: float = 120.0) -> dict[str, float]:
    """Device count, an all-reduce and an all-to-all over every device, each checked and under a deadline.

    The all-to-all is `ragged_all_to_all` on GPUs (what expert-parallel dispatch uses) and a dense `all_to_all` on
    CPUs (XLA:CPU does not implement the ragged one). Returns the seconds each step took.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    t = time.perf_counter()
    n = _with_deadline("device discovery", jax.device_count, deadline_s)  # the first backend use waits for all
    timings_start = {"device_discovery_s": time.perf_counter() - t}
    if expected_devices is not None and n != expected_devices:
        raise DistributedError(f"preflight: {n} devices in the job ({jax.local_device_count()} on process "
                               f"{jax.process_index()}), expected {expected_devices}")
    mesh = jax.make_mesh((n,), ("all",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = NamedSharding(mesh, P("all"))
    timings: dict[str, float] = dict(timings_start)

    def global_array(per_device: Callable[[int], np.ndarray], width: int):
        return jax.make_array_from_callback(
            (n * width,), sharding, lambda idx: per_device((idx[0].start or 0) // width)  # one device: slice(None)
        )

    # all-reduce: device d contributes d + 1
    x = global_array(lambda d: np.full((1,), d + 1, np.float32), 1)
    allreduce = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "all"), mesh=mesh, in_specs=P("all"),
                                      out_specs=P("all")))
    t = time.perf_counter()
    total = _with_deadline("all-reduce", lambda: jax.block_until_ready(allreduce(x)), deadline_s)
    timings["all_reduce_s"] = time.perf_counter() - t
    want = n * (n + 1) / 2
    local = [np.asarray(s.data) for s in total.addressable_shards]
    if not all(np.allclose(v, want) for v in local):
        raise DistributedError(f"preflight: all-reduce gave {local[0]}, expected {want}")

    # all-to-all: device d sends value 1000*d + j to device j
    y = global_array(lambda d: (1000 * d + np.arange(n)).astype(np.int32), n)
    from small4_jax.platform import on_gpu

    if on_gpu(mesh):  # the devices of the job's mesh, as the expert-parallel dispatch decides (small4_jax.platform)
        body = _ragged_all_to_all_body(n)
    else:
        def body(v):
            return jax.lax.all_to_all(v, "all", 0, 0, tiled=True)
    a2a = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("all"), out_specs=P("all"), check_vma=False))
    t = time.perf_counter()
    out = _with_deadline("all-to-all", lambda: jax.block_until_ready(a2a(y)), deadline_s)
    timings["all_to_all_s"] = time.perf_counter() - t
    for shard in out.addressable_shards:
        j = (shard.index[0].start or 0) // n
        got = np.asarray(shard.data)
        if not np.array_equal(got, 1000 * np.arange(n) + j):
            raise DistributedError(f"preflight: all-to-all gave {got.tolist()} on device {j}")
    timings["devices"] = float(n)
    return timings


def _ragged_all_to_all_body(n: int):
    import jax
    import jax.numpy as jnp

    def body(v):
        ones = jnp.ones((n,), jnp.int32)
        offsets = jnp.arange(n, dtype=jnp.int32)
        out = jnp.zeros_like(v)
        me = jax.lax.axis_index("all").astype(jnp.int32)
        return jax.lax.ragged_all_to_all(v, out, offsets, ones, jnp.full((n,), me, jnp.int32), ones,
                                         axis_name="all")
    return body


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m small4_jax.distributed",
                                description="Join the cluster and run the preflight collectives.")
    p.add_argument("--expected-devices", type=int, help="fail unless the job has exactly this many devices")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds each collective may take")
    a = p.parse_args(argv)
    try:
        spec = initialize()
        import jax

        report = preflight(expected_devices=a.expected_devices, deadline_s=a.deadline)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(3)  # a collective may still hang in a thread: do not wait for it at exit
    print(f"process {spec.process_id}/{spec.num_processes} ({spec.source}): {jax.device_count()} devices, "
          f"all-reduce {report['all_reduce_s'] * 1e3:.1f} ms, all-to-all {report['all_to_all_s'] * 1e3:.1f} ms",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
