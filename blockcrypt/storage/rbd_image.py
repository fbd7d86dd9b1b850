"""One RBD image as blockcrypt uses it: image names, byte I/O for the header code,
and the exclusive lock that makes one host at a time the disk's server.

An image holds exactly the bytes of a container file (docs/FORMAT.md, "Disks on
Ceph RBD"): :class:`RbdDevice` lets :mod:`.container`'s header code (copy
selection, repair, crash-safe updates) run on an image unchanged.

The server lock is RBD's exclusive lock, taken explicitly (``lock_acquire``), which
turns off librbd's cooperative hand-over: while a server holds it, every other
client's write fails (EROFS) and its ``lock_acquire`` is refused.  Before taking
it, :func:`take_lock` looks for an owner and refuses with
:class:`~blockcrypt.errors.DiskHeld` naming the holder that the holder recorded
in the image metadata ``blockcrypt.holder`` (host, home, pid).  A lock is never
broken implicitly, not even a dead holder's: only :func:`break_lock` (``disk
attach --break-lock``) does, and Ceph then blocklists the old client.
"""
from __future__ import annotations

import os
import re
import socket

from .. import errors
from .ceph import StoreConfig, ceph_error, modules
from .container import ByteDevice

IMAGE_PREFIX = "bc-"                 # bc-<container id hex>
HOLDER_KEY = "blockcrypt.holder"     # image metadata: who serves the disk
MAX_IO_BYTES = 32 * 1024 * 1024


def host_name() -> str:
    """This host's name as markers and holder records use it (no '-' or '.')."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


class RbdDevice(ByteDevice):
    """An open ``rbd.Image`` as the header code's byte device."""

    def __init__(self, image):
        self.image = image

    def read(self, offset: int, length: int) -> bytes:
        size = self.image.size()
        if offset >= size:
            return b""
        return self.image.read(offset, min(length, size - offset))

    def write(self, data: bytes, offset: int) -> None:
        _, rbd = modules()
        try:
            self.image.write(bytes(data), offset)
        except rbd.Error as exc:
            raise OSError(getattr(exc, "errno", None) or 5, str(exc)) from None

    def sync(self) -> None:
        self.image.flush()

    def size(self) -> int:
        return self.image.size()

    def resize(self, size: int) -> None:
        self.image.resize(size)
        self.image.flush()


def holder_text(home: str | None = None) -> str:
    return f"host {socket.gethostname()}, home {home or '?'}, pid {os.getpid()}"


def lock_owners(image) -> list[dict]:
    return list(image.lock_get_owners())


def holder_of(image) -> str:
    """Who holds the image's exclusive lock, as the holder recorded it."""
    _, rbd = modules()
    try:
        return image.metadata_get(HOLDER_KEY)
    except rbd.Error:
        owners = lock_owners(image)
        return f"Ceph client {owners[0]['owner']}" if owners else "unknown"


def _gone_from_this_host(holder: str) -> bool:
    """Whether a holder record (:func:`holder_text`) names a process of this host
    that no longer runs."""
    m = re.fullmatch(r"host (.+), home (.+), pid (\d+)", holder)
    return m is not None and m[1] == socket.gethostname() and \
        not os.path.exists(f"/proc/{m[3]}")


def held_error(disk: str, holder: str) -> errors.DiskHeld:
    """DiskHeld for ``disk``: served elsewhere, or locked by a dead server of this
    host, whose lock stays too (F-41) and is taken over explicitly."""
    take_over = f"`blockcrypt disk attach {disk} --break-lock`"
    if _gone_from_this_host(holder):
        return errors.DiskHeld(
            name=disk, holder=holder,
            state="still locked by a server of this host that is no longer running",
            next_step=f"a lock is never broken implicitly: take the disk over with {take_over}")
    return errors.DiskHeld(name=disk, holder=holder, state="served by another server",
                           next_step="detach it there first, or if that server is dead, "
                                     f"take it over with {take_over}")


def take_lock(cfg: StoreConfig, image, *, disk: str, home: str | None,
              break_lock: bool = False) -> str | None:
    """Acquire the image's exclusive lock for serving ``disk``, or DiskHeld.

    With ``break_lock`` a holder's lock is broken first (Ceph blocklists it);
    returns the holder that was displaced, if any."""
    _, rbd = modules()
    displaced = None
    try:
        owners = lock_owners(image)
        if owners:
            holder = holder_of(image)
            if not break_lock:
                raise held_error(disk, holder)
            for o in owners:
                image.lock_break(o["mode"], o["owner"])
            displaced = holder
        try:
            image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except (rbd.ReadOnlyImage, rbd.ImageBusy):
            raise held_error(disk, holder_of(image)) from None
        image.metadata_set(HOLDER_KEY, holder_text(home))
    except rbd.Error as exc:
        raise ceph_error(cfg, exc, image=image.get_name(), owner=f"disk {disk!r}") from None
    return displaced


def release_lock(image) -> None:
    """Forget the holder record and release the lock (best effort: closing the image,
    or the death of the process, releases it as well)."""
    _, rbd = modules()
    try:
        image.metadata_remove(HOLDER_KEY)
    except rbd.Error:
        pass
    try:
        image.lock_release()
    except rbd.Error:
        pass
