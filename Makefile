# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use
# with the CPU build of torch pinned (an unpinned torch pulls a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# The CPU build of torch comes from its own index (the default index's torch is a multi-GB CUDA
# build), when that index answers within 3 s; where it does not (an offline mirror or wheelhouse
# that serves the CPU wheel), pip's configured index is used. TORCH_INDEX=URL or TORCH_INDEX= decides.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell python3 -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=3); print('$(TORCH_CPU_INDEX)')" 2>/dev/null)

# Lint also validates docker-compose.yml against the compose specification (vendored in check-jsonschema).
.PHONY: demo test test-unit test-integration lint format typecheck check install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test,baselines]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/driftrec demo

# every test: unit + integration against a real broker and a real Redis (what CI runs)
test: $(VENV)/.installed
	$(PY) -m pytest -q --timeout=600

# unit tests only: no Redis, broker or subprocess (tests/conftest.py enforces it), under a minute
test-unit: $(VENV)/.installed
	$(PY) -m pytest -q --timeout=120 -m "not integration"

test-integration: $(VENV)/.installed
	$(PY) -m pytest -q --timeout=600 -m integration

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(VENV)/.installed
	PY=$(PY) .ci/typecheck

check: lint typecheck test

clean:
	rm -rf $(VENV) reports build .pytest_cache
