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
import sys
import tempfile


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
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
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
    if os.environ.get("SMALL4_VERBOSE_PLUGINS") or importlib.util.find_spec("jax_cuda12_plugin") is None:
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
    try:
        import jax_plugins.xla_cuda12 as plugin
    except ImportError:
        return
    if getattr(plugin.initialize, "small4_quiet", False):
        return
    real = plugin.initialize

    def initialize():
        import jax

        if not jax.config.jax_platforms:
            return
        with native_stderr_filtered():
            real()

    initialize.small4_quiet = True
    plugin.initialize = initialize
