"""Ceph access for RBD stores: the ``rados``/``rbd`` modules, connecting, and the
one mapping of librados/librbd exceptions to blockcrypt's errors.

Debian ships ``rados`` and ``rbd`` (packages python3-rados, python3-rbd) as
CPython extensions in ``/usr/lib/python3/dist-packages``.  nbdkit's embedded
``/usr/bin/python3`` sees them; blockcrypt's virtualenv does not (it is built
without system site packages, so that Debian's older copies of our other
dependencies never satisfy them).  :func:`modules` therefore imports them
normally and otherwise loads exactly those two extension files by path.

:class:`StoreConfig` is what the catalog records about a store (no key: the
cephx key stays in the administrator's keyring file, which must be 0600).
:func:`connect` bounds every wait (monitor connect, monitor and OSD
operations), so an unreachable cluster fails a command within seconds instead
of hanging it.  :func:`ceph_error` is the only place librados/librbd
exceptions become :class:`~blockcrypt.errors.BlockcryptError`.
"""
from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .. import errors
from .home import check_secret_mode

DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
# Management commands: how long a monitor connect or a monitor/OSD operation may take.
CONNECT_TIMEOUT_S = 10
# The server: an OSD that does not answer within this fails the request with an
# error the client sees (EIO), never a silent success and never a hang forever.
# Each store may set its own (`store add --io-timeout`).
SERVE_OSD_TIMEOUT_S = 30
MAX_IO_TIMEOUT_S = 3600

_modules: tuple[ModuleType, ModuleType] | None = None


def _load_by_path(name: str) -> ModuleType:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    path = DIST_PACKAGES / f"{name}{suffix}"
    if not path.is_file():
        raise errors.MissingTool(tool=f"the Ceph Python module {name!r} ({path})",
                                 package="python3-rados python3-rbd")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def modules() -> tuple[ModuleType, ModuleType]:
    """``(rados, rbd)``: imported normally, else Debian's extension files by path."""
    global _modules
    if _modules is None:
        try:
            import rados
            import rbd
        except ImportError:
            rados = sys.modules.get("rados") or _load_by_path("rados")
            rbd = sys.modules.get("rbd") or _load_by_path("rbd")   # links against rados
        _modules = (rados, rbd)
    return _modules


@dataclass(frozen=True)
class StoreConfig:
    """How to reach one RBD store: a row of the ``stores`` table."""

    name: str
    conf: str                  # ceph.conf path (monitors, and maybe a keyring)
    pool: str
    client_id: str = "admin"   # cephx user client.<id>
    keyring: str | None = None  # keyring file (0600); None: the conf's keyring
    io_timeout_s: int = SERVE_OSD_TIMEOUT_S   # a served disk's OSD operation bound

    def describe(self) -> str:
        return f"store {self.name!r} (pool {self.pool!r}, client.{self.client_id})"


def check_keyring(cfg: StoreConfig) -> None:
    """The keyring file exists, is a regular file and is 0600 (never read here)."""
    if cfg.keyring is None:
        return
    try:
        st = os.stat(cfg.keyring)
    except OSError as exc:
        raise errors.StoreAuthRefused(store=cfg.name, client=f"client.{cfg.client_id}",
                                      keyring=cfg.keyring, pool=cfg.pool,
                                      reason=f"cannot read the keyring: {exc.strerror}") from None
    check_secret_mode(st, cfg.keyring, "Ceph keyring")


def connect(cfg: StoreConfig, *, osd_timeout_s: int = CONNECT_TIMEOUT_S):
    """A connected ``rados.Rados`` for ``cfg`` (caller shuts it down)."""
    rados, _ = modules()
    check_keyring(cfg)
    if not os.path.isfile(cfg.conf):
        raise errors.StoreUnreachable(store=cfg.name, conf=cfg.conf,
                                      reason="the Ceph configuration file is missing")
    conf = {"client_mount_timeout": str(CONNECT_TIMEOUT_S),
            "rados_mon_op_timeout": str(CONNECT_TIMEOUT_S),
            "rados_osd_op_timeout": str(osd_timeout_s),
            "log_to_stderr": "false", "err_to_stderr": "false"}
    if cfg.keyring is not None:
        conf["keyring"] = cfg.keyring
    try:
        cluster = rados.Rados(conffile=cfg.conf, rados_id=cfg.client_id, conf=conf)
        cluster.connect(timeout=CONNECT_TIMEOUT_S)
    except rados.Error as exc:
        raise ceph_error(cfg, exc, connecting=True) from None
    return cluster


def open_pool(cfg: StoreConfig, cluster):
    """The pool's I/O context; PoolMissing unless it exists with the ``rbd`` application."""
    rados, _ = modules()
    try:
        ioctx = cluster.open_ioctx(cfg.pool)
    except rados.ObjectNotFound:
        raise errors.PoolMissing(store=cfg.name, pool=cfg.pool,
                                 reason=f"the pool {cfg.pool!r} does not exist") from None
    except rados.Error as exc:
        raise ceph_error(cfg, exc) from None
    try:
        apps = ioctx.application_list()
    except rados.Error as exc:
        ioctx.close()
        raise ceph_error(cfg, exc) from None
    if "rbd" not in apps:
        ioctx.close()
        raise errors.PoolMissing(store=cfg.name, pool=cfg.pool,
                                 reason=f"the pool {cfg.pool!r} is not an RBD pool "
                                        f"(applications: {', '.join(apps) or 'none'})")
    return ioctx


def _errno(exc: BaseException) -> int | None:
    return getattr(exc, "errno", None)


def ceph_error(cfg: StoreConfig, exc: BaseException, *, connecting: bool = False,
               image: str | None = None, owner: str | None = None) -> errors.BlockcryptError:
    """The user-facing error for a librados/librbd exception on ``cfg``'s store.

    ``image``/``owner`` (``"disk 'db'"``) name the image an operation was on, so a
    missing image is reported as the disk's."""
    code = _errno(exc)
    if code is not None and code < 0:
        code = -code
    reason = os.strerror(code) if code else (str(exc) or type(exc).__name__)
    client = f"client.{cfg.client_id}"
    if code in (errno.EACCES, errno.EPERM) or (connecting and code == errno.ENOENT):
        return errors.StoreAuthRefused(store=cfg.name, client=client,
                                       keyring=cfg.keyring or "(from the conf)", pool=cfg.pool,
                                       reason="authentication refused" if connecting
                                       else f"permission denied: {reason}")
    if code == errno.ETIMEDOUT and not connecting:    # connected: an operation's bound
        return errors.StoreNotAnswering(store=cfg.name,
                                        what=owner or (f"image {image!r}" if image
                                                       else f"pool {cfg.pool!r}"))
    if code in (errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNREFUSED) or (
            connecting and code in (errno.EINVAL, errno.EINTR)):
        return errors.StoreUnreachable(store=cfg.name, conf=cfg.conf, reason=reason)
    if code == errno.ENOENT and image is not None:
        return errors.ImageMissing(image=image, owner=owner or f"image {image!r}",
                                   store=cfg.name)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return errors.NoSpace(path=f"rbd:{cfg.name}/{image or cfg.pool}")
    where = f"rbd:{cfg.name}/{image}" if image else f"store {cfg.name!r}"
    return errors.StorageError(path=where, reason=f"Ceph: {reason}")
