#!/usr/bin/env bash
# The GPU machines' Python environment, built on this CPU machine, and the GPU suite's dry run in it: what a lent
# GPU's call will meet, checked before one is lent. Python 3.12 (benchmarks/python312.sh) and the packages of the
# image (benchmarks/gpu_image.txt) that the project and the suite use, at the image's versions (jax 0.11.2 with the
# CUDA 13 plugin, flax 0.12.12, numpy 2.5.2, torch 2.11.0, transformers 5.17.0, peft 0.21), nothing the image lacks;
# then `gpu_suite.sh --dry-run` with no network (`unshare -n` where it works): .wheels/ installed offline into a
# target directory exactly as on the device, every step at --small sizes on the CPU.
#
#   bash benchmarks/gpu_replica.sh        # ~15 min the first time (downloads ~4 GB: torch's CUDA libraries too, as
#                                         # the image has them); then the dry run alone (~5-10 min on 2 cores)
#   bash benchmarks/gpu_replica.sh --only serve_load      # arguments go to gpu_suite.sh (--only, --part)
#
# Passes (exit 0) when every step of the dry run exits 0, every carried package imports, and at most 8 files (among
# them GPU_RESULTS.md) are left in its $OUT. Environment: REPLICA_VENV (default .venv-gpu-replica), OUT (default a
# temporary folder, printed), DRY_STEP_LIMIT (per step, default 300 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash benchmarks/python312.sh)"
VENV="${REPLICA_VENV:-.venv-gpu-replica}"
# The image's packages that the project, its tests and the benchmarks import (and what those need from the image).
USED=(jax jaxlib jax-cuda13-plugin jax-cuda13-pjrt flax optax orbax-checkpoint tensorstore numpy ml-dtypes torch
      triton transformers tokenizers huggingface-hub safetensors sentencepiece tiktoken peft accelerate
      opencv-python-headless pillow jinja2 pyyaml tqdm httpx anyio h11 click requests regex absl-py jaxtyping
      wadler-lindig attrs annotated-doc protobuf packaging psutil pytest typing-extensions typer)
PINS="$(python3 benchmarks/gpu_wheels.py pins "${USED[@]}")"

quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }  # (a local pip.conf's noise)
if [ "$(cat "$VENV/.replica" 2>/dev/null)" != "$PY" ]; then
  echo "== building $VENV (Python $("$PY" -c 'import sys; print(sys.version.split()[0])'), the image's pins)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  quiet "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# The pins, every time (nothing to do when they hold; a changed gpu_image.txt moves only what it changed).
# shellcheck disable=SC2086
quiet "$VENV/bin/python" -m pip install -q $PINS
echo "$PY" > "$VENV/.replica"
# What the image has, and nothing it lacks: every distribution of the replica is named by gpu_image.txt (CUDA's
# nvidia-* libraries aside: their names differ between torch builds).
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, sys
sys.path.insert(0, "benchmarks")
import gpu_wheels
have = gpu_wheels.image()
names = {gpu_wheels.canonicalize_name(d.metadata["Name"]) for d in md.distributions()}
extra = sorted(n for n in names - set(have) if not n.startswith("nvidia-") and n not in ("pip", "setuptools", "wheel"))
if extra:
    sys.exit(f"the replica has what the image lacks: {', '.join(extra)} (gpu_image.txt)")
wrong = [f"{n} {md.version(n)} (the image: {have[n]})" for n in sorted(names & set(have))
         if have[n].specifier and not have[n].specifier.contains(md.version(n), prereleases=True)]
if wrong:
    sys.exit("the replica's versions differ from the image's: " + ", ".join(wrong))
print(f"replica: {len(names)} distributions, all in the image; Python {sys.version.split()[0]}")
EOF
[ -n "$(ls .wheels/*.whl 2>/dev/null)" ] || bash benchmarks/fetch_gpu_wheels.sh

OUT="${OUT:-$(mktemp -d /tmp/gpu_replica_out.XXXXXX)}"
mkdir -p "$OUT"
SITE="$(mktemp -d /tmp/gpu_replica_site.XXXXXX)"
# No network but the loopback (a new network namespace starts with `lo` down; serve_load talks to 127.0.0.1).
# shellcheck disable=SC2016
NET=(unshare -n sh -c 'ip link set lo up && exec "$@"' sh)
if ! "${NET[@]}" true 2> /dev/null; then
  NET=()
  echo "== unshare -n does not work here: the dry run keeps the network (pip is offline all the same)" >&2
fi
echo "== gpu_suite.sh --dry-run $* in $VENV (${NET[*]:+no network: unshare -n}); OUT=$OUT" >&2
# shellcheck disable=SC1091
(. "$VENV/bin/activate" && unset PYTHONPATH PYTHON && export PIP_NO_INDEX=1 GPU_SUITE_SITE="$SITE" OUT \
  && "${NET[@]}" bash benchmarks/gpu_suite.sh --dry-run "$@")
rm -rf "$SITE"

RESULTS="$OUT/GPU_RESULTS.md"
files="$(find "$OUT" -type f | wc -l)"
fail=()
[ -f "$RESULTS" ] || fail+=("no $RESULTS")
[ "$files" -le 8 ] || fail+=("$files files in $OUT (at most 8 come back)")
if [ -f "$RESULTS" ]; then
  grep -q "^- carried wheels: [0-9]* installed" "$RESULTS" || fail+=("the carried wheels did not install")
  grep -q "^- \*\*not importable\*\*" "$RESULTS" && fail+=("$(grep "^- \*\*not importable\*\*" "$RESULTS")")
  steps="$(grep -c "^## " "$RESULTS" || true)"
  ok="$(grep -c "^exit 0 in" "$RESULTS" || true)"
  [ "$steps" -gt 0 ] && [ "$steps" = "$ok" ] || fail+=("$ok of $steps steps exited 0: $(grep -E "^\*\*(exit|killed)" "$RESULTS" | tr '\n' ' ')")
fi
echo "== $RESULTS ($files files in $OUT):" >&2
grep -E "^(## |exit |\*\*|- )" "$RESULTS" >&2 || true
if [ "${#fail[@]}" -gt 0 ]; then
  printf 'gpu_replica: FAILED: %s\n' "${fail[@]}" >&2
  exit 1
fi
echo "gpu_replica: passed (every step of the dry run exited 0 in the GPU machines' environment)" >&2
