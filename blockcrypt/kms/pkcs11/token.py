"""One logged-in session per token per process, and the lock around every PKCS#11 call.

Rules from running SoftHSM2 (../shared/KMS.md) that hold for any module:

- python-pkcs11 initialises the module with ``C_Initialize(NULL)``, which tells it
  the caller does its own locking, and releases the GIL around calls: concurrent
  calls from two threads corrupt SoftHSM's heap.  Every call into a module goes
  through :func:`call`, under one process-wide lock.
- Login state is per process and token: a second login raises
  UserAlreadyLoggedIn.  One session per token is opened, logged in with the PIN
  read from the provider's PIN file, and reused for the life of the process.
- After ``fork`` the child must not use the parent's sessions: :func:`call`
  notices the new pid, re-initialises each module and logs in again.

Failures become blockcrypt errors that name the provider and the next step:
a file that is no PKCS#11 module, a token that is not there, a wrong PIN.  A
session that dies (token removed) is dropped, so the next call tries afresh.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

from ... import errors
from .config import Pkcs11Config, read_pin

T = TypeVar("T")

_LOCK = threading.RLock()
_STATE: dict = {"pid": None, "libs": {}, "sessions": {}}


def _p11():
    try:
        import pkcs11
        import pkcs11.exceptions  # noqa: F401
    except ImportError:
        raise errors.MissingTool(tool="python-pkcs11",
                                 package="python3-pip; pip install python-pkcs11") from None
    return pkcs11


# Errors meaning the token or its session went away (retry later, after replugging).
GONE = ("DeviceRemoved", "TokenNotPresent", "SessionClosed", "SessionHandleInvalid",
        "DeviceError", "TokenNotRecognised", "UserNotLoggedIn", "CryptokiNotInitialized")


def is_gone(exc: BaseException) -> bool:
    return type(exc).__name__ in GONE


def _lib(provider: str, cfg: Pkcs11Config):
    p11 = _p11()
    lib = _STATE["libs"].get(cfg.module)
    if lib is not None:
        return lib
    if not os.path.isfile(cfg.module):
        raise errors.ProviderModuleError(provider=provider, module=cfg.module,
                                         reason="no such file")
    try:
        lib = p11.lib(cfg.module)
        if not lib.initialized:
            lib.initialize()
    except (p11.exceptions.PKCS11Error, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if isinstance(e, OSError) or type(e) is p11.exceptions.PKCS11Error:
            # dlopen or C_GetFunctionList failed: not a PKCS#11 library at all.
            raise errors.ProviderModuleError(provider=provider, module=cfg.module,
                                             reason=reason) from None
        # A PKCS#11 library whose C_Initialize failed (its daemon or device not ready).
        p11.unload(cfg.module)
        raise errors.ProviderUnavailable(
            provider=provider, reason=f"{cfg.module} failed to initialise "
                                      f"({type(e).__name__}); check the token's service and "
                                      "configuration, then run the command again") from None
    _STATE["libs"][cfg.module] = lib
    return lib


def _forget_lib(module: str) -> None:
    """Finalise a module so the next use re-initialises it (SoftHSM reads its token
    directory at C_Initialize: a token created or plugged in later is seen then)."""
    lib = _STATE["libs"].pop(module, None)
    for key in [k for k in _STATE["sessions"] if k[0] == module]:
        del _STATE["sessions"][key]
    if lib is not None:
        try:
            lib.finalize()
        except Exception:  # noqa: BLE001 - already gone; the next initialize tells
            pass


def _after_fork() -> None:
    pid = os.getpid()
    if _STATE["pid"] == pid:
        return
    if _STATE["pid"] is not None:
        _STATE["sessions"].clear()
        for lib in _STATE["libs"].values():
            try:
                lib.reinitialize()
            except Exception:  # noqa: BLE001 - re-initialised lazily on next use
                pass
    _STATE["pid"] = pid


def _session(provider: str, cfg: Pkcs11Config):
    key = (cfg.module, cfg.token_label)
    s = _STATE["sessions"].get(key)
    if s is not None:
        return s
    p11 = _p11()
    exc = p11.exceptions
    lib = _lib(provider, cfg)
    try:
        token = lib.get_token(token_label=cfg.token_label)
    except exc.NoSuchToken:
        _forget_lib(cfg.module)
        raise errors.ProviderUnavailable(
            provider=provider,
            reason=f"no token labelled {cfg.token_label!r} in {cfg.module}; plug in or "
                   "create the token (list them with `softhsm2-util --show-slots` or "
                   "`pkcs11-tool --module MODULE -L`), then run the command again") from None
    except exc.PKCS11Error as e:
        _forget_lib(cfg.module)
        raise errors.ProviderUnavailable(provider=provider,
                                         reason=f"the module failed listing tokens ({e!r})") \
            from None
    with read_pin(provider, cfg.pin_file) as pin:
        # python-pkcs11 takes the PIN as str (an unwipeable copy, see docs/KEYS.md).
        try:
            s = token.open(user_pin=pin.view().tobytes().decode("utf-8"), rw=True)
        except UnicodeDecodeError:
            raise errors.PinFileError(provider=provider, path=cfg.pin_file,
                                      reason="the PIN is not UTF-8 text") from None
        except exc.UserAlreadyLoggedIn:
            s = token.open(rw=True)       # this process logged in already (another session)
        except (exc.PinIncorrect, exc.PinLenRange, exc.PinInvalid):
            raise errors.PinIncorrect(provider=provider, pin_file=cfg.pin_file) from None
        except (exc.PinLocked, exc.PinExpired) as e:
            raise errors.ProviderUnavailable(
                provider=provider,
                reason=f"the token's user PIN is {type(e).__name__[3:].lower()}; unlock or "
                       "reset it with the token's tools (e.g. `softhsm2-util "
                       "--init-pin`)") from None
        except exc.PKCS11Error as e:
            raise errors.ProviderUnavailable(provider=provider,
                                             reason=f"cannot open a session ({e!r})") from None
    _STATE["sessions"][key] = s
    return s


def call(provider: str, cfg: Pkcs11Config, what: str, fn: Callable[..., T]) -> T:
    """``fn(session, exceptions_module)`` under the process-wide lock, with this
    process's logged-in session to the provider's token.  A lost session is dropped
    and reported as ProviderUnavailable; other PKCS#11 errors are ``fn``'s to map."""
    with _LOCK:
        _after_fork()
        s = _session(provider, cfg)
        exc = _p11().exceptions
        try:
            return fn(s, exc)
        except exc.PKCS11Error as e:
            if not is_gone(e):
                raise
            _forget_lib(cfg.module)
            raise errors.ProviderUnavailable(
                provider=provider,
                reason=f"the token went away during {what} ({type(e).__name__}); reconnect "
                       "it and run the command again") from None


def forget_all() -> None:
    """Close every session (tests that remove tokens; process exit does this anyway)."""
    with _LOCK:
        for module in list(_STATE["libs"]):
            _forget_lib(module)
