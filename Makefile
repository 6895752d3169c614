# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use
# with the CPU build of torch pinned (an unpinned torch pulls a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,baselines]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/driftrec demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --timeout=600

clean:
	rm -rf $(VENV) reports .pytest_cache
