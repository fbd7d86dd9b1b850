"""Loading the compiled data path, and the loud warning when it is missing.

``blockcrypt/crypto/_datapath_src/*.c`` is built by ``pip install`` (the project's
pyproject.toml) and holds AES-256-XTS through libcrypto's EVP API (key in
mlocked, MADV_DONTDUMP memory) and whole NBD requests on a container file with
the GIL released (see docs/ARCHITECTURE.md).  :func:`datapath` returns that
module, or None when it cannot be imported (a source tree never installed, a
build without gcc or libssl-dev); callers then use the pure-Python reference
engine and call :func:`warn_slow` once, which says so on stderr (nbdkit's log).

``BLOCKCRYPT_TESTONLY_DATAPATH_SO`` names another build of the same source to
load instead (``make test-sanitize`` runs the tests on an AddressSanitizer and
UndefinedBehaviorSanitizer build).  Owns nothing else.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from types import ModuleType

OVERRIDE_ENV = "BLOCKCRYPT_TESTONLY_DATAPATH_SO"
MODULE_NAME = "blockcrypt.crypto._datapath"

_module: ModuleType | None | bool = False      # False: not tried yet
_reason = ""
_warned = False
_warn_lock = threading.Lock()


def _load() -> ModuleType:
    path = os.environ.get(OVERRIDE_ENV)
    if not path:
        from . import _datapath
        return _datapath
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{OVERRIDE_ENV}={path} is not a loadable extension")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[MODULE_NAME] = mod
    return mod


def datapath() -> ModuleType | None:
    """The compiled module, or None if it cannot be imported (reason: :func:`why_missing`)."""
    global _module, _reason
    if _module is False:
        try:
            _module = _load()
        except ImportError as exc:
            _module, _reason = None, f"{type(exc).__name__}: {exc}"
    return _module


def why_missing() -> str:
    return _reason or "the compiled module was disabled"


def warn_slow(what: str) -> None:
    """Say once per process, on stderr, that ``what`` runs on the slow pure-Python path."""
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    sys.stderr.write(
        f"blockcrypt: WARNING: {what} uses the pure-Python reference engine, 10-100x "
        f"slower than the compiled data path, which cannot be loaded "
        f"({why_missing()}). Reinstall blockcrypt with gcc, python3-dev and "
        f"libssl-dev present (`make install`).\n")
    sys.stderr.flush()
