#!/usr/bin/env bash
# The GPU verification run in one command, for a GPU machine without network:
#   bash benchmarks/run_gpu.sh [--out DIR] [--quick] [--steps tests,tune,networks,layers]
# Runs the GPU test tier, tunes, benchmarks every workload of
# benchmarks/workloads.toml against PyTorch eager and torch.compile, and writes
# everything to one folder (default benchmarks/results/DATE-DEVICE) to commit.
#
# Python packages missing on the machine (lark, pytest, ...) are installed from
# wheels in .whl/ (fetch them beforehand with benchmarks/fetch_wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for mod in lark pytest matplotlib; do
    if ! "$PY" -c "import $mod" 2>/dev/null; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            echo "run_gpu.sh: installing $mod from .whl/"
            "$PY" -m pip install -q --no-index --find-links .whl "$mod" \
                || echo "run_gpu.sh: could not install $mod from .whl/ (continuing without it)"
        else
            echo "run_gpu.sh: $mod is not installed and .whl/ has no wheels (benchmarks/fetch_wheels.sh fetches them)"
        fi
    fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m engine.perf.bench.suite "$@"
