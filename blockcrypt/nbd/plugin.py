"""nbdkit Python plugin serving one blockcrypt container.

    nbdkit -f -U SOCKET python .../blockcrypt/nbd/plugin.py \\
        file=CONTAINER [keyfd=N] [readonly=true|false] [discard=true|false]
    nbdkit ... python .../plugin.py rbd-store=NAME rbd-conf=CEPH_CONF rbd-pool=POOL \\
        rbd-client=ID [rbd-keyring=FILE] rbd-image=IMAGE [disk=NAME] [home=DIR] \\
        [break-lock=true] [keyfd=N] ...

A thin adapter: all format and crypto logic lives in
:class:`blockcrypt.nbd.backend.DiskBackend`, serving the container file as a
:class:`blockcrypt.storage.volume.FileVolume`.  nbdkit embeds /usr/bin/python3, so
start it with the environment of :func:`blockcrypt.nbd.launch.plugin_env`
(the CLI does).

Config keys (anything else is refused):

- ``file``: the container path (a file disk), served as a
  :class:`~blockcrypt.storage.volume.FileVolume`; or, for a disk on Ceph, the
  ``rbd-*`` keys (store name, ceph.conf, pool, cephx client id, keyring file, image;
  never a key), served as a :class:`~blockcrypt.storage.rbd_volume.RbdVolume`.
  ``disk`` and ``home`` only name the server in the image's holder record;
  ``break-lock=true`` breaks another host's exclusive lock (``disk attach
  --break-lock``).
- ``keyfd``: an inherited file descriptor, normally a pipe, carrying exactly the
  64-byte data key of an encrypted container; omitted for unencrypted ones.
  The key is read once and the descriptor closed.  It never appears in argv,
  the environment, nbdkit's ``-v`` log (which prints every key=value, hence
  only the descriptor number goes there) or a file.
- ``readonly``: serve read-only (writes fail with EROFS); default false.
- ``cowctl``: a Unix socket path on which the plugin accepts copy-before-write
  snapshots (:mod:`blockcrypt.nbd.cow`); optional.
- ``snapdir``: the folder where ``snapshot create`` of a detached disk waits
  for a server to take its copy over (:func:`blockcrypt.nbd.cow.take_over`,
  socket ``<snapdir>/<disk id>.sock``); optional, read-write only.
- ``discard``: let trim and zero deallocate (leaks which ranges are unused,
  like dm-crypt allow_discards); default false.

Secret hygiene: the process is made non-dumpable at load (no core file, no
ptrace by other users).  The key read from the pipe is wiped as soon as the
compiled cipher holds its own copy (a page of its own, mlocked and
MADV_DONTDUMP; libcrypto's key schedules exist only while a request runs, see
docs/KEYS.md); cleanup wipes it.  Error messages name errnos and objects, never key bytes.
mlock does not survive fork(): run nbdkit with ``-f``/``--foreground`` (the CLI
does) so the process that holds the key is the one that locked it.
"""
from __future__ import annotations

import errno
import functools
import os
import threading
from typing import NoReturn

import nbdkit

from blockcrypt.constants import DK_BYTES
from blockcrypt.crypto import compiled, secret
from blockcrypt.nbd.backend import DiskBackend, errno_for
from blockcrypt.nbd.cow import CowServer, take_over
from blockcrypt.storage.chunkcopy import handoff_socket
from blockcrypt.storage.volume import FileVolume, Volume

API_VERSION = 2

# Largest request advertised; nbdkit itself accepts up to 64 MiB.
MAX_REQUEST_BYTES = 32 * 1024 * 1024

secret.disable_core_dumps()

_file: str | None = None
_rbd: dict[str, str] = {}          # rbd-* parameters, without the prefix
_disk = ""
_home: str | None = None
_break_lock = False
RBD_KEYS = ("store", "conf", "pool", "client", "keyring", "image", "io-timeout")
RBD_OPTIONAL = ("keyring", "io-timeout")
_keyfd: int | None = None
_readonly = False
_discard = False
_dk: secret.Secret | None = None
_backend: DiskBackend | None = None
_cowctl: str | None = None
_snapdir: str | None = None
_cow_server: CowServer | None = None

_FLAG_FUA = nbdkit.FLAG_FUA

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{key}= must be true or false, got {value!r}")


