"""A disk kept in an RBD image, opened for serving (:class:`RbdVolume`).

The second :class:`~blockcrypt.storage.volume.Volume`: the image holds the
container bytes (header copies, then the data area at ``data_offset``), read and
written through librbd.  It has no file descriptor (:meth:`raw_file` is None), so
:class:`~blockcrypt.nbd.backend.DiskBackend` serves it through the Python
request path (``nbd/sectors.py``): same XTS layout, tweak rule and zero rule.

Opening read-write takes the image's exclusive lock explicitly
(:func:`~.rbd_image.take_lock`: refused, naming the holder, while any server on
any host holds it; broken only when asked), so two hosts never serve one disk.
Read-only opens take no lock.  An OSD that does not answer within the store's
I/O timeout (``StoreConfig.io_timeout_s``, default
:data:`~.ceph.SERVE_OSD_TIMEOUT_S`) fails the request with an errno the client
sees, never a silent success.
"""
from __future__ import annotations

import errno

from . import container
from .ceph import StoreConfig, ceph_error, connect, modules, open_pool
from .rbd_image import RbdDevice, release_lock, take_lock
from .volume import Volume


def _os_error(exc: BaseException) -> OSError:
    code = abs(getattr(exc, "errno", 0) or 0) or errno.EIO
    return OSError(code, f"RBD: {exc}")


class RbdVolume(Volume):
    """The image ``image`` of the store ``cfg``, served as disk ``disk``."""

    def __init__(self, cfg: StoreConfig, image: str, *, read_only: bool, disk: str = "",
                 home: str | None = None, break_lock: bool = False):
        _, rbd = modules()
        self.name = f"rbd:{cfg.name}/{image}"
        self.read_only = read_only
        self.displaced: str | None = None
        self._cluster = connect(cfg, osd_timeout_s=cfg.io_timeout_s)
        self._ioctx = self._image = None
        try:
            self._ioctx = open_pool(cfg, self._cluster)
            try:
                self._image = rbd.Image(self._ioctx, image, read_only=read_only)
            except rbd.Error as exc:
                raise ceph_error(cfg, exc, image=image, owner=f"disk {disk!r}") from None
            if not read_only:
                self.displaced = take_lock(cfg, self._image, disk=disk or image, home=home,
                                           break_lock=break_lock)
            self.header = container.read_header_on(RbdDevice(self._image), self.name,
                                                   repair=not read_only)
        except BaseException:
            self.close()
            raise
        self._base = self.header.data_offset
        self._end = self._base + self.header.size_bytes
        self._read = self._image.read
        self._write = self._image.write
        self._error = rbd.Error

    def pread_into(self, view: memoryview, offset: int) -> None:
        try:
            data = self._read(self._base + offset, len(view))
        except self._error as exc:
            raise _os_error(exc) from None
        n = len(data)
        view[:n] = data
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    def pwrite(self, view: memoryview, offset: int) -> None:
        try:
            self._write(bytes(view), self._base + offset)
        except self._error as exc:
            raise _os_error(exc) from None

    def flush(self) -> None:
        try:
            self._image.flush()
        except self._error as exc:
            raise _os_error(exc) from None

    def deallocate(self, offset: int, length: int) -> None:
        try:
            self._image.discard(self._base + offset, length)
        except self._error as exc:
            raise _os_error(exc) from None

    def extents(self, offset: int, count: int, max_runs: int) -> list[tuple[int, int, bool]]:
        """Runs from librbd's diff of the image (with its parent's data): unlisted
        ranges are holes (they read as zeros)."""
        base = self._base
        start, end = base + offset, base + offset + count
        data: list[tuple[int, int]] = []

        def found(off: int, length: int, exists: bool) -> int:
            if exists:
                data.append((off, length))
            return 0
        try:
            self._image.diff_iterate(start, count, None, found, include_parent=True)
        except self._error as exc:
            raise _os_error(exc) from None
        out: list[tuple[int, int, bool]] = []
        pos = start
        for off, length in sorted(data):
            off, stop = max(off, start), min(off + length, end)
            if stop <= pos:
                continue
            if off > pos:
                out.append((pos - base, off - pos, True))
            out.append((max(off, pos) - base, stop - max(off, pos), False))
            pos = stop
        if pos < end:
            out.append((pos - base, end - pos, True))
        merged: list[tuple[int, int, bool]] = []
        for run in out:
            if merged and merged[-1][2] == run[2] and merged[-1][0] + merged[-1][1] == run[0]:
                merged[-1] = (merged[-1][0], merged[-1][1] + run[1], run[2])
            else:
                merged.append(run)
        return merged[:max_runs]

    def close(self) -> None:
        image, ioctx, cluster = self._image, self._ioctx, self._cluster
        self._image = self._ioctx = self._cluster = None
        if image is not None:
            if not self.read_only:
                release_lock(image)
            image.close()
        if ioctx is not None:
            ioctx.close()
        if cluster is not None:
            cluster.shutdown()

    def __repr__(self) -> str:
        return f"<RbdVolume {self.name} read_only={self.read_only}>"
