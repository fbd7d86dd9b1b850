"""The file store: containers as files under the blockcrypt home.

Implements :class:`~blockcrypt.storage.store.Store` on top of
:mod:`.container` (header I/O), :mod:`.fastcopy` (thin copies) and
:mod:`.publish` (the temp-file create/delete protocol).  A location is a
:class:`pathlib.Path`; the catalog's ``path`` column is relative to the home
(``disks/<id>.bcd``, ``snapshots/<id>.bcd``).

The whole-file ``flock`` taken by :meth:`FileStore.locked` is the lock the
nbdkit plugin holds while it serves a container (exclusive read-write, shared
read-only); the header's own byte-range lock (:mod:`.container`) is
independent of it.

This module owns no policy: it must not touch catalog rows (beyond what
:func:`.publish.recover_dir` checks), keys or processes other than its own.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from .. import errors
from ..system import proc
from . import container, fastcopy, publish
from .header import Header
from .home import fsync_dir, private_umask, resolve_inside
from .store import ContainerLock, Store

CONTAINER_DIRS = ("disks", "snapshots")   # the catalog tables, and their folders
LOCK_POLL_S = 0.1   # how often locked() retries a lock held by someone else


def allocated_bytes(path: Path) -> int:
    """Bytes allocated to the file (st_blocks): holes are not counted; extents
    shared by reflink count in every file that shares them."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class FileLock(ContainerLock):
    """An open container file (``fd``) and whether its flock is held."""

    def __init__(self, path: Path, fd: int, *, held: bool, exclusive: bool):
        self.path = path
        self.fd = fd
        self.held = held
        self.exclusive = exclusive

    def __repr__(self) -> str:
        return f"FileLock({str(self.path)!r}, held={self.held}, exclusive={self.exclusive})"


class FileStore(Store[Path]):
    """Containers as files under ``root`` (the blockcrypt home)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._owner: tuple[int, int] | None = None   # (pid, start time) of this process

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # -- naming ----------------------------------------------------------------
    def new_ref(self, table: str, obj_id: str) -> str:
        return f"{table}/{publish.container_name(obj_id)}"

    def locate(self, ref: str, *, owner: str = "a container") -> Path:
        return resolve_inside(self.root, ref, CONTAINER_DIRS, owner)

    def staging(self, final: Path) -> Path:
        pid = os.getpid()
        if self._owner is None or self._owner[0] != pid:
            self._owner = (pid, proc.process_start_time(pid))
        return publish.tmp_name(final, *self._owner)

    # -- inspecting --------------------------------------------------------------
    def exists(self, loc: Path) -> bool:
        return loc.exists()

    def allocated_bytes(self, loc: Path) -> int:
        return allocated_bytes(loc)

    def read_header(self, loc: Path, *, repair: bool = True) -> Header:
        return container.read_header(loc, repair=repair)

    def write_header(self, loc: Path, header: Header) -> Header:
        return container.write_header(loc, header)

    def restore_header(self, loc: Path, header: Header) -> Header:
        return container.restore_header(loc, header)

    def reserve(self, loc: Path, header: Header) -> None:
        os.truncate(loc, header.file_size_bytes)

    def grow(self, loc: Path, header: Header) -> Header:
        if not header.encrypted:
            return container.grow_container(loc, header.size_bytes)
        return container.grow_container(loc, header.size_bytes, wrapped_dk=header.wrapped_dk,
                                        cmk_version=header.cmk_version)

    # -- creating ------------------------------------------------------------------
    def create(self, staged: Path, header: Header) -> Header:
        with private_umask():
            return container.create_container(staged, header)

    def clone(self, src: Path | ContainerLock, dst: Path) -> str:
        if isinstance(src, ContainerLock):
            if not isinstance(src, FileLock):
                raise TypeError(f"{src!r} is not a container of this store")
            return fastcopy.copy_to_new(src.fd, dst)  # the very file that was locked
        return fastcopy.copy_to_new(src, dst)

    def export(self, loc: Path, dest: Path, *, offset: int, length: int) -> str:
        return fastcopy.copy_file(loc, dest, src_offset=offset, length=length)

    # -- the publish protocol --------------------------------------------------------
    def publish(self, staged: Path, final: Path) -> bool:
        return publish.publish(staged, final)

    def swap(self, staged: Path, final: Path) -> None:
        os.rename(staged, final)
        fsync_dir(final.parent)

    def discard(self, staged: Path) -> None:
        staged.unlink(missing_ok=True)

    def pending(self, final: Path) -> bool:
        return bool(publish.staged_of(final))

    def doom(self, final: Path) -> Path:
        return publish.doom(final)

    def remove(self, doomed: Path) -> None:
        doomed.unlink(missing_ok=True)
        fsync_dir(doomed.parent)

    def recover(self, conn: sqlite3.Connection, table: str) -> list[str]:
        return publish.recover_dir(conn, self.root / table, table)

    # -- locking -----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, loc: Path, *, exclusive: bool,
               timeout_s: float = 0.0) -> Iterator[FileLock]:
        try:
            fd = os.open(loc, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise errors.storage_error(loc, exc, container.CONTAINER_FILE) from None
        try:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, mode)
                    held = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        held = False
                        break
                    time.sleep(LOCK_POLL_S)
            yield FileLock(loc, fd, held=held, exclusive=exclusive)
        finally:
            os.close(fd)                 # releases the flock with the descriptor
