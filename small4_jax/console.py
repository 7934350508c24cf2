"""What the command-line tools print besides their results: our log lines on stderr, nobody else's.

`setup_logging()` gives the "small4_jax" logger one stderr handler and stops its records from also reaching the
root logger (where absl, installed by Orbax, would print each a second time). Third-party INFO chatter stays off:
the root logger keeps Python's default WARNING level and absl's own logger is set to WARNING; jax's CUDA plugin, where
it is installed but no GPU driver is, loads silently (`quiet_cuda_plugin`, which the package's `__init__` calls).
Importing this module imports no JAX.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable


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


# Lines native libraries write to stderr while jax's CUDA plugin loads on a machine without a GPU driver (the CUDA
# runtime stub's INFO line, and absl's note preceding each such line while absl logging is not initialised).
_PLUGIN_NOISE = ("Could not find cuda drivers on your machine", "All log messages before absl::InitializeLog()")


_stderr_fd = 2  # the real stderr, also while native_stderr_filtered captures fd 2
_CUDA_VERSIONS = ("12", "13")  # jax-cuda{12,13}-plugin (`python -m small4_jax.aot --install-plugin [--cuda 13]`)


def _cuda_driver_present() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def native_stderr_filtered(noise=_PLUGIN_NOISE):
    """Runs the body with file descriptor 2 (what C++ libraries write to) captured; afterwards the captured lines
    are written back to stderr except those containing one of `noise`."""
    global _stderr_fd
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        _stderr_fd = saved
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            _stderr_fd = 2
            os.close(saved)
            f.seek(0)
            kept = [ln for ln in f.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(n in ln for n in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def quiet_cuda_plugin() -> None:
    """Make jax's CUDA plugin (installed for deviceless GPU compiles: `python -m small4_jax.aot --install-plugin`)
    load silently on a machine without a GPU driver. Unquieted, `import jax` prints 6 native "Could not find cuda
    drivers" lines, and the first device query, unless JAX_PLATFORMS is set, a 19-line "Unable to load CUDA"
    traceback before registering nothing. Here, with no driver: `import jax` (still to come; the package's
    `__init__` calls this, so every entry point and the Python API get it) runs with those native lines dropped;
    with JAX_PLATFORMS unset the plugin is not initialised at all (what its failed version check amounts to,
    minus the traceback); with JAX_PLATFORMS set (e.g. "cpu", as deviceless compiles need) it registers as before,
    silently. With a GPU driver present, without the plugin, or with SMALL4_VERBOSE_PLUGINS=1: nothing changes.
    Imports no JAX itself."""
    if os.environ.get("SMALL4_VERBOSE_PLUGINS") or not any(importlib.util.find_spec(f"jax_cuda{v}_plugin")
                                                           for v in _CUDA_VERSIONS):
        return
    if _cuda_driver_present():
        return
    if "jax" in sys.modules:
        _wrap_plugin_initialize()
    elif not any(isinstance(f, _QuietJaxImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietJaxImport())


class _QuietJaxImport(importlib.abc.MetaPathFinder):
    """Finds `jax` for its first import and runs that import with native stderr filtered (jaxlib's GPU modules
    load the CUDA plugin's extensions as jax is imported), then quiets the plugin's initialisation."""

    def find_spec(self, name, path=None, target=None):
        if name != "jax":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("jax")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec(module):
            with native_stderr_filtered():
                exec_module(module)
                _wrap_plugin_initialize()

        spec.loader.exec_module = quiet_exec
        return spec


def _wrap_plugin_initialize() -> None:
    for v in _CUDA_VERSIONS:
        try:
            plugin = importlib.import_module(f"jax_plugins.xla_cuda{v}")
        except ImportError:
            continue
        if not getattr(plugin.initialize, "small4_quiet", False):
            plugin.initialize = _quiet_initialize(plugin.initialize)


def _quiet_initialize(real):
    def initialize():
        import jax

        if not jax.config.jax_platforms:
            return
        with native_stderr_filtered():
            real()

    initialize.small4_quiet = True
    return initialize


# ----------------------------------------------------------------------------------------------------------------------
# How a command-line tool ends: Ctrl-C, and failures in a multi-process job.
_interrupt_note: Callable[[], str] = lambda: "nothing was written"  # noqa: E731
_interrupt_lock = threading.Lock()


def on_interrupt(note: Callable[[], str]) -> None:
    """What Ctrl-C should report as kept, e.g. lambda: "3 results are in out.jsonl; a rerun skips them" (called
    when the interrupt comes, from another thread: keep it cheap)."""
    global _interrupt_note
    _interrupt_note = note


def _interrupted() -> None:
    """Ctrl-C: one line saying what was kept, then exit 130 at once. `os._exit`: no traceback, and no interpreter
    teardown racing XLA's compiler threads (which segfaulted)."""
    if not _interrupt_lock.acquire(blocking=False):
        return
    try:
        note = _interrupt_note()
    except Exception as e:  # noqa: BLE001 - the note is best effort; the exit is not
        note = f"(could not say what was kept: {e})"
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001, S110 - a closed or full stdout must not stop the exit
        pass
    lead = "\n" if sys.stdout.isatty() else ""  # after text streamed to a terminal, start a line
    os.write(_stderr_fd, f"{lead}interrupted: {note}\n".encode())
    os._exit(130)


def _watch_interrupts(fd: int) -> None:
    while True:
        data = os.read(fd, 64)
        if not data or signal.SIGINT in data:
            break
    _interrupted()


def handle_interrupts() -> None:
    """Ctrl-C (SIGINT) ends the process with one line and exit status 130, also while the main thread is inside a
    long native call (an XLA compile), where Python's own handler would not run until the call returns: the signal
    also wakes a watcher thread (`signal.set_wakeup_fd`), which exits. Main thread only."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, lambda *_: _interrupted())
    threading.Thread(target=_watch_interrupts, args=(r,), name="small4-interrupt", daemon=True).start()


def _multi_process() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def cli_main(main: Callable[[], int]) -> int:
    """`sys.exit(cli_main(main))` in a tool's `__main__`: Ctrl-C handled (`handle_interrupts`); in a multi-process
    job (launch/) a failing process exits at once with its status, instead of waiting minutes in jax's shutdown
    barrier for processes that will never get there, so the launcher sees the failure and stops the others."""
    handle_interrupts()
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        if not _multi_process():
            raise
        traceback.print_exc()
        code = 1
    if code and _multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
