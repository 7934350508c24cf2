#!/usr/bin/env bash
# The GPU compile checks (tests/test_*gpu_compile*.py, test_aot.py, test_platform.py) under Python 3.12 + jax 0.11.2
# with the CUDA 13 plugin and CUDA 13's ptxas: what the GPU machines have. CI runs them on the project's own jax and
# the cuda12 plugin; this script builds a second environment (.venv-jax0112, about 2 GB: jax + jaxlib + the plugin +
# ptxas, no torch) and compiles the same programs there.
#
#   bash benchmarks/gpu_compile_jax011.sh                        # JAX=0.11.2 CUDA=13, Python 3.12 (python312.sh)
#   JAX=0.12.0 bash benchmarks/gpu_compile_jax011.sh -k aot      # another jax; pytest arguments pass through
#
# Exit status: pytest's. Writes the pytest output to benchmarks/gpu_compile_jax011.log as well.
set -euo pipefail
cd "$(dirname "$0")/.."
JAX="${JAX:-0.11.2}"
CUDA="${CUDA:-13}"
PY="$(bash benchmarks/python312.sh)"
VENV=".venv-jax${JAX//./}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
if ! python -c "import jax, flax, optax, pytest, jax_plugins.xla_cuda$CUDA; assert jax.__version__ == '$JAX'" \
     2>/dev/null; then
  pip install -q --upgrade pip
  # The package's runtime dependencies (no torch / transformers: the compile tests do not use them), pytest and jax at
  # $JAX; then its CUDA plugin and ptxas, as users install them.
  pip install -q "jax==$JAX" "jaxlib==$JAX" "flax>=0.12.0" "optax>=0.2.4" "orbax-checkpoint>=0.11.0" \
    "tensorstore>=0.1.70" numpy pillow sentencepiece safetensors pyyaml "mistral-common>=1.10.0" fastapi uvicorn \
    tqdm "pytest>=8.0"
  for other in 12 13; do  # one CUDA plugin only: two register two compilers for the same platform
    [ "$other" = "$CUDA" ] || pip uninstall -q -y "jax-cuda$other-plugin" "jax-cuda$other-pjrt" 2>/dev/null || true
  done
  python -m small4_jax.aot --install-plugin --cuda "$CUDA"
fi
python -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, 'cuda$CUDA plugin')"
export JAX_PLATFORMS=cpu SMALL4_REQUIRE_GPU_COMPILE=1 JAX_COMPILATION_CACHE_DIR=  # no cache shared with jax 0.10
python -m pytest -q -p no:cacheprovider tests/test_*gpu_compile*.py tests/test_aot.py tests/test_platform.py "$@" 2>&1 \
  | tee benchmarks/gpu_compile_jax011.log
