"""Where blockcrypt keeps its state, and how files there are created.

Layout under the home directory (every directory 0700, every file 0600):

    blockcrypt.db          SQLite: key store, audit trail, disk catalog
    disks/<id>.bcd         one container file per disk
    snapshots/<id>.bcd     one container file per snapshot
    run/<disk-name>/       runtime state of an attached/served disk
                           (nbdkit socket, pid file, log, fuse mount point)

This module owns that layout and the private-file helpers, among them the one
rule for secret files a user hands in (passphrase files, the TLS-PSK file, the
TLS server key): :func:`open_secret_file` / :func:`check_secret_mode` refuse a
file that group or others may access (mode 0600 or stricter, as ssh demands of
private keys) with :class:`~blockcrypt.errors.InsecureFile`, naming the file and
the ``chmod`` to run.  It must not open the database or a container.
"""
from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from .. import errors

DEFAULT_ROOT_HOME = Path("/var/lib/blockcrypt")
DB_NAME = "blockcrypt.db"


def default_home() -> Path:
    env = os.environ.get("BLOCKCRYPT_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return DEFAULT_ROOT_HOME
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "blockcrypt"


_umask_lock = threading.Lock()
_umask_users = 0
_umask_saved = 0


@contextlib.contextmanager
def private_umask():
    """Files and directories created inside are 0600 / 0700.

    The umask is per process, not per thread: threads inside at the same time share one
    0077 umask, and the caller's is restored when the last one leaves (a plain
    save/restore pair per thread could restore another thread's 0077 for good).
    """
    global _umask_users, _umask_saved
    with _umask_lock:
        if _umask_users == 0:
            _umask_saved = os.umask(0o077)
        _umask_users += 1
    try:
        yield
    finally:
        with _umask_lock:
            _umask_users -= 1
            if _umask_users == 0:
                os.umask(_umask_saved)


def ensure_private_dir(path: Path) -> Path:
    """Create path (and parents) as 0700; tighten an existing one to 0700."""
    with private_umask():
        path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def create_private_file(path, what: str = "file") -> int:
    """Create path exclusively as a 0600 file (never following a symlink); return its fd.

    AlreadyExists if it exists; NoSpace / StorageError for other failures.
    """
    try:
        with private_umask():
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise errors.AlreadyExists(what=what, name=os.fspath(path)) from None
    except FileNotFoundError:       # the file is being created: its folder is missing
        folder = os.path.dirname(os.path.abspath(path))
        raise errors.NotFound(f"cannot create {what} {os.fspath(path)}: no such directory "
                              f"{folder}", what=what, name=os.fspath(path)) from None
    except OSError as exc:
        raise errors.storage_error(path, exc, what) from None


def fsync_dir(directory: os.PathLike | str) -> None:
    """fsync a directory, so that a rename or a new entry in it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_secret_mode(st: os.stat_result, path: os.PathLike | str, what: str) -> None:
    """InsecureFile if ``st`` (a secret file's stat) gives group or others any access.
    Regular files and named pipes only: the mode of a terminal or another device
    (``/dev/stdin`` on a tty) says nothing about who can read what passes through."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        return
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise errors.InsecureFile(what=what, path=os.fspath(path),
                                  mode=f"{stat.S_IMODE(st.st_mode):04o}")


def open_secret_file(path: os.PathLike | str, what: str) -> int:
    """Open a secret file read-only and return the descriptor once the open file
    passes :func:`check_secret_mode` (the file checked is the file read); OSError
    if it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        check_secret_mode(os.fstat(fd), path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolve_inside(root: Path | str, path: Path | str, dirs: tuple[str, ...],
                   what: str) -> Path:
    """``path`` (relative to ``root``, or absolute), resolved, if it lies directly in one
    of ``dirs`` under ``root``; CatalogTampered otherwise.

    Every path read from the catalog passes here before it is opened, renamed or
    removed: a row edited to ``../victim``, ``/etc/passwd`` or ``disks/../blockcrypt.db``
    is refused instead of followed.
    """
    base = Path(root).resolve()
    resolved = (base / path).resolve() if str(path) else base
    if resolved.name and any(resolved.parent == base / d for d in dirs):
        return resolved
    raise errors.CatalogTampered(what=what, path=str(path), home=str(base),
                                 where=" or ".join(f"{d}/" for d in dirs))


class Home:
    """The blockcrypt home directory and the paths inside it."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_home()

    def __repr__(self) -> str:
        return f"Home({str(self.path)!r})"

    @property
    def db_path(self) -> Path:
        return self.path / DB_NAME

    @property
    def disks_dir(self) -> Path:
        return self.path / "disks"

    @property
    def snapshots_dir(self) -> Path:
        return self.path / "snapshots"

    @property
    def run_dir(self) -> Path:
        return self.path / "run"

    def exists(self) -> bool:
        return self.db_path.exists()

    def create_dirs(self) -> None:
        for d in (self.path, self.disks_dir, self.snapshots_dir, self.run_dir):
            ensure_private_dir(d)
