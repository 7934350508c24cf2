#!/usr/bin/env bash
# One command for a lent GPU (H100 / H200; < 8 minutes): the kernel tests compiled for the GPU (not interpreted), then
# the benchmarks at bounded sizes, and benchmarks/RESULTS.md with the GPU, jax version, commands, figures and the
# ratios of our programs to the peers measured in the same run.
#
#   bash benchmarks/gpu_suite.sh            # writes benchmarks/RESULTS.md (and $OUT/ copies when $OUT is set)
#
# Each step has its own time limit and a failing step is recorded, not fatal: the report says what ran.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
RESULTS="benchmarks/RESULTS.md"
WORK="$(mktemp -d)"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the torch peers share the GPU

gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
jaxv="$($PY -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices()[0].device_kind)' 2>&1 | tail -1)"
{
  echo "# GPU results"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo "- GPU: ${gpu:-unknown (no nvidia-smi)}"
  echo "- jax: $jaxv"
  echo "- command: \`bash benchmarks/gpu_suite.sh\`"
} > "$RESULTS"

step() {  # step NAME SECONDS CMD...: run with a limit, record the command, the exit status and the time
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name: $*" >&2
  timeout "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  local rc=$?
  tail -n 30 "$WORK/$name.err" >&2
  { echo; echo "## $name"; echo; echo "\`$*\` -> exit $rc in $((SECONDS - t0)) s"; } >> "$RESULTS"
  return $rc
}

# 0. Peers that are not dependencies, from wheels downloaded beforehand (benchmarks/fetch_peer_wheels.sh; the device
#    has no network: pass carry [".wheels"]). Nothing is replaced that is already installed.
if ls .wheels/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --find-links .wheels tokamax > "$WORK/peers.out" 2>&1 \
    && echo "- peers: $($PY -c 'import tokamax; print("tokamax", tokamax.__version__)' 2>&1 | tail -1)" >> "$RESULTS" \
    || { echo "- peers: tokamax did not install: $(tail -n 1 "$WORK/peers.out")" >> "$RESULTS"; }
fi

# 1. The kernel tests on the GPU: arrays live on the GPU, so the Pallas kernels compile (platform.platform_of),
#    plus the first-use self-check of moe_impl auto.
JAX_PLATFORMS=cuda,cpu step kernel-tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_gmm_kernel.py \
  tests/test_platform.py
{ echo; echo '```'; tail -n 5 "$WORK/kernel-tests.out"; echo '```'; } >> "$RESULTS"
$PY - >> "$RESULTS" 2>&1 <<'EOF'
import warnings
from small4_jax import moe, platform
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    impl = moe.resolve_impl("auto", platform.runnable_gpu())
print(f"\nmoe_impl auto on this GPU resolves to **{impl}**" + (f" (warning: {w[0].message})" if w else ""))
EOF

# 2. The grouped matmul against its peers (ragged_dot, gshard, dense, torch grouped_mm), Small 4 shapes.
step moe_gmm 180 $PY benchmarks/moe_gmm.py --tokens 1 64 4096 16384 --routings uniform skewed --iters 10 \
  --no-quant-peers --json "$WORK/moe_gmm.json"
$PY - "$WORK/moe_gmm.json" >> "$RESULTS" <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except Exception as e:  # the step failed before writing
    print(f"\n(no moe_gmm results: {e})"); sys.exit()
print("\n| level | proj | pass | tokens | routing | pallas ms | ratio to peers (peer time / pallas time) |")
print("|---|---|---|---|---|---|---|")
for r in data["results"]:
    ours = r["impls"].get("pallas", {})
    if "time_s" not in ours:
        print(f"| {r['level']} | {r['proj']} | {r['pass_']} | {r['tokens']} | {r['routing']} | "
              f"{ours.get('error', 'not run')} | |"); continue
    peers = ", ".join(f"{k} {v['time_s'] / ours['time_s']:.2f}x" if "time_s" in v else f"{k} failed"
                      for k, v in r["impls"].items() if k != "pallas")
    print(f"| {r['level']} | {r['proj']} | {r['pass_']} | {r['tokens']} | {r['routing']} | "
          f"{ours['time_s'] * 1e3:.3f} | {peers} |")
EOF

# 3. Decode throughput on the paged cache (8-layer full-width proxy) against transformers.
step decode 120 $PY benchmarks/decode.py --layers 4 --batches 1,64 --contexts 1024,8192 --iters 10 \
  --markdown "$RESULTS"

# 3b. The same decode step with the dense projections read in place by the grouped-matmul kernel (dense_impl gmm;
#     benchmarks/RESULTS.md "Dense weights under the layer scan"): compare its rows with 3's before trusting "auto".
step decode_dense_gmm 90 $PY benchmarks/decode.py --layers 4 --batches 1,64 --contexts 1024 --iters 10 --no-peer \
  --dense-impl gmm --markdown "$RESULTS"

# 4. The LoRA train step (4-layer proxy) against transformers + peft.
step train_step 150 $PY benchmarks/train_step.py --layers 4 --seq 4096 --iters 5 --markdown "$RESULTS"

# 5. Quantised decode (fp8 / int8 / int4 vs bf16, 4-layer full-width proxy) against the bandwidth floor, and tokamax's
#    quantised ragged_dot on the same weights.
step quant_decode 180 $PY benchmarks/quant_decode.py --layers 4 --batches 1,64 --iters 10
{ echo; echo '```'; cat "$WORK/quant_decode.out"; echo '```'; } >> "$RESULTS"

# 5b. fp8 experts: weight-only (tiles dequantised in the kernel) against W8A8 (fp8 x fp8, static activation scales),
#     decode and prefill sizes; whether W8A8 should be the default for FP8 checkpoints (README "W8A8").
step moe_gmm_quant 90 $PY benchmarks/moe_gmm.py --levels A --tokens 64 4096 --routings uniform --iters 10
{ echo; echo '```'; grep -E "^A .* fwd .* (pallas|pallas_fp8|pallas_w8a8) +[0-9.]+ms" "$WORK/moe_gmm_quant.out"; echo '```'; } \
  >> "$RESULTS"

# 6. The HTTP server under load (tiny model, in-process).
step serve_load 60 $PY benchmarks/serve_load.py --requests 64 --concurrency 16
{ echo; echo '```'; tail -n 3 "$WORK/serve_load.out"; echo '```'; } >> "$RESULTS"

if [ -n "${OUT:-}" ]; then cp "$RESULTS" "$WORK"/*.out "$WORK"/*.err "$WORK"/*.json "$OUT"/ 2>/dev/null; fi
echo "wrote $RESULTS" >&2
