#!/usr/bin/env bash
# Download the wheels the GPU suite needs but a bare GPU machine lacks (it has no network)
# into the git-ignored .whl/ folder, for Python 3.12 on x86-64 Linux; scripts/gpu_suite.sh
# installs them there. Run here (with network), then carry .whl with the suite's call.
#
#   bash scripts/fetch_gpu_wheels.sh            # torch-uncertainty, for the Packed-Ensembles baseline
#
# torch-uncertainty's own needs (einops, lightning, rich, scipy, torchmetrics, pyyaml) are
# part of the GPU image (see bench/README.md); only the package itself travels (~0.5 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "torch-uncertainty==${TORCH_UNCERTAINTY_VERSION:-0.13.0}"
ls -la .whl
