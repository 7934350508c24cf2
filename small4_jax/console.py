"""What the command-line tools print besides their results: our log lines on stderr, nobody else's.

`setup_logging()` gives the "small4_jax" logger one stderr handler and stops its records from also reaching the
root logger (where absl, installed by Orbax, would print each a second time). Third-party INFO chatter stays off:
the root logger keeps Python's default WARNING level and absl's own logger is set to WARNING. Importing this module
imports no JAX.
"""

from __future__ import annotations

import logging
import sys


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced, e.g. under pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    log = logging.getLogger("small4_jax")
    if not any(isinstance(h, StderrHandler) for h in log.handlers):
        log.addHandler(StderrHandler())
    log.setLevel(level)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
    return log
