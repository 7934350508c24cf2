#!/usr/bin/env bash
# Download the benchmark peers that are not dependencies (tokamax and what it needs beyond jax, for the GPU machines'
# Python 3.12) into .wheels/, on a machine with network; benchmarks/gpu_suite.sh installs them offline on the device
# (run it with carry [".wheels"]). jax, jaxlib, numpy and flax are already on the device and are not downloaded.
#
#   bash benchmarks/fetch_peer_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
mkdir -p .wheels
for p in tokamax absl-py einshape jaxtyping wadler-lindig pydantic pydantic-core annotated-types typing-inspection \
         qwix tqdm typing_extensions typeguard==2.13.3 immutabledict tensorboardx protobuf; do
  python -m pip download -q --no-deps --python-version "$PYV" --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .wheels "$p"
done
ls .wheels
