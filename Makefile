# blockcrypt — see README.md. Every target installs what is missing first.
PY      := .venv/bin/python
PYTEST  := $(PY) -m pytest
LINK    := $(or $(BLOCKCRYPT_LINK),/usr/local/bin/blockcrypt)

.PHONY: install test test-quick test-sanitize demo bench bench-rbd bench-snapshot fuzz stress guest clean

# Debian packages, .venv, and (as root) the link /usr/local/bin/blockcrypt -> .venv/bin/blockcrypt.
install:
	@scripts/install-deps.sh

# --durations: the slowest tests, to keep CI under its 30-minute budget.
test: install
	$(PYTEST) -q --durations=25 $(PYTEST_ARGS)

# Unit and property tests only (no root, no devices).
test-quick: install
	$(PYTEST) -q -m "not e2e" $(PYTEST_ARGS)

# The compiled data path under AddressSanitizer + UBSan, then valgrind memcheck
# (also run by tests/e2e/test_nbd_sanitizers.py, so `make test` covers it).
test-sanitize: install
	scripts/test-sanitize.sh $(SANITIZE)

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)
	$(PY) scripts/bench_attach.py
	$(PY) scripts/bench_rbd.py $(BENCH_RBD_ARGS)

# The RBD rows alone (issue 17): a throwaway Ceph cluster, blockcrypt on RBD vs qemu-nbd's
# rbd driver with LUKS, and an RBD snapshot under an fsync writer; needs root.
bench-rbd: install
	$(PY) scripts/bench_rbd.py $(BENCH_RBD_ARGS)

# Write stalls during snapshot create (issue 14); needs root. BENCH_SNAPSHOT_ARGS=--sizes 1G
bench-snapshot: install
	$(PY) scripts/bench_snapshot.py $(BENCH_SNAPSHOT_ARGS)

fuzz: install
	BLOCKCRYPT_FUZZ_EXAMPLES=$${BLOCKCRYPT_FUZZ_EXAMPLES:-20000} $(PYTEST) -q -m fuzz

stress: install
	BLOCKCRYPT_STRESS_LOOPS=$${BLOCKCRYPT_STRESS_LOOPS:-100} $(PYTEST) -q -m stress

# Kernel + initramfs for the QEMU guest that proves the nbd-client path (cached in build/guest).
guest: install
	scripts/guest/build.sh

# Also removes the /usr/local/bin/blockcrypt link that `make install` made, if it points here.
clean:
	@if [ "$$(readlink $(LINK))" = "$(CURDIR)/.venv/bin/blockcrypt" ]; then rm -f $(LINK); fi
	rm -rf .venv build .pytest_cache .hypothesis
