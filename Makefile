# `make demo` and `make test` do all set-up on a fresh machine (cached in .venv/ build/ install/).
SHELL := /bin/bash
ENV := source tools/env.sh &&
# Run from outside the repo root so the source tree never shadows the colcon-installed package.
PYTEST := $(ENV) cd test && python -m pytest -p no:cacheprovider --import-mode=importlib

.PHONY: setup lint test demo bench clean

setup:
	@tools/setup.sh

# Lint first: pycodestyle, pyflakes, import order and pep257 docstrings, as ament_flake8/ament_pep257 (ruff.toml).
lint: setup
	@$(ENV) ruff check --no-cache . && echo "lint: clean"

test: setup lint
	@$(PYTEST) -q $(PYTEST_ARGS) .

demo: setup
	@$(ENV) xvr-ros demo --out out/demo

# In this order: the registration, tracking and replay benchmarks start from the training benchmark's network.
BENCHES := bench/bench_render.py bench/bench_train.py bench/bench_register.py bench/bench_tracking.py bench/bench_replay.py

bench: setup
	@$(ENV) set -e; for f in $(BENCHES); do echo "# $$f"; python $$f; done

clean:
	rm -rf build install log out
