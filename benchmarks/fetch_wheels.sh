#!/usr/bin/env bash
# Fetch the wheels benchmarks/run_gpu.sh installs on a GPU machine that has no
# network, into .whl/ (git-ignored; carried with the working tree).
#   bash benchmarks/fetch_wheels.sh [PYTHON_VERSION]   # e.g. 3.12 (default: this python's)
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
mkdir -p .whl
# pure-python: any version
python3 -m pip download -q --no-deps -d .whl lark interegular pytest iniconfig pluggy packaging \
    hypothesis attrs sortedcontainers
# binary (matplotlib and its dependencies) for the target python
python3 -m pip download -q --only-binary=:all: --python-version "$VER" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    matplotlib safetensors || echo "fetch_wheels.sh: no matplotlib wheels for python $VER (charts and checkpoint tests will be skipped)"
ls .whl
