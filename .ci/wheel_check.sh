#!/usr/bin/env bash
# The wheel as a user gets it: built from this tree, installed non-editable into a
# fresh virtual environment (torch==2.13.0, the CPU build, as the Makefile installs
# it), and run from a folder outside the checkout: --version, check, bench (the
# no-GPU analytic report), export --torch, inspect (the sm_90 compile check), bench --layers (the
# shipped workloads). An editable install would hide a package or data file the
# wheel lacks; this does not. Needs .venv (make install) to build the wheel.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$SECONDS
say() { echo "[wheel check $((SECONDS - started))s] $*"; }

# build from a copy of what the build reads, so no build/ folder is left (or reused) in the checkout
mkdir "$WORK/src"
(cd "$ROOT" && tar --exclude=__pycache__ -cf - pyproject.toml README.md dsl engine examples benchmarks/workloads.toml) \
    | tar -xf - -C "$WORK/src"
"$ROOT/.venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
say "built $(basename "$WORK"/dist/fusenet-*.whl)"

# --no-compile: byte-compiling all of torch would take minutes on two cores; what runs compiles itself
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --no-compile torch==2.13.0 \
    || "$WORK/venv/bin/pip" install -q --no-compile torch --index-url https://download.pytorch.org/whl/cpu
"$WORK/venv/bin/pip" install -q --no-compile "$WORK"/dist/fusenet-*.whl
say "installed into a fresh venv"

mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
unset PYTHONPATH
F="$WORK/venv/bin/fusenet"
"$WORK/venv/bin/python" -c "import engine, sys; sys.exit(0 if engine.__file__.startswith('$WORK/venv/') else 'engine imported from ' + engine.__file__)"
set -x
"$F" --version
"$F" check examples/digits.cnn
"$F" fmt --check examples/digits.cnn
"$F" export examples/digits.cnn --torch digits_model.py
"$WORK/venv/bin/python" -c "import digits_model, torch; assert digits_model.Digits()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)"
"$F" bench examples/digits.cnn --batch 64 > bench.out 2> bench.err || { cat bench.out bench.err; exit 1; }
{ set +x; } 2>/dev/null
cat bench.out
if ! "$WORK/venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    grep -q "timings need a CUDA GPU" bench.err || { echo "bench did not say that timings need a GPU"; cat bench.err; exit 1; }
    grep -q "static sm_90 report" bench.out || { echo "bench printed no static sm_90 report"; exit 1; }
fi
set -x
"$F" inspect examples/digits.cnn --target sm_90 --batch 8
"$F" bench --layers --no-inspect > layers.out 2>&1 || { cat layers.out; exit 1; }
{ set +x; } 2>/dev/null
grep -q "per-layer analytic model" layers.out || { cat layers.out; exit 1; }
say "the installed fusenet works from $PWD"
