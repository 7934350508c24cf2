"""Serving from several processes (multi-host): the engine runs in lockstep on every process.

JAX's multi-controller runtime needs every process to run the same jitted step with the same inputs. The engine's
scheduling is deterministic given the requests and cancellations it has seen, so process 0 (which owns the HTTP
server and the request queue) broadcasts, at the start of every step, the events that arrived since the last one;
the other processes apply the same events and run the same step. Process 0 ticks at least every `IDLE_TICK` seconds
while idle, so the followers, blocked in the broadcast, never wait long in a collective. `stop()` on process 0 sends
a shutdown event that ends `follow()` on the others.
"""

from __future__ import annotations

import dataclasses
import pickle
import queue

import numpy as np

from infer.engine import Engine

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
            items = [(kind, value) for kind, value in items if kind in ("submit", "cancel")]
            if self._stopping:
                items.append(("shutdown", None))
            wire = [(k, dataclasses.replace(v, callback=None, matcher=None) if k == "submit" else v) for k, v in items]
            broadcast_bytes(pickle.dumps(wire))
        else:
            items = pickle.loads(broadcast_bytes(None))
        for kind, value in items:
            if kind == "submit" and value.matcher is None:
                value.matcher = self._matcher(value.options)  # llguidance matchers do not pickle: one per process
            if kind == "shutdown":
                self._shutdown = True
            else:
                self._handle((kind, value))

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
