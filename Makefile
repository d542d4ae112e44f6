# The commands a newcomer runs: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: setup test demo bench lint typecheck lock clean

setup:
	@scripts/setup.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -n 2 --dist loadgroup

demo: setup
	$(VENV)/bin/firmware-sim demo

bench: setup
	$(PY) -m firmware_sim.bench

lint: setup
	$(PY) -m ruff check .

typecheck: setup
	$(PY) -m mypy

# Re-resolve the lock files (needs network and `uv`); commit the result.
lock:
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu -o requirements/dev.lock -q
	uv pip compile pyproject.toml --extra agent --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu -o requirements/agent.lock -q

clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache
