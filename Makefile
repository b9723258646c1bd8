# The few verbs people type. `make run` and `make test` are the README's quick start:
# each builds .venv (installing what it needs) before doing its job.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
VAR     ?= var

.PHONY: run test fuzz kernel-test image-test lint fmt proto schema lock bench bench-core profile crash-test clean

$(STAMP): pyproject.toml clients/pyproject.toml constraints-dev.txt
	@python3 -m venv --help >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-venv)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Two distributions, both editable: pasid-client (clients/) and pasid-broker (here),
	@# at the exact versions of constraints-dev.txt (`make lock` writes it).
	@# A venv from before the split has a pasid-broker that owned bin/pasidctl: uninstall it
	@# first, or replacing it would delete the script pasid-client has just installed.
	$(PY) -m pip uninstall -q -y pasid-broker 2>/dev/null || true
	$(PY) -m pip install -q -c constraints-dev.txt -e ./clients -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	@mkdir -p $(VAR)
	@echo "pasid-broker: simulator backend, database $(VAR)/broker.db"
	@echo "listening on unix:$(CURDIR)/$(VAR)/broker.sock  (Ctrl-C stops it; a restart keeps every set: a verified holder's while it runs, an anonymous one for its grace)"
	@echo "try:   $(VENV)/bin/pasidctl --socket $(VAR)/broker.sock info"
	@exec $(VENV)/bin/pasid-broker --backend simulator --db $(VAR)/broker.db --socket $(VAR)/broker.sock

# The whole suite, in one pytest run spread over TEST_WORKERS workers (pytest-xdist: most
# tests wait on brokers, sockets and QEMU, not on a core; tests/conftest.py keeps the tests
# that share a machine or a boot on one worker). Its real-kernel tiers (tests/kernel) boot
# QEMU and its real-systemd tier boots systemd; each installs its Debian packages or skips
# saying why. The e2e suite runs on both backends in the same pool (tests/e2e/conftest.py):
# the simulator, and the VFIO backend over the test-only fake of the patched kernel, which
# no mainline kernel is; only the e2e tests that choose their daemons' backend themselves,
# or start none, run once. What each part costs: docs/test-time.md.
TEST_WORKERS ?= 4
test: $(STAMP) lint
	PASID_E2E_BACKENDS=simulator,vfio-fake $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

# The long form of the hostile-client fuzz (the suite runs about 500 cases): every method
# of a live broker, a restart and the invariants after every batch. FUZZ_CASES=N to change.
FUZZ_CASES ?= 10000
fuzz: $(STAMP)
	PASID_FUZZ_CASES=$(FUZZ_CASES) $(PY) -m pytest -q -s tests/hostile/test_fuzz.py

# The real-kernel tier alone: boots Debian's kernel under QEMU and prints what it answered.
kernel-test: $(STAMP)
	$(PY) -m pytest -v tests/kernel

# The container images built (buildah, from a Debian base made by mmdebstrap) and run as
# containers: the broker as PID 1, its HEALTHCHECK, a client through the mounted socket,
# SIGTERM. Installs buildah and mmdebstrap if missing; caches in /var/cache/pasid-broker/.
# `make test` runs the same tier once this has cached the base (skipping it before).
image-test: $(STAMP)
	PASID_IMAGE_TEST=1 $(PY) -m pytest -v -s tests/deploy/test_image_build.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: $(STAMP)
	$(PY) tools/genproto.py

# After adding a migration: the statements a new database is made from (head_schema.py).
schema: $(STAMP)
	$(PY) tools/genschema.py
	$(VENV)/bin/ruff format broker/store/migrations/head_schema.py

# Re-resolve the development and test environment into constraints-dev.txt (tools/lock.py),
# after changing a dependency; the next `make test` installs exactly that.
lock:
	python3 tools/lock.py

# The long form of the crash test (the suite runs a short one): 100 SIGKILLs of a broker
# under 4 clients allocating and freeing at full speed. KILLS=N to change.
KILLS ?= 100
crash-test: $(STAMP)
	$(PY) -m tests.crash.crashtest --kills $(KILLS)

bench: $(STAMP)
	$(PY) -m bench

# The allocator core alone at 2^20 (docs/performance.md): prints ratios, asserts nothing.
bench-core: $(STAMP)
	$(PY) -m bench core

# Where a stream alloc's server CPU goes next to echo's, by component (docs/performance.md):
# perf samples each server. Installs Debian's linux-perf if it is missing.
profile: $(STAMP)
	@command -v perf >/dev/null || (apt-get update -qq && apt-get install -y -qq linux-perf)
	$(PY) -m bench profile

clean:
	rm -rf $(VENV) $(VAR) .pytest_cache .mypy_cache .ruff_cache
