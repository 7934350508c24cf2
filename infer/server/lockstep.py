"""Serving from several processes (multi-host): the engine runs in lockstep on every process.

JAX's multi-controller runtime needs every process to run the same jitted step with the same inputs. The engine's
scheduling is deterministic given the requests and cancellations it has seen, so process 0 (which owns the HTTP
server and the request queue) broadcasts, at the start of every step, the events that arrived since the last one;
the other processes apply the same events and run the same step. Process 0 ticks at least every `IDLE_TICK` seconds
while idle, so the followers, blocked in the broadcast, never wait long in a collective. `stop()` on process 0 sends
a shutdown event that ends `follow()` on the others.

Adapter loads and unloads (`load_adapter` / `unload_adapter`, the server's /v1/load_lora_adapter) are events too:
process 0 reads the adapter, then sends ("load", name, path) in its step's events and installs it there; every other
process reads the same path (a filesystem all hosts see) and installs it at the same point of the step sequence,
so the adapter slots stay identical everywhere. A process that cannot read an adapter process 0 loaded stops with
an error instead of running on with different weights.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import queue

import numpy as np

from infer.engine.engine import Engine
from small4_jax.errors import Small4Error

log = logging.getLogger("small4_jax")

IDLE_TICK = 0.5  # seconds


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Process 0's `payload` on every process (others pass None). Two collectives: the length, then the bytes padded
    to a power of two (few distinct shapes, so few compilations)."""
    import jax
    from jax.experimental import multihost_utils

    leader = jax.process_index() == 0
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload) if leader else 0)))
    size = 64
    while size < n:
        size *= 2
    buf = np.zeros(size, np.uint8)
    if leader:
        buf[:n] = np.frombuffer(payload, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n].tobytes()


class LockstepEngine(Engine):
    """An `Engine` that runs the same steps on every process of a multi-process job (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        import jax

        super().__init__(*args, **kwargs)
        self.leader = jax.process_index() == 0
        self._shutdown = False

    def _drain_inbox(self) -> None:
        if self.leader:
            items = []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            items = [(kind, value) for kind, value in items if kind in ("submit", "cancel", "call")]
            if self._stopping:
                items.append(("shutdown", None))
            broadcast_bytes(pickle.dumps([self._wire(k, v) for k, v in items]))
        else:
            items = pickle.loads(broadcast_bytes(None))
        for kind, value in items:
            if kind == "submit" and value.matcher is None:
                value.matcher = self._matcher(value.options)  # llguidance matchers do not pickle: one per process
            if kind == "shutdown":
                self._shutdown = True
            elif kind == "adapter":
                self._replay(value)
            elif kind == "call" and value[3] is None:  # not replayable: it would make the processes diverge
                value[2].append(RuntimeError("this engine call is not supported on a multi-process engine"))
                value[1].set()
            else:
                self._handle((kind, value))

    @staticmethod
    def _wire(kind, value):
        """What the other processes receive for one of process 0's events: requests without their callback and
        matcher, adapter calls as their op."""
        if kind == "submit":
            return kind, dataclasses.replace(value, callback=None, matcher=None)
        if kind == "call":
            return ("adapter", value[3]) if value[3] is not None else ("skip", None)
        return kind, value

    def _replay(self, op) -> None:
        """Process 0's adapter load / unload, here (see the module docstring)."""
        import jax

        if op[0] == "load":
            _, name, path = op
            try:
                weights, identity = self.lora.read(name, path)
            except (Small4Error, OSError) as e:
                raise RuntimeError(f"process {jax.process_index()}: cannot read adapter {name!r} from {path}, which "
                                   f"process 0 loaded ({e}); the processes would run different weights") from e
            fn = lambda: self._install_adapter(name, path, weights, identity)  # noqa: E731
        else:
            fn = lambda: self._remove_adapter(op[1])  # noqa: E731
        try:
            fn()
        except Small4Error as e:  # refused here as on process 0 (same state, same checks)
            log.info("adapter %s %r refused as on process 0: %s", op[0], op[1], e)

    def _loop(self) -> None:
        """Process 0's engine thread: a step whenever there is work, and at least every IDLE_TICK seconds."""
        while not self._shutdown:
            if not self.has_work() and not self._stopping:
                with self._inbox.not_empty:  # holds the queue's lock: read its deque directly, not qsize()
                    self._inbox.not_empty.wait_for(lambda: len(self._inbox.queue) > 0, timeout=IDLE_TICK)
            self.step()

    def follow(self) -> None:
        """The other processes: run the leader's steps until it shuts down."""
        if self.leader:
            raise RuntimeError("follow() is for processes other than 0; process 0 runs start()/stop()")
        while not self._shutdown:
            self.step()