def config(key: str, value: str) -> None:
    global _file, _keyfd, _readonly, _discard, _cowctl, _disk, _home, _break_lock, _snapdir
    if key == "file":
        _file = value
    elif key.startswith("rbd-") and key[4:] in RBD_KEYS:
        _rbd[key[4:]] = value
    elif key == "disk":
        _disk = value
    elif key == "home":
        _home = value
    elif key == "break-lock":
        _break_lock = _parse_bool(key, value)
    elif key == "keyfd":
        try:
            _keyfd = int(value)
        except ValueError:
            raise ValueError(f"keyfd= must be a file descriptor number, got {value!r}") from None
        if _keyfd < 0:
            raise ValueError(f"keyfd= must be a file descriptor number, got {value!r}")
    elif key == "readonly":
        _readonly = _parse_bool(key, value)
    elif key == "discard":
        _discard = _parse_bool(key, value)
    elif key == "cowctl":
        _cowctl = value
    elif key == "snapdir":
        _snapdir = value
    else:
        # Name the key only: a mistyped parameter could carry something secret.
        raise ValueError(f"unknown parameter {key!r}; "
                         "accepted: file, rbd-store, rbd-conf, rbd-pool, rbd-client, "
                         "rbd-keyring, rbd-image, rbd-io-timeout, disk, home, break-lock, "
                         "keyfd, readonly, discard, cowctl, snapdir")


def config_complete() -> None:
    global _dk
    if (_file is None) == (not _rbd):
        raise ValueError("either file=CONTAINER or the rbd-* parameters are required")
    missing = [k for k in RBD_KEYS if k not in RBD_OPTIONAL and k not in _rbd] if _rbd else []
    if missing:
        raise ValueError(f"missing rbd-{missing[0]}=")
    if _keyfd is not None:
        try:
            _dk = secret.Secret.read_exact_fd(_keyfd, DK_BYTES)
        except (EOFError, OSError) as e:
            raise RuntimeError(f"cannot read the data key from keyfd={_keyfd}: {e}") from None
        finally:
            os.close(_keyfd)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open_volume() -> Volume:
    """The volume the parameters name: a container file or an RBD image."""
    if _file is not None:
        return FileVolume(_file, read_only=_readonly)
    from blockcrypt.storage.rbd_volume import RbdVolume, StoreConfig
    cfg = StoreConfig(name=_rbd["store"], conf=_rbd["conf"], pool=_rbd["pool"],
                      client_id=_rbd["client"], keyring=_rbd.get("keyring"),
                      **({"io_timeout_s": int(_rbd["io-timeout"])} if "io-timeout" in _rbd
                         else {}))
    volume = RbdVolume(cfg, _rbd["image"], read_only=_readonly, disk=_disk, home=_home,
                       break_lock=_break_lock)
    if volume.displaced:
        nbdkit.debug(f"blockcrypt: broke the exclusive lock of {volume.displaced}")
    return volume


def get_ready() -> None:
    """Open the container before serving, so a bad file or key fails at start-up."""
    global _backend, _dk, _cow_server
    try:
        _backend = DiskBackend(open_volume(), _dk, discard=_discard)
        if _snapdir is not None and not _readonly and _file is not None:
            # a detached snapshot still copying: continue it before any write
            take_over(handoff_socket(_snapdir, _backend.header.uid_hex), _backend)
        if _cowctl is not None and not _readonly:
            _cow_server = CowServer(_cowctl, _backend)
    finally:
        # The cipher holds its own mlocked copy of the key; drop ours now.
        if _dk is not None:
            _dk.wipe()
            _dk = None


def cleanup() -> None:
    """Wipe the key (the cipher's copy) and close the container."""
    global _backend, _dk, _cow_server
    if _cow_server is not None:
        _cow_server.close()
        _cow_server = None
    if _backend is not None:
        _backend.close()
        _backend = None
    if _dk is not None:
        _dk.wipe()
        _dk = None


def _fail(op: str, exc: Exception) -> NoReturn:
    """Report a failed request to nbdkit with the errno of :func:`errno_for`
    (EIO for anything unexpected: a failed request never looks like success).

    The exception raised carries the operation and the error text only
    (``from None`` drops the chained original): never buffers or key bytes.
    """
    nbdkit.set_error(errno_for(exc))
    raise RuntimeError(f"{op}: {type(exc).__name__}: {exc}") from None


