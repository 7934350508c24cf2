"""Which platform a program runs on, from the devices it is placed on (its mesh or its arrays).

Every platform-dependent choice (`moe_impl: auto`, Pallas interpret mode, the real `ragged_all_to_all` or its CPU
stand-in, tilings) asks `platform_of(...)` about the arrays or mesh at hand instead of `jax.default_backend()`. The
two differ when a CPU host lowers a program for GPU devices (`small4_jax.tools.aot`, deviceless compilation): the program
must then be the one a GPU would run, with the Triton kernel compiled rather than interpreted.

Resolution order: the first argument that names devices (a Mesh, an AbstractMesh carrying its abstract device, a
Device, a Sharding, a concrete array, or a traced array whose sharding names a mesh); then the context mesh
(`jax.set_mesh`); then the default device (`jax.default_device`); then `jax.default_backend()`.
"""

from __future__ import annotations

import jax

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _normal(platform: str | None) -> str | None:
    if platform is None:
        return None
    return "gpu" if platform.lower() in GPU_PLATFORMS else platform.lower()


def _platform_of_one(x) -> str | None:
    """The platform `x` names, or None when it names no device (a plain value, an array without a mesh)."""
    if x is None or isinstance(x, (str, int, float, bool)):
        return None
    if isinstance(x, jax.Device):
        return x.platform
    if isinstance(x, jax.sharding.Mesh):
        return x.devices.flat[0].platform if x.devices.size else None
    if isinstance(x, jax.sharding.AbstractMesh):
        device = getattr(x, "abstract_device", None)
        return getattr(device, "platform", None)
    if isinstance(x, jax.sharding.Sharding):
        mesh = getattr(x, "mesh", None)
        if mesh is not None:
            return _platform_of_one(mesh)
        try:
            return next(iter(x.device_set)).platform
        except Exception:  # noqa: BLE001 - abstract shardings have no device set
            return None
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        try:
            return next(iter(x.sharding.device_set)).platform
        except Exception:  # noqa: BLE001 - a deleted or abstract array
            return None
    sharding = getattr(getattr(x, "aval", None), "sharding", None) or getattr(x, "sharding", None)
    if sharding is None:
        try:
            sharding = getattr(jax.typeof(x), "sharding", None)
        except TypeError:
            return None
    return None if sharding is None else _platform_of_one(sharding)


def platform_of(*placed) -> str:
    """"gpu", "cpu" or "tpu": where a program over `placed` (arrays, meshes, devices, shardings) runs.

    Arguments are tried in order; the first that names a device decides. Then the context mesh, the default device
    and, last, the default backend (module docstring).
    """
    for x in placed:
        p = _normal(_platform_of_one(x))
        if p:
            return p
    p = _normal(_platform_of_one(jax.sharding.get_abstract_mesh()))
    if p:
        return p
    default = jax.config.jax_default_device
    if default is not None:
        p = _normal(default if isinstance(default, str) else getattr(default, "platform", None))
        if p:
            return p
    return _normal(jax.default_backend())


def on_gpu(*placed) -> bool:
    """Whether a program over `placed` runs on GPUs (`platform_of`)."""
    return platform_of(*placed) == "gpu"


def runnable_gpu():
    """A GPU this process can run programs on (not a compile-only one), or None."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:  # no GPU backend: a CPU host (deviceless compiles use compile-only devices)
        return None
    return devices[0] if devices else None
