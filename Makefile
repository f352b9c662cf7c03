# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYBIN := $(VENV)/bin/python

.PHONY: setup demo test bench clean

# The pinned, tested set, then this package in editable mode (the mmfree-* console scripts).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q -r requirements.txt
	$(PYBIN) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# Train the tiny MatMul-free LM on the embedded Shakespeare corpus (CPU, a few minutes).
demo: setup
	$(PYBIN) -m mmfree_jax.train --config=experiments/tiny.py --workdir=runs/tiny

# The whole test suite on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS).
test: setup
	$(PYBIN) -m pytest -q -p no:cacheprovider --durations=15 tests

bench: setup
	$(PYBIN) -m mmfree_jax.bench

clean:
	rm -rf runs
