# Quick start targets. Each installs what it needs into .venv, then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/fusenet: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch (a plain `torch` requirement can pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e '.[test,mnist]'
	touch $(BIN)/fusenet

install: $(BIN)/fusenet

demo: install
	$(BIN)/fusenet train examples/digits.cnn --epochs 6

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

# the built wheel, installed non-editable into a fresh venv, run from outside the checkout (CI runs it)
wheel-check: install
	bash .ci/wheel_check.sh

# the static reports of every example without a GPU (benchmarks/static/): the analytic model and
# sm_90 report of `fusenet bench`, and the SASS-read step estimate of `fusenet inspect --perf`
static: install
	for f in examples/*.cnn; do n=$$(basename $$f .cnn); \
	  $(BIN)/fusenet bench $$f --precision bf16 > benchmarks/static/$$n.txt && \
	  $(BIN)/fusenet inspect $$f --perf > benchmarks/static/$$n.perf.txt || exit 1; done

.PHONY: install demo test wheel-check static
