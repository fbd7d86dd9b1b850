"""The RBD store: containers as images in one pool of a Ceph cluster.

Implements :class:`~blockcrypt.storage.store.Store` for one row of the
``stores`` table (:class:`~blockcrypt.storage.ceph.StoreConfig`).  A location is
an :class:`RbdLoc`; the catalog reference (a row's ``path``) is
``rbd:<store>/<image>`` (``<image>`` = ``bc-<container id>``, docs/FORMAT.md).
The image holds the container's bytes, so the header code of
:mod:`.container` runs on it through :class:`~.rbd_image.RbdDevice`.

The publish protocol of :mod:`.store` maps onto ``rbd rename``, which is atomic:

- staged: ``bc-<id>.tmp-<host>-<pid>-<start>``; published by renaming it to ``bc-<id>``;
- doomed: ``bc-<id>.deleted-<host>``; removed after the delete committed.

Markers carry the host name, because several hosts share a pool: :meth:`recover`
only ever acts on this host's markers (a process of another host cannot be
checked for life, and its catalog is not ours).

This module owns no policy: no catalog rows beyond what :meth:`recover` checks,
no keys, no processes.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import errors
from ..system import proc
from . import container, db
from .ceph import StoreConfig, ceph_error, connect, modules, open_pool
from .header import Header
from .rbd_image import IMAGE_PREFIX, RbdDevice, holder_of, host_name, lock_owners
from .store import ContainerLock, Store

REF_PREFIX = "rbd:"
TMP_MARK = ".tmp-"
DELETED_MARK = ".deleted-"
# Image features: layering (clones), exclusive-lock (one server), object-map and
# fast-diff (cheap extents and allocated-bytes), deep-flatten.
FEATURES_NAMES = ("RBD_FEATURE_LAYERING", "RBD_FEATURE_EXCLUSIVE_LOCK",
                  "RBD_FEATURE_OBJECT_MAP", "RBD_FEATURE_FAST_DIFF", "RBD_FEATURE_DEEP_FLATTEN")


@dataclass(frozen=True)
class RbdLoc:
    """An image (or an image's snapshot) in a store; ``owner`` names it in errors."""

    store: str
    image: str
    snap: str | None = None
    owner: str = field(default="a container", compare=False)

    def __str__(self) -> str:
        return f"{REF_PREFIX}{self.store}/{self.image}" + (f"@{self.snap}" if self.snap else "")

    def named(self, image: str) -> RbdLoc:
        return RbdLoc(self.store, image, None, self.owner)


def parse_ref(ref: str) -> tuple[str, str, str | None] | None:
    """``(store, image, snap)`` of an ``rbd:`` reference, None if it is not one."""
    if not ref.startswith(REF_PREFIX) or "/" not in ref:
        return None
    store, rest = ref[len(REF_PREFIX):].split("/", 1)
    image, _, snap = rest.partition("@")
    return store, image, snap or None


def features() -> int:
    _, rbd = modules()
    out = 0
    for name in FEATURES_NAMES:
        out |= getattr(rbd, name)
    return out


class RbdLock(ContainerLock):
    """An open image and whether no server holds its exclusive lock."""

    def __init__(self, loc: RbdLoc, image, *, held: bool, exclusive: bool):
        self.loc, self.image, self.held, self.exclusive = loc, image, held, exclusive


class RbdStore(Store[RbdLoc]):
    """Containers as images of one pool (``cfg``); connects on first use."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        self._cluster = None
        self._ioctx = None

    def __repr__(self) -> str:
        return f"RbdStore({self.cfg.name!r})"

    # -- the connection ------------------------------------------------------------
    @property
    def ioctx(self):
        if self._ioctx is None:
            cluster = connect(self.cfg)
            try:
                self._ioctx = open_pool(self.cfg, cluster)
            except BaseException:
                cluster.shutdown()
                raise
            self._cluster = cluster
        return self._ioctx

    def close(self) -> None:
        ioctx, cluster, self._ioctx, self._cluster = self._ioctx, self._cluster, None, None
        if ioctx is not None:
            ioctx.close()
        if cluster is not None:
            cluster.shutdown()

    def check(self) -> None:
        """Connect and open the pool: StoreUnreachable, StoreAuthRefused, PoolMissing."""
        _ = self.ioctx
        try:
            modules()[1].RBD().list(self.ioctx)      # the user may use RBD in this pool
        except modules()[1].Error as exc:
            raise ceph_error(self.cfg, exc) from None

    @contextlib.contextmanager
    def _guard(self, loc: RbdLoc | None = None) -> Iterator[None]:
        rados, rbd = modules()
        try:
            yield
        except (rados.Error, rbd.Error) as exc:
            raise ceph_error(self.cfg, exc, image=loc.image if loc else None,
                             owner=loc.owner if loc else None) from None

    @contextlib.contextmanager
    def image(self, loc: RbdLoc, *, read_only: bool = False) -> Iterator:
        """The open ``rbd.Image`` at ``loc`` (ImageMissing if it is not there)."""
        _, rbd = modules()
        with self._guard(loc):
            img = rbd.Image(self.ioctx, loc.image, snapshot=loc.snap, read_only=read_only)
        try:
            with self._guard(loc):
                yield img
        finally:
            img.close()

    def images(self) -> list[str]:
        _, rbd = modules()
        with self._guard():
            return list(rbd.RBD().list(self.ioctx))

    # -- naming ----------------------------------------------------------------------
    def new_ref(self, table: str, obj_id: str) -> str:
        return f"{REF_PREFIX}{self.cfg.name}/{IMAGE_PREFIX}{obj_id}"

    def locate(self, ref: str, *, owner: str = "a container") -> RbdLoc:
        parsed = parse_ref(ref)
        if (parsed is None or parsed[0] != self.cfg.name or not parsed[1].startswith(IMAGE_PREFIX)
                or not all(c.isalnum() or c in "-_." for c in parsed[1])):
            raise errors.CatalogTampered(what=owner, path=ref, where=f"the RBD store "
                                         f"{self.cfg.name!r}", home="(this host)")
        return RbdLoc(parsed[0], parsed[1], parsed[2], owner)

    def staging(self, final: RbdLoc) -> RbdLoc:
        pid = os.getpid()
        return final.named(f"{final.image}{TMP_MARK}{host_name()}-{pid}-"
                           f"{proc.process_start_time(pid)}")

    # -- inspecting ------------------------------------------------------------------
    def exists(self, loc: RbdLoc) -> bool:
        _, rbd = modules()
        try:
            with self.image(loc, read_only=True):
                return True
        except errors.ImageMissing:
            return False

    def allocated_bytes(self, loc: RbdLoc) -> int:
        total = 0

        def count(_offset, length, exists):
            nonlocal total
            total += length if exists else 0
        try:
            with self.image(loc, read_only=True) as img:
                img.diff_iterate(0, img.size(), None, count)
        except errors.ImageMissing:
            return 0
        return total

    def read_header(self, loc: RbdLoc, *, repair: bool = True) -> Header:
        writable = repair and loc.snap is None
        with self.image(loc, read_only=not writable) as img:
            dev = RbdDevice(img)
            if writable and lock_owners(img):
                writable = False          # served: only the server writes
            return container.read_header_on(dev, str(loc), repair=writable)

    def write_header(self, loc: RbdLoc, header: Header) -> Header:
        with self.image(loc) as img:
            return container.write_header_on(RbdDevice(img), str(loc), header)

    def restore_header(self, loc: RbdLoc, header: Header) -> Header:
        with self.image(loc) as img:
            return container.restore_header_on(RbdDevice(img), str(loc), header)

    def reserve(self, loc: RbdLoc, header: Header) -> None:
        with self.image(loc) as img:
            if img.size() < header.file_size_bytes:
                img.resize(header.file_size_bytes)

    def grow(self, loc: RbdLoc, header: Header) -> Header:
        with self.image(loc) as img:
            return container.grow_on(RbdDevice(img), str(loc), header.size_bytes,
                                     wrapped_dk=header.wrapped_dk if header.encrypted else None,
                                     cmk_version=header.cmk_version if header.encrypted
                                     else None)

    # -- creating --------------------------------------------------------------------
    def create(self, staged: RbdLoc, header: Header) -> Header:
        _, rbd = modules()
        stored = header.replace(seq=0)
        raw = container.encode_copy(stored)
        with self._guard(staged):
            try:
                rbd.RBD().create(self.ioctx, staged.image, stored.file_size_bytes,
                                 old_format=False, features=features())
            except rbd.ImageExists:
                raise errors.AlreadyExists(what="image", name=str(staged)) from None
        try:
            with self.image(staged) as img:
                container.write_new_copies(RbdDevice(img), raw)
        except BaseException:
            self.discard(staged)
            raise
        return stored

    def clone(self, src: RbdLoc | ContainerLock, dst: RbdLoc) -> str:
        raise errors.InvalidInput(detail="copying a container within an RBD store is not "
                                         "supported yet")

    def export(self, loc: RbdLoc, dest: Path, *, offset: int, length: int) -> str:
        raise errors.InvalidInput(detail="exporting from an RBD store is not supported yet")

    # -- the publish protocol ----------------------------------------------------------
    def _rename(self, old: str, new: str) -> bool:
        """rbd rename; False if ``old`` is missing."""
        _, rbd = modules()
        try:
            rbd.RBD().rename(self.ioctx, old, new)
            return True
        except rbd.ImageNotFound:
            return False
        except rbd.Error as exc:
            raise ceph_error(self.cfg, exc, image=old) from None

    def publish(self, staged: RbdLoc, final: RbdLoc) -> bool:
        return self._rename(staged.image, final.image)

    def swap(self, staged: RbdLoc, final: RbdLoc) -> None:
        raise errors.InvalidInput(detail="replacing an RBD disk's image is not supported yet")

    def discard(self, staged: RbdLoc) -> None:
        self.remove(staged)

    def _staged_of(self, final: RbdLoc) -> list[str]:
        return sorted(n for n in self.images() if n.startswith(final.image + TMP_MARK))

    def pending(self, final: RbdLoc) -> bool:
        return bool(self._staged_of(final))

    def doom(self, final: RbdLoc) -> RbdLoc:
        doomed = final.named(f"{final.image}{DELETED_MARK}{host_name()}")
        for _ in range(100):
            if self._rename(final.image, doomed.image):
                return doomed
            temps = self._staged_of(final)
            if not temps:
                return doomed       # no image at all (left to the operator): drop the row
            if self._rename(temps[0], doomed.image):
                return doomed
        raise errors.StateError(detail=f"{final} keeps changing; retry the delete")

    def remove(self, doomed: RbdLoc) -> None:
        _, rbd = modules()
        try:
            rbd.RBD().remove(self.ioctx, doomed.image)
        except rbd.ImageNotFound:
            pass
        except rbd.Error as exc:
            raise ceph_error(self.cfg, exc, image=doomed.image, owner=doomed.owner) from None

    def recover(self, conn: sqlite3.Connection, table: str) -> list[str]:
        """This host's markers only (see the module doc); under the write lock."""
        assert table in ("disks", "snapshots")   # interpolated into SQL below
        host = host_name()
        mine = [n for n in self.images() if n.startswith(IMAGE_PREFIX) and (
            f"{TMP_MARK}{host}-" in n or n.endswith(f"{DELETED_MARK}{host}"))]
        if not mine:
            return []
        actions = []
        live = set(self.images())
        with db.write_txn(conn):
            for name in mine:
                obj_id = name[len(IMAGE_PREFIX):].split(".", 1)[0]
                final = f"{IMAGE_PREFIX}{obj_id}"
                ref = f"{REF_PREFIX}{self.cfg.name}/{final}"
                has_row = conn.execute(f"SELECT 1 FROM {table} WHERE id = ? AND path = ?",
                                       (obj_id, ref)).fetchone() is not None
                loc = RbdLoc(self.cfg.name, name)
                if TMP_MARK in name:
                    try:
                        pid, start = (int(x) for x in name.rsplit("-", 2)[1:])
                    except ValueError:
                        continue
                    if proc.process_alive(pid, start):
                        continue
                    if has_row and final not in live:
                        self._rename(name, final)
                        actions.append(f"completed creation of {ref}")
                    else:
                        self.remove(loc)
                        actions.append(f"removed unfinished {REF_PREFIX}{self.cfg.name}/{name}")
                elif has_row and final not in live:
                    self._rename(name, final)
                    actions.append(f"restored {ref} (delete did not commit)")
                elif not has_row:
                    self.remove(loc)
                    actions.append(f"removed deleted {REF_PREFIX}{self.cfg.name}/{name}")
        return actions

    # -- locking -----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, loc: RbdLoc, *, exclusive: bool,
               timeout_s: float = 0.0) -> Iterator[RbdLock]:
        """``held`` is whether no server holds the image's exclusive lock (a
        server on any host); the image stays open for the block.  (Opened
        read-write only to list the lock's owners: nothing is written, and the
        lock is not requested.)"""
        with self.image(loc) as img:
            yield RbdLock(loc, img, held=not lock_owners(img), exclusive=exclusive)

    def holder(self, loc: RbdLoc) -> str | None:
        """Who serves the image (holder record), None if nobody does."""
        with self.image(loc) as img:
            return holder_of(img) if lock_owners(img) else None
