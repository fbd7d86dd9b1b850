# blockcrypt — see README.md. Every target installs what is missing first.
PY      := .venv/bin/python
PYTEST  := $(PY) -m pytest

.PHONY: install test test-quick demo bench fuzz stress guest clean

install:
	@scripts/install-deps.sh

test: install
	$(PYTEST) -q $(PYTEST_ARGS)

# Unit and property tests only (no root, no devices).
test-quick: install
	$(PYTEST) -q -m "not e2e" $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

fuzz: install
	BLOCKCRYPT_FUZZ_EXAMPLES=$${BLOCKCRYPT_FUZZ_EXAMPLES:-20000} $(PYTEST) -q -m fuzz

stress: install
	BLOCKCRYPT_STRESS_LOOPS=$${BLOCKCRYPT_STRESS_LOOPS:-100} $(PYTEST) -q -m stress

# Kernel + initramfs for the QEMU guest that proves the nbd-client path (cached in build/guest).
guest: install
	scripts/guest/build.sh

clean:
	rm -rf .venv build .pytest_cache .hypothesis