def _nbd_errors(fn):
    """Route any failure of the callback through :func:`_fail`."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure must reach the client
            _fail(fn.__name__, e)
    return wrapper


class _ThreadStates:
    """Keep each nbdkit worker thread's Python thread state for the life of its connection.

    nbdkit's Python plugin enters the interpreter with PyGILState_Ensure and
    leaves with PyGILState_Release around every callback.  A worker thread
    has no thread state of its own, so every request made a new one and
    destroyed it again: a malloc'd PyThreadState plus a frame stack chunk
    that CPython maps and unmaps (mmap/munmap, i.e. the process-wide mmap
    lock and a TLB shootdown on every core).  Measured here, that churn
    dominated a 4 KiB request: blockcrypt unencrypted served ~20k random
    reads/s at queue depth 32 with it and ~90k without.

    :meth:`pin` (first request of a worker thread) adds one PyGILState_Ensure
    of our own that is not released, so the thread state survives
    nbdkit's PyGILState_Release and is reused by every later request of that
    thread.  nbdkit joins a connection's worker threads before it calls the
    plugin's ``close``, so :meth:`release` (from ``close``) deletes the
    connection's pinned states once their threads are gone: nothing grows
    with the number of connections.  A state belonging to the calling thread
    (nbdkit ``--threads 1`` runs requests on the connection thread) is
    unpinned with PyGILState_Release instead.  The calls are the documented
    C API, made by the compiled extension (``pin_thread_state``,
    ``release_thread_state``, ``live_thread_states`` in
    blockcrypt/crypto/_datapath_src/module.c).  Without the extension :meth:`pin` does
    nothing (the slow path, announced on stderr by the backend).
    """

    def __init__(self) -> None:
        self._local = threading.local()   # lives as long as the thread state does
        self._dp = compiled.datapath()
        self.enabled = self._dp is not None

    def pin(self, conn: "_Connection") -> None:
        """Keep the calling thread's state alive until ``conn`` closes (idempotent)."""
        if not self.enabled or getattr(self._local, "conn", None) is not None:
            return
        state = self._dp.pin_thread_state()
        self._local.conn = conn
        conn.thread_states.append(state)

    def release(self, conn: "_Connection") -> int:
        """Drop every state pinned for ``conn``; return how many."""
        states, conn.thread_states = conn.thread_states, []
        for state in states:
            if not self._dp.release_thread_state(state):   # it was this thread's own
                self._local.conn = None
        return len(states)

    def live(self) -> int:
        """How many Python thread states the interpreter has (for the debug log)."""
        return self._dp.live_thread_states() if self.enabled else -1


_thread_states = _ThreadStates()


class _Connection:
    """Per-connection handle: the thread states pinned for it
    (:class:`_ThreadStates`); all disk state is in the shared backend."""

    __slots__ = ("readonly", "thread_states")

    def __init__(self, readonly: bool):
        self.readonly = readonly
        self.thread_states: list[int] = []


def open(readonly):  # noqa: A001 - nbdkit's callback name
    return _Connection(readonly)


def close(h) -> None:
    released = _thread_states.release(h)
    nbdkit.debug(f"blockcrypt: connection closed, {released} pinned thread state(s) "
                 f"released, {_thread_states.live()} live")


def get_size(h) -> int:
    return _backend.size_bytes


def block_size(h):
    # Any alignment is served correctly (read-modify-write), so the minimum is
    # 1; whole sectors avoid the read-modify-write.
    return (1, _backend.sector_size, MAX_REQUEST_BYTES)


def is_rotational(h) -> bool:
    return False


def can_write(h) -> bool:
    return not _backend.read_only


def can_flush(h) -> bool:
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_zero(h) -> bool:
    return True


def can_fast_zero(h) -> bool:
    return True


def can_trim(h) -> bool:
    return _backend.discard and not _backend.read_only


def can_extents(h) -> bool:
    return True


def can_multi_conn(h) -> bool:
    # One shared file descriptor: a flush on any connection covers all writes.
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


# pread and pwrite, the per-request callbacks, handle errors inline: the
# _nbd_errors wrapper would cost a Python frame on every request.  Each pins
# its worker thread's Python thread state on the thread's first request
# (_ThreadStates); the test is one attribute read of a threading.local.  With
# the compiled path, _backend.pread_into is the extension's Disk.pread: one C
# call per request, the GIL released from start to end.
_pinned = _thread_states._local
_getattr = getattr


def pread(h, buf, offset, flags):
    if _getattr(_pinned, "conn", None) is None:
        _thread_states.pin(h)
    try:
        _backend.pread_into(buf, offset)
    except Exception as e:  # noqa: BLE001 - every failure must reach the client
        _fail("pread", e)


def pwrite(h, buf, offset, flags):
    if _getattr(_pinned, "conn", None) is None:
        _thread_states.pin(h)
    try:
        _backend.pwrite(buf, offset, bool(flags & _FLAG_FUA))
    except Exception as e:  # noqa: BLE001
        _fail("pwrite", e)


@_nbd_errors
def zero(h, count, offset, flags):
    may_trim = bool(flags & nbdkit.FLAG_MAY_TRIM)
    if flags & nbdkit.FLAG_FAST_ZERO and not _backend.zero_is_fast(may_trim):
        raise OSError(errno.ENOTSUP, "fast zero needs discard=true and may-trim")
    _backend.zero(count, offset, may_trim=may_trim, fua=bool(flags & nbdkit.FLAG_FUA))


@_nbd_errors
def trim(h, count, offset, flags):
    _backend.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_nbd_errors
def flush(h, flags):
    _backend.flush()


@_nbd_errors
def extents(h, count, offset, flags):
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(start, length, hole if is_hole else 0)
            for start, length, is_hole in _backend.extents(count, offset)]
