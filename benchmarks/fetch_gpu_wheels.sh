#!/usr/bin/env bash
# Download, on a machine with network, the pinned wheels benchmarks/gpu_suite.sh needs beyond the GPU machines' image
# (benchmarks/gpu_image.txt; the device has no network): the serving stack (fastapi, uvicorn, pydantic), mistral-common
# and llguidance, the openai client, jsonschema, and the tokamax peer (0.0.12: later ones need xprof, ~75 MiB). Python
# 3.12 manylinux x86_64 wheels into .wheels/ (gitignored), each without its dependencies: the list below is the
# closure, checked against the image by benchmarks/gpu_wheels.py. Then, on a lent GPU, run the suite with
# carry [".wheels"] (README, "On a lent GPU").
#
#   bash benchmarks/fetch_gpu_wheels.sh          # replaces .wheels/; prints the total (at most 40 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 opentelemetry-api==1.45.3          # infer.serve
  pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
  mistral-common==1.13.1 pydantic-extra-types==2.11.1 pycountry==26.2.16                # tokenizer, chat, images
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  llguidance==1.9.1                                                                     # structured output
  openai==3.63.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1  # serve_load
  tokamax==0.0.12 qwix==0.1.8 einshape==1.0 immutabledict==4.3.1 typeguard==2.13.3 tensorboardx==2.6.5  # peer
  typing-extensions==4.16.0                                                             # an override, below
)
# In the image but carried anyway: pydantic 2.14 needs typing-extensions >= 4.16, and the image's version is unknown
# (typing-extensions only adds names: the newer one serves the image's packages too).
OVERRIDES=(typing-extensions)
PLATFORMS=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35 38 39; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf .wheels.part
mkdir -p .wheels.part
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .wheels.part "${WHEELS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
got="$(ls .wheels.part/*.whl 2>/dev/null | wc -l)"
[ "$got" = "${#WHEELS[@]}" ] || { echo "downloaded $got of ${#WHEELS[@]} wheels" >&2; exit 1; }
python3 benchmarks/gpu_wheels.py check .wheels.part "${OVERRIDES[@]}"
mib="$(du -cm .wheels.part/*.whl | tail -1 | cut -f1)"
[ "$mib" -le 40 ] || { echo "the wheels come to $mib MiB: more than 40 MiB" >&2; exit 1; }
rm -rf .wheels && mv .wheels.part .wheels
echo "$got wheels, $(du -cb .wheels/*.whl | tail -1 | awk '{printf "%.1f", $1 / 2^20}') MiB in .wheels/" \
     "(the working tree that travels: $(git ls-files -z | du -cb --files0-from=- | tail -1 | awk '{printf "%.1f", $1 / 2^20}') MiB)"
