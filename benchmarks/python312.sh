#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter (the GPU machines' version), for the scripts that build a 3.12
# environment on a CPU machine (gpu_compile_jax011.sh, gpu_replica.sh). $PYTHON if set (it must be 3.12), else pyenv's
# installed 3.12.x (its shim fails unless 3.12 is selected, so the binary is used), python3.12 on PATH and uv's
# managed Pythons. Exit 2 with what to do when there is none.
#
#   PY="$(bash benchmarks/python312.sh)" || exit
set -uo pipefail
ok() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  ok "$PYTHON" && { echo "$PYTHON"; exit 0; }
  echo "PYTHON=$PYTHON is not a Python 3.12" >&2; exit 2
fi
cands=()
if command -v pyenv > /dev/null; then
  v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1)"
  [ -n "$v" ] && cands+=("$(pyenv root)/versions/$v/bin/python")
fi
cands+=("$(command -v python3.12 2>/dev/null)")
command -v uv > /dev/null && cands+=("$(uv python find 3.12 2>/dev/null)")
for c in "${cands[@]}"; do
  if ok "$c"; then echo "$c"; exit 0; fi
done
echo "no Python 3.12 found (pyenv, python3.12 on PATH, uv): install one (\`pyenv install 3.12\`, or" \
     "\`uv python install 3.12\` where uv can download) or set PYTHON=/path/to/python3.12" >&2
exit 2
