# rlox: `make demo` runs the demo, `make test` builds everything and runs all tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.rlox-deps
BUILD_STAMP := $(VENV)/.rlox-build
RUST_SRC := $(shell find rust -name '*.rs') Cargo.toml

.PHONY: install test demo bench bench-scale lint format clean

install: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# maturin installs the package's dependencies and the `dev` extra listed in pyproject.toml.
$(DEPS_STAMP): | $(PY)
	$(PY) -m pip install --quiet --upgrade pip "maturin>=1.7,<2"
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(RUST_SRC) pyproject.toml
	source $(VENV)/bin/activate && maturin develop --release --extras dev --quiet
	touch $@

test: install
	cargo test --quiet
	$(PY) -m pytest

demo: install
	$(PY) -m rlox.demo

bench: install
	$(PY) benches/bench_loss.py
	$(PY) benches/bench_data.py
	$(PY) benches/bench_text.py
	$(PY) benches/bench_fit.py
	$(PY) benches/bench_digest.py
	$(PY) benches/bench_blockmask.py
	$(PY) benches/bench_probe.py
	$(PY) benches/bench_train.py --steps 6 --warmup 1 --repeats 1
	$(PY) benches/bench_scale.py --pairs 2000000 --text-pairs 100000 --batches 200

# The full scale run: a 10M-pair (~20 GB) store streamed to disk, then removed.
bench-scale: install
	$(PY) benches/bench_scale.py

lint: install
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

format: install
	cargo fmt
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

clean:
	rm -rf target $(VENV) python/rlox/_rlox*.so
