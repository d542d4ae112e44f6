# The commands a newcomer runs: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: setup test demo bench lint typecheck lock check-locks audit clean

setup:
	@scripts/setup.sh

test: setup check-locks
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

# The lock files still match pyproject.toml (names pinned, dependency-section stamp; no network).
check-locks:
	python3 scripts/check_locks.py

# pip-audit both lock files against PyPI's vulnerability service (fails on a fixable vulnerability;
# an unreachable service is reported and does not fail).
audit: setup
	$(PY) scripts/audit.py

# Re-resolve the lock files (needs network and `uv`); existing pins are kept (`-o` onto the old lock);
# then stamp them with pyproject's dependency sections (checked by check-locks). Commit the result.
UV ?= uv
lock:
	$(UV) pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu -o requirements/dev.lock -q
	$(UV) pip compile pyproject.toml --extra agent --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu -o requirements/agent.lock -q
	python3 scripts/check_locks.py --stamp

clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache
