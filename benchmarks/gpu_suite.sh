#!/usr/bin/env bash
# The GPU suite for a lent GPU (H100 / H200): about 15 minutes of device time in all, calls of at most 10 minutes, at
# most 8 files back from $OUT, no network there. Steps in order of value, each with its own time limit:
#   part 1: kernel_tests (the Pallas kernels compiled on the GPU, moe_impl auto's self-check), moe_gmm (the MoE
#           kernel vs ragged_dot / gshard / dense / torch grouped_mm), decode (vs the bandwidth floor and
#           transformers), train_step (the LoRA step vs transformers + peft);
#   part 2: quant_decode (fp8 / int8 / int4 decode vs bf16 and tokamax), serve_load (the HTTP server under load), then
#           the comparisons that decide defaults: dense_impl (decode with dense_impl gmm; compare with part 1's
#           decode rows at context 1024), w8a8 (fp8 experts weight-only vs W8A8), canonical_mask (the host cost of
#           canonical structured-output masks per step, with the real Tekken vocabulary).
# Each part's step limits add up to under 480 s, and a step that would end after --budget seconds (default 560) is
# shortened or skipped, so a call ends inside the device's 600 s.
#
#   bash benchmarks/fetch_gpu_wheels.sh                          # here, once: .wheels/ (the image lacks them)
#   bash benchmarks/gpu_suite.sh --part 1                        # on the device, carry [".wheels"]; then --part 2
#   bash benchmarks/gpu_suite.sh --dry-run                       # every step at --small sizes on the CPU
#                                                                # (benchmarks/gpu_replica.sh runs it)
# Options: --part 1|2|all (default all), --dry-run, --only NAME[,NAME...], --budget SECONDS (0: none),
#          --steps FILE (step definitions instead of the built-in ones: the suite's own tests use it).
# Environment: PYTHON (default python3), OUT (where results go; default benchmarks/results/gpu-<time>/),
#          GPU_SUITE_SITE (where the wheels are installed; default /tmp/gpu_suite_site), GPU_SUITE_WHEELS (default
#          .wheels), DRY_STEP_LIMIT (default 480: a shared 2-core machine can be slow).
#
# What it writes, as soon as each step ends: $OUT/GPU_RESULTS.md (the machine, the versions, then each step under its
# own heading: the command, its table, its exit status and time) and $OUT/gpu_logs.tar.gz (every step's stdout,
# stderr and files). Nothing else lands in $OUT (the benchmarks' own $OUT files go to the archive), so a call killed
# mid-step still returns both. It never touches benchmarks/RESULTS.md: copy GPU_RESULTS.md to
# benchmarks/results/<date>-<gpu>-part<N>.md and merge what it decides by hand.
{  # the whole body in one compound command: bash reads it all before running (a file edited meanwhile is harmless)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
PART=all DRY=0 ONLY="" BUDGET="" STEPS_FILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --part) PART="${2:-}"; shift 2 || shift ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY="${2:-}"; shift 2 || shift ;;
    --budget) BUDGET="${2:-}"; shift 2 || shift ;;
    --steps) STEPS_FILE="${2:-}"; shift 2 || shift ;;
    -h|--help) sed -n '2,/^{  #/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$PART" in 1|2|all) ;; *) echo "gpu_suite.sh: --part takes 1, 2 or all, not '$PART'" >&2; exit 2 ;; esac
[[ "${BUDGET:-0}" =~ ^[0-9]+$ ]] || { echo "gpu_suite.sh: --budget takes seconds, not '$BUDGET'" >&2; exit 2; }
[ -n "$BUDGET" ] || { if [ "$DRY" = 1 ]; then BUDGET=0; else BUDGET=560; fi; }
DRY_STEP_LIMIT="${DRY_STEP_LIMIT:-480}"

DEST="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%MZ)}"
mkdir -p "$DEST" && DEST="$(cd "$DEST" && pwd)"
RESULTS="$DEST/GPU_RESULTS.md"
ARCHIVE="$DEST/gpu_logs.tar.gz"
WORK="$(mktemp -d)"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
SITE="${GPU_SUITE_SITE:-/tmp/gpu_suite_site}"
WHEELS="${GPU_SUITE_WHEELS:-.wheels}"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the torch peers share the GPU
if [ "$DRY" = 1 ]; then export JAX_PLATFORMS=cpu; TESTS_PLATFORMS=cpu; else TESTS_PLATFORMS=cuda,cpu; fi

archive() {  # every log so far, replaced whole (a partial archive never stands under the final name)
  tar czf "$ARCHIVE.part" -C "$WORK" logs 2> /dev/null && mv -f "$ARCHIVE.part" "$ARCHIVE"
}

# The wheels the image lacks (benchmarks/fetch_gpu_wheels.sh), installed offline into $SITE, once per machine.
setup() {
  local got=0
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    local sum; sum="$(cd "$WHEELS" && ls -- *.whl | sort | cksum)"
    if [ "$(cat "$SITE/.wheels.sum" 2>/dev/null)" != "$sum" ]; then
      rm -rf "$SITE"
      timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl > "$LOGS/install.txt" 2>&1 && echo "$sum" > "$SITE/.wheels.sum"
    fi
    [ -f "$SITE/.wheels.sum" ] && got=1
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  local gpu; gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  {
    echo "# GPU suite results"
    echo
    echo "- command: \`bash benchmarks/gpu_suite.sh$([ "$DRY" = 1 ] && echo " --dry-run") --part $PART${ONLY:+ --only $ONLY}\`;" \
         "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- GPU: ${gpu:-none (no nvidia-smi)}"
    if [ "$got" = 1 ]; then
      echo "- carried wheels: $(ls "$WHEELS"/*.whl | wc -l) installed into $SITE (--no-deps)"
    elif ls "$WHEELS"/*.whl > /dev/null 2>&1; then
      echo "- carried wheels: **did not install**: $(tail -n 1 "$LOGS/install.txt" 2>/dev/null)"
    else
      echo "- carried wheels: none ($WHEELS/ is empty: run benchmarks/fetch_gpu_wheels.sh here and carry \".wheels\")"
    fi
  } > "$RESULTS"
  [ "${GPU_SUITE_PROBE:-1}" = 1 ] || { archive; return 0; }  # (the suite's tests skip the versions after one run)
  timeout 120 "$PY" - >> "$RESULTS" 2> "$LOGS/versions.txt" <<'EOF'
import importlib, importlib.metadata as md, sys
print(f"- python {sys.version.split()[0]} ({sys.executable})")
try:
    import jax
    d = jax.devices()[0]
    print(f"- jax {jax.__version__}, default backend {jax.default_backend()}, {d.device_kind}")
except Exception as e:  # noqa: BLE001
    print(f"- jax: {type(e).__name__}: {e}")
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"
print("- image: " + ", ".join(f"{d} {version(d)}" for d in ("jaxlib", "jax-cuda13-plugin", "flax", "numpy", "torch",
                                                             "transformers", "peft")))
found, broken = [], []  # the carried packages are imported: a wheel that installs but does not import shows here
for dist, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("pydantic", "pydantic"),
                     ("mistral-common", "mistral_common"), ("llguidance", "llguidance"), ("openai", "openai"),
                     ("jsonschema", "jsonschema"), ("tokamax", "tokamax")):
    try:
        importlib.import_module(module)
        found.append(f"{dist} {version(dist)}")
    except Exception as e:  # noqa: BLE001 - a broken package is reported, not fatal
        broken.append(f"{dist} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
print("- carried, importable: " + (", ".join(found) or "none"))
if broken:
    print("- **not importable**: " + ", ".join(broken))
EOF
  archive
}

N=0
step() {  # step NAME LIMIT CMD...: the heading, then the command (it may append its table), post_NAME, the status
  local name="$1" limit="$2"; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  N=$((N + 1))
  [ "$DRY" = 1 ] && limit="$DRY_STEP_LIMIT"
  local shown="$*"
  shown="${shown//$LOGS\//}" && shown="${shown//$DEST/\$OUT}"  # (the archive's paths; $OUT)
  printf '\n## %s. %s\n\n`%s`\n\n' "$N" "$name" "$shown" >> "$RESULTS"
  if [ "$BUDGET" -gt 0 ] && [ $((BUDGET - SECONDS)) -lt "$limit" ]; then
    local left=$((BUDGET - SECONDS - 5))
    if [ "$left" -lt 30 ]; then
      echo "**skipped**: $((BUDGET - SECONDS)) s of the call's $BUDGET s budget left (the step's limit: $limit s)" \
        >> "$RESULTS"
      return 0
    fi
    echo "(limit cut from $limit s to $left s: the call's $BUDGET s budget)" >> "$RESULTS"
    limit="$left"
  fi
  mkdir -p "$LOGS/$name"
  echo "== $name (limit $limit s): $*" >&2
  local t0=$SECONDS rc
  OUT="$LOGS/$name" STEP_OUT="$LOGS/$name" timeout -k 10 "$limit" "$@" > "$LOGS/$name/stdout.txt" \
    2> "$LOGS/$name/stderr.txt"
  rc=$?
  local took=$((SECONDS - t0))
  if declare -F "post_$name" > /dev/null; then "post_$name" "$LOGS/$name" >> "$RESULTS" 2>> "$LOGS/$name/stderr.txt"; fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo -e "\n**killed at its $limit s limit** (after $took s): the rows above are what it measured before" >> "$RESULTS"
  elif [ "$rc" = 0 ]; then
    echo -e "\nexit 0 in $took s" >> "$RESULTS"
  else
    { echo -e "\n**exit $rc** in $took s; the end of its stdout and stderr:\n"; echo '```'
      grep -v "^\s*$" "$LOGS/$name/stdout.txt" | tail -n 3 | cut -c1-300
      grep -v "^\s*$" "$LOGS/$name/stderr.txt" | tail -n 8 | cut -c1-300; echo '```'; } >> "$RESULTS"
  fi
  tail -n 3 "$LOGS/$name/stderr.txt" >&2
  archive
  return 0
}

code_block() { echo '```'; cat; echo '```'; }

# --- the steps' tables (each gets the step's log folder) ---
post_kernel_tests() {
  grep -E "passed|failed|error|skipped" "$1/stdout.txt" | tail -n 3 | code_block
  timeout 120 "$PY" - 2>&1 <<'EOF' | tail -n 2
import warnings
from small4_jax import platform
from small4_jax.nn import moe
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    impl = moe.resolve_impl("auto", platform.runnable_gpu())
print(f"\nmoe_impl auto resolves to **{impl}** here" + (f" (warning: {w[0].message})" if w else ""))
EOF
}

post_moe_gmm() {
  "$PY" - "$1/moe_gmm.json" "$1/stdout.txt" <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except Exception as e:  # killed before it wrote its JSON: its printed lines instead
    print(f"(no JSON: {type(e).__name__}; the lines it printed:)\n```")
    print("".join(line for line in open(sys.argv[2]) if not line.startswith("#")), end="")
    print("```"); sys.exit()
print("| level | proj | pass | tokens | routing | pallas ms | peers (peer time / pallas time) |")
print("|---|---|---|---|---|---|---|")
for r in data["results"]:
    ours = r["impls"].get("pallas", {})
    head = f"| {r['level']} | {r['proj']} | {r['pass_']} | {r['tokens']} | {r['routing']} |"
    if "time_s" not in ours:
        print(f"{head} {ours.get('error', 'not run')} | |")
        continue
    peers = ", ".join(f"{k} {v['time_s'] / ours['time_s']:.2f}x" if "time_s" in v
                      else f"{k} did not run ({str(v.get('error', '?')).splitlines()[0][:60]})"
                      for k, v in r["impls"].items() if k != "pallas")
    print(f"{head} {ours['time_s'] * 1e3:.3f} | {peers} |")
EOF
}

post_quant_decode() {
  "$PY" - "$1/stdout.txt" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
print("| format | batch | context | tok/s | step ms | % of floor | weights GiB | tokamax ragged_dot (one gate_up) |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if "tokamax_us" in r:
        peer = (f"ours {r['ours_us']:.0f} us, {r['peer']} {r['tokamax_us']:.0f} us (ours / tokamax "
                f"{r['tokamax_vs_ours']:.2f}), max rel diff {r['tokamax_max_rel_diff']:.1e}")
    else:
        peer = f"did not run: {r['tokamax']}" if "tokamax" in r else r.get("peer", "-")
    print(f"| {r['format']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
          f"{100 * r['fraction_of_floor']:.0f}% | {r['weight_gib']:.2f} | {peer} |")
EOF
}
post_serve_load() { tail -n 4 "$1/stdout.txt" | code_block; }
post_w8a8() { grep -E "^A .* fwd .* (pallas|pallas_fp8|pallas_w8a8) +[0-9.]+ms" "$1/stdout.txt" | code_block; }
post_canonical_mask() {
  "$PY" - "$1/stdout.txt" <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except Exception as e:  # killed before it printed its report
    print(f"(no report: {type(e).__name__})"); sys.exit()
print(f"vocabulary {report.pop('vocab_size')}, canonical tables built in {report.pop('canon_build_s')} s\n")
print("| case | tokens | us per step (median) | us per row-token: median / mean / max | CPU us per row-token (mean) |")
print("|---|---|---|---|---|")
for case, r in report.items():
    if "us_per_step" in r:
        print(f"| {case} | {r['tokens']} | {r['us_per_step']} | {r['us_per_row_token']} / "
              f"{r['us_per_row_token_mean']} / {r['us_per_row_token_max']} | {r['cpu_us_per_row_token_mean']} |")
    else:
        print(f"| {case} | {r.get('tokens', '')} | | | {r.get('cpu_us_per_token_mean', '')} "
              f"(median {r.get('cpu_us_per_token_median', '')}; fallbacks {r.get('fallbacks', '')}) |")
EOF
}

# --- the steps ---
if [ "$DRY" = 1 ]; then S=--small; else S=""; fi
small() { [ "$DRY" = 1 ] && echo "$1" || echo "$2"; }  # small() DRY_ARGS GPU_ARGS

builtin_steps() {
  if [ "$PART" != 2 ]; then
    step kernel_tests 90 env JAX_PLATFORMS="$TESTS_PLATFORMS" "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_gmm_kernel.py tests/test_platform.py
    # shellcheck disable=SC2046
    step moe_gmm 110 "$PY" benchmarks/moe_gmm.py $S $(small "--routings uniform --tokens 8" \
      "--tokens 1 64 4096 16384 --routings uniform skewed --iters 10") --no-quant-peers --json "$LOGS/moe_gmm/moe_gmm.json"
    # shellcheck disable=SC2046
    step decode 100 "$PY" benchmarks/decode.py $S $(small "--batches 1,4 --contexts 32 --iters 2" \
      "--layers 4 --batches 1,64 --contexts 1024,8192 --iters 10") --markdown "$RESULTS"
    # shellcheck disable=SC2046
    step train_step 100 "$PY" benchmarks/train_step.py $S $(small "" "--layers 4 --seq 4096 --iters 5") \
      --markdown "$RESULTS"
  fi
  if [ "$PART" != 1 ]; then
    # shellcheck disable=SC2046
    step quant_decode 110 "$PY" benchmarks/quant_decode.py $S $(small "--batches 1 --peer-on-cpu" \
      "--layers 4 --batches 1,64 --iters 10")
    # shellcheck disable=SC2046
    step serve_load 60 "$PY" benchmarks/serve_load.py $S $(small "" "--requests 64 --concurrency 16")
    # shellcheck disable=SC2046
    step dense_impl 70 "$PY" benchmarks/decode.py $S $(small "--batches 1,4 --contexts 32 --iters 2" \
      "--layers 4 --batches 1,64 --contexts 1024 --iters 10") --no-peer --dense-impl gmm --markdown "$RESULTS"
    # shellcheck disable=SC2046
    step w8a8 60 "$PY" benchmarks/moe_gmm.py $S --levels A --routings uniform $(small "--tokens 8 --quant-peers" \
      "--tokens 64 4096 --iters 10")
    # shellcheck disable=SC2046
    step canonical_mask 40 "$PY" benchmarks/structured_mask.py $(small "--rows 1 --repeats 1 --walk 20" \
      "--rows 1 16 --repeats 2 --walk 100")
  fi
}

setup
if [ -n "$STEPS_FILE" ]; then
  # shellcheck disable=SC1090
  . "$STEPS_FILE"
else
  builtin_steps
fi
[ "$N" -gt 0 ] || echo -e "\nno step ran (--only '$ONLY' names none of this part's steps)" >> "$RESULTS"
archive
echo "wrote $RESULTS and $ARCHIVE" >&2
exit 0
}
