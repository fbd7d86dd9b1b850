#!/usr/bin/env bash
# The compiled data path (blockcrypt/crypto/_datapath_src/) under the sanitizers.
#
#   scripts/test-sanitize.sh [asan|valgrind|all]     (default: all; `make test-sanitize`)
#
# asan:     builds the extension with -fsanitize=address,undefined into a temporary
#           directory and runs the cipher and backend unit tests on that build
#           (BLOCKCRYPT_TESTONLY_DATAPATH_SO); libasan is preloaded because
#           /usr/bin/python3 is not instrumented, and leak detection is off
#           (CPython keeps memory until exit by design).  Any report aborts: exit != 0.
# valgrind: memcheck on the installed build, on a subset of the same tests
#           (PYTHONMALLOC=malloc, so CPython's own allocator does not hide or fake
#           errors; scripts/valgrind-python.supp lists the CPython noise suppressed
#           and why).  Any error: exit 99.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
what=${1:-all}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
TESTS=(tests/unit/crypto/test_xts.py tests/unit/nbd/test_backend.py
       tests/unit/nbd/test_backend_volume.py tests/unit/nbd/test_backend_differential.py)

if [[ $what == asan || $what == all ]]; then
  suffix=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  include=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  so=$tmp/_datapath$suffix
  gcc -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
      -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
      -shared -fPIC -I"$include" blockcrypt/crypto/_datapath_src/*.c -lcrypto -o "$so"
  export BLOCKCRYPT_TESTONLY_DATAPATH_SO=$so
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  # The sanitized build is the one loaded, or this proves nothing.
  $PY -c "from blockcrypt.crypto.compiled import datapath as d; \
assert d().__file__ == '$so', d().__file__; print('asan+ubsan build:', d().__file__)"
  $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"
  unset BLOCKCRYPT_TESTONLY_DATAPATH_SO LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS
  echo "asan+ubsan: clean"
fi

if [[ $what == valgrind || $what == all ]]; then
  # Only the compiled path's cases: under valgrind the pyca reference is slow.
  VG_TESTS=(
    tests/unit/crypto/test_xts.py::test_ieee1619_annex_b
    tests/unit/crypto/test_xts.py::test_compiled_module_checks_its_own_arguments
    "tests/unit/crypto/test_xts.py::test_threads_agree_with_reference[4096]"
    "tests/unit/crypto/test_xts.py::test_wipe_while_threads_encrypt[512]"
    "tests/unit/nbd/test_backend.py::test_random_unaligned_io_matches_shadow[compiled-512-enc]"
    "tests/unit/nbd/test_backend.py::test_random_unaligned_io_matches_shadow[compiled-4096-plain]"
    "tests/unit/nbd/test_backend.py::test_disjoint_writes_within_one_sector_all_survive[compiled-4096]"
    "tests/unit/nbd/test_backend.py::test_overlapping_concurrent_writes_equal_some_serial_order[compiled]"
    "tests/unit/nbd/test_backend.py::test_reads_past_end_of_a_short_file_are_zeros[compiled]"
  )
  # --fair-sched=yes: without it one thread that drops and retakes the GIL around each
  # request can starve the others under valgrind's serialised scheduler.
  PYTHONMALLOC=malloc valgrind --tool=memcheck --error-exitcode=99 --leak-check=no --fair-sched=yes \
      --suppressions=scripts/valgrind-python.supp --quiet \
      $PY -m pytest -q -p no:cacheprovider -x "${VG_TESTS[@]}"
  echo "valgrind memcheck: clean"
fi
