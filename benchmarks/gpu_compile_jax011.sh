#!/usr/bin/env bash
# The GPU compile checks (tests/test_*gpu_compile*.py, test_aot.py, test_platform.py) under Python 3.12 + jax 0.11.2:
# what the GPU machines run. CI runs them on the project's own jax; this script builds a second environment
# (.venv-jax011, about 2 GB: jax + jaxlib + the CUDA plugin + ptxas, no torch) and compiles the same programs there.
#
#   bash benchmarks/gpu_compile_jax011.sh                # JAX=0.11.2 PYTHON=python3.12 by default
#   JAX=0.12.0 bash benchmarks/gpu_compile_jax011.sh     # another jax
#
# Exit status: pytest's. Writes the pytest summary to benchmarks/gpu_compile_jax011.log as well.
set -euo pipefail
cd "$(dirname "$0")/.."
JAX="${JAX:-0.11.2}"
PY="${PYTHON:-}"
if [ -z "$PY" ] && command -v pyenv >/dev/null; then  # pyenv's shim fails unless 3.12 is selected: use the binary
  v="$(pyenv versions --bare | grep '^3\.12' | tail -1 || true)"
  [ -n "$v" ] && PY="$(pyenv root)/versions/$v/bin/python"
fi
[ -n "$PY" ] || PY="$(command -v python3.12 || true)"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { echo "no python3.12 (set PYTHON=)" >&2; exit 2; }
VENV=".venv-jax${JAX//./}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import jax, flax, optax, pytest, jax_plugins.xla_cuda12; assert jax.__version__ == '$JAX'" 2>/dev/null; then
pip install -q --upgrade pip
# The package's runtime dependencies (no torch / transformers: the compile tests do not use them), pytest, and jax at
# $JAX with its CUDA plugin and ptxas (what `python -m small4_jax.aot --install-plugin` installs for that jaxlib).
pip install -q "jax==$JAX" "jaxlib==$JAX" "jax-cuda12-plugin==$JAX" "jax-cuda12-pjrt==$JAX" "nvidia-cuda-nvcc-cu12<13" \
  "flax>=0.12.0" "optax>=0.2.4" "orbax-checkpoint>=0.11.0" "tensorstore>=0.1.70" numpy pillow sentencepiece \
  safetensors pyyaml "mistral-common>=1.10.0" fastapi uvicorn tqdm "pytest>=8.0"
fi
python -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__)"
export JAX_PLATFORMS=cpu SMALL4_REQUIRE_GPU_COMPILE=1 JAX_COMPILATION_CACHE_DIR=  # no cache shared with jax 0.10
set -o pipefail
python -m pytest -q -p no:cacheprovider tests/test_*gpu_compile*.py tests/test_aot.py tests/test_platform.py "$@" 2>&1 \
  | tee benchmarks/gpu_compile_jax011.log
