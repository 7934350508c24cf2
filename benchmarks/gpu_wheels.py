"""The GPU machines' image (benchmarks/gpu_image.txt) and the wheels carried beyond it (.wheels/), checked together.

    python3 benchmarks/gpu_wheels.py check .wheels      # problems, one a line; exit 1 if any
    python3 benchmarks/gpu_wheels.py pins jax torch      # the image's requirement line of each name (for pip)

`check` holds the carried wheels to what an offline `pip install --no-deps --target` on the device needs: one version
of each project; nothing the image already has (it would shadow the image's copy), except the `OVERRIDES` named in
fetch_gpu_wheels.sh; and every requirement of every wheel (Python 3.12 on Linux, no extras) met by a carried wheel or
named by the image (a carried wheel's version must satisfy it; an image pin that contradicts it is a note).
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare interpreter: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

IMAGE = Path(__file__).resolve().parent / "gpu_image.txt"
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}


def image(path: Path = IMAGE) -> dict[str, Requirement]:
    """Canonical name -> requirement (`name` or `name==version`) of each package the image has (python excluded)."""
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except Exception as e:  # noqa: BLE001 - packaging's error type differs between its versions
            raise ValueError(f"{path}:{i}: {line!r} is not a requirement (`name` or `name==version`): {e}") from None
        if req.name != "python":
            out[canonicalize_name(req.name)] = req
    return out


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonicalize_name(name), version


def wheel_requires(path: Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the device (Python 3.12, Linux x86_64, no extras)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(ENV)]


def check(wheels: Path, overrides: set[str] = frozenset(), image_path: Path = IMAGE) -> tuple[list[str], list[str]]:
    """(problems, notes): problems stop the carry; notes are pins that contradict the image's version, which
    `pip install --no-deps` lets through (mistral-common's numpy < 2.4 against the image's 2.5.2: it works)."""
    have = image(image_path)
    overrides = {canonicalize_name(o) for o in overrides}
    carried: dict[str, str] = {}
    problems, notes = [], []
    files = sorted(wheels.glob("*.whl"))
    if not files:
        return [f"{wheels}: no wheels"], []
    for f in files:
        name, version = wheel_name_version(f)
        if name in carried:
            problems.append(f"{name}: two versions carried ({carried[name]} and {version}); pip stops on two")
        carried[name] = version
        if name in have and name not in overrides:
            problems.append(f"{name} {version}: the image has {have[name]}; carrying it would shadow the image's copy")
    for f in files:
        owner = "{} {}".format(*wheel_name_version(f))
        for req in wheel_requires(f):
            name = canonicalize_name(req.name)
            if name in carried:
                if req.specifier and not req.specifier.contains(carried[name], prereleases=True):
                    problems.append(f"{owner} needs {req}; carried: {name} {carried[name]}")
            elif name in have:
                pinned = [s.version for s in have[name].specifier if s.operator == "=="]
                if pinned and req.specifier and not req.specifier.contains(pinned[0], prereleases=True):
                    notes.append(f"{owner} needs {req}; the image has {name} {pinned[0]} (installed --no-deps)")
            else:
                problems.append(f"{owner} needs {req}: neither carried nor in the image")
    return problems, notes


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check":
        overrides = set(argv[2:])
        problems, notes = check(Path(argv[1]), overrides)
        print("\n".join([*problems, *(f"note: {n}" for n in notes)]
                        or [f"{argv[1]}: every requirement is carried or in the image"]))
        return 1 if problems else 0
    if argv and argv[0] == "pins":
        have = image()
        missing = [n for n in argv[1:] if canonicalize_name(n) not in have]
        if missing:
            print(f"not in {IMAGE.name}: {', '.join(missing)}", file=sys.stderr)
            return 1
        print("\n".join(str(have[canonicalize_name(n)]) for n in argv[1:]))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
