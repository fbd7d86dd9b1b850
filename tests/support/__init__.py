"""Helpers shared by the test tree (imported as ``support.*``; ``tests/`` is on
pytest's pythonpath).  Fixtures live in the conftest.py files; everything here
is plain functions and classes.

- :mod:`.prereq`: the one rule for end-to-end prerequisites (skip, or fail in CI)
- :mod:`.cli`: running the CLI in a subprocess
- :mod:`.wait`: waiting on a condition with a deadline (never a bare sleep)
- :mod:`.nbdkit`: starting nbdkit with the plugin, libnbd handles
- :mod:`.env`: an initialised home with attach/mount helpers (root e2e tests)
- :mod:`.headers`: header copies built byte by byte from FORMAT.md's tables
"""
