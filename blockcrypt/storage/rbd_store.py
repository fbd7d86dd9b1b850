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
no keys, no processes.  It is over 500 lines and kept whole: it is one
class implementing one contract (:class:`~.store.Store`), and splitting the
publish/recover half from the rest would separate the naming rules both halves
share.
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
EXPORT_CHUNK_BYTES = 4 * 1024 * 1024
SPARSE_BLOCK_BYTES = 4096        # an export leaves all-zero blocks of this size as holes
_ZERO_BLOCK = bytes(SPARSE_BLOCK_BYTES)
TMP_MARK = ".tmp-"
DELETED_MARK = ".deleted-"
# Image features: layering (clones), exclusive-lock (one server), object-map and
# fast-diff (cheap extents and allocated-bytes), deep-flatten.
FEATURES_NAMES = ("RBD_FEATURE_LAYERING", "RBD_FEATURE_EXCLUSIVE_LOCK",
                  "RBD_FEATURE_OBJECT_MAP", "RBD_FEATURE_FAST_DIFF", "RBD_FEATURE_DEEP_FLATTEN")


def _abandoned(staged_name: str) -> bool:
    """Whether the process whose pid and start time end a staged name is gone
    (an unparseable name is not ours to touch)."""
    try:
        pid, start = (int(x) for x in staged_name.rsplit("-", 2)[1:])
    except ValueError:
        return False
    return not proc.process_alive(pid, start)


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


def write_nonzero(fd: int, data: bytes, pos: int) -> None:
    """pwrite ``data`` at ``pos`` except its all-zero 4 KiB blocks, which stay holes
    (as `rbd export` does): an RBD object is 4 MiB, a file system block 4 KiB."""
    run = None                                   # start of the current non-zero run
    for i in range(0, len(data) + SPARSE_BLOCK_BYTES, SPARSE_BLOCK_BYTES):
        block = data[i:i + SPARSE_BLOCK_BYTES]
        if block and block != _ZERO_BLOCK[:len(block)]:
            run = i if run is None else run
        elif run is not None:
            os.pwrite(fd, data[run:i], pos + run)
            run = None


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
                or not all(c.isalnum() or c in "-_." for c in parsed[1] + (parsed[2] or ""))):
            raise errors.CatalogTampered(what=owner, path=ref, where=f"the RBD store "
                                         f"{self.cfg.name!r}", home="(this host)")
        return RbdLoc(parsed[0], parsed[1], parsed[2], owner)

    def staging(self, final: RbdLoc) -> RbdLoc:
        pid = os.getpid()
        mark = f"{TMP_MARK}{host_name()}-{pid}-{proc.process_start_time(pid)}"
        if final.snap is not None:      # a snapshot is staged under a temporary snap name
            return RbdLoc(final.store, final.image, final.snap + mark, final.owner)
        return final.named(final.image + mark)

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
            if lock_owners(img):     # only the lock owner may write the header (F-40)
                raise errors.StateError(detail=f"{loc.owner} is served (on this or another "
                                        "host); a disk on Ceph grows while detached: detach "
                                        "it, resize, attach again")
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
        """An RBD clone of a snapshot (protected first, as RBD requires): thin, the
        parent's objects shared until written."""
        if isinstance(src, ContainerLock) or src.snap is None:
            raise errors.InvalidInput(detail="an RBD image is copied through a snapshot: "
                                             "snapshot the disk, then create a disk from it")
        _, rbd = modules()
        with self.image(src) as img:
            if not img.is_protected_snap(src.snap):
                img.protect_snap(src.snap)
        with self._guard(src):
            rbd.RBD().clone(self.ioctx, src.image, src.snap, self.ioctx, dst.image,
                            features=features())
        return "rbd-clone"

    def has_parent(self, loc: RbdLoc) -> bool:
        """Is the image a clone that still reads from its parent snapshot?"""
        _, rbd = modules()
        with self.image(loc, read_only=True) as img:
            try:
                img.parent_info()
            except rbd.ImageNotFound:    # librbd's answer for "no parent"
                return False
            return True

    def flatten(self, loc: RbdLoc) -> None:
        """Copy a clone's data from its parent snapshot into it (RBD flatten): the
        image then no longer depends on the snapshot."""
        with self.image(loc) as img:
            img.flatten()

    def export(self, loc: RbdLoc, dest: Path, *, offset: int, length: int) -> str:
        """Bytes of the image (or snapshot) to a new sparse file, complete or absent."""
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with self.image(loc, read_only=True) as img:
                chunk = EXPORT_CHUNK_BYTES
                for pos in range(0, length, chunk):
                    write_nonzero(fd, img.read(offset + pos, min(chunk, length - pos)), pos)
            os.ftruncate(fd, length)
            os.fsync(fd)
            if os.path.lexists(dest):
                raise errors.AlreadyExists(what="file", name=str(dest))
            os.rename(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return "sparse"

    # -- snapshots (an RbdLoc with ``snap``) ------------------------------------------
    def snapshot(self, staged: RbdLoc) -> None:
        """Take the RBD snapshot ``staged.snap`` of the image (the lock owner, if
        the disk is served, flushes its cache and takes it: no copy)."""
        with self.image(staged.named(staged.image)) as img:
            img.create_snap(staged.snap)

    def snapshots_of(self, loc: RbdLoc) -> list[str]:
        with self.image(loc.named(loc.image), read_only=True) as img:
            return [s["name"] for s in img.list_snaps()]

    def children_of(self, loc: RbdLoc) -> list[str]:
        """Images cloned from the snapshot ``loc`` (they depend on it)."""
        try:
            with self.image(loc, read_only=True) as img:
                return sorted(c["image"] for c in img.list_children2())
        except errors.ImageMissing:
            return []

    def rollback(self, loc: RbdLoc) -> None:
        """The image back to its snapshot ``loc.snap`` (nobody may serve it)."""
        with self.image(loc.named(loc.image)) as img:
            img.rollback_to_snap(loc.snap)

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

    def _rename_snap(self, image: RbdLoc, old: str, new: str) -> bool:
        """rbd snap rename on ``image``'s image; False if it or the snapshot is missing."""
        _, rbd = modules()
        try:
            with self.image(image.named(image.image)) as img:
                img.rename_snap(old, new)
            return True
        except (errors.ImageMissing, rbd.ImageNotFound):
            return False

    def publish(self, staged: RbdLoc, final: RbdLoc) -> bool:
        if final.snap is not None:
            return self._rename_snap(final, staged.snap, final.snap)
        return self._rename(staged.image, final.image)

    def swap(self, staged: RbdLoc, final: RbdLoc) -> None:
        """Replace ``final`` by ``staged`` (reinit): ``final`` is renamed to its doomed
        name, ``staged`` into place, then the old image removed.  A crash in between
        leaves the old or the new image once :meth:`recover` ran.  Refused while
        ``final`` has snapshots (they belong to that image)."""
        snaps = self._snaps_or_empty(final)
        if snaps:
            raise errors.StateError(detail=f"{final.owner} has RBD snapshots "
                                    f"({', '.join(snaps)}); delete them first")
        doomed = final.named(f"{final.image}{DELETED_MARK}{host_name()}")
        if not self._rename(final.image, doomed.image):
            raise errors.ImageMissing(image=final.image, owner=final.owner, store=final.store)
        if not self._rename(staged.image, final.image):
            self._rename(doomed.image, final.image)
            raise errors.StateError(detail=f"the new image of {final.owner} disappeared; "
                                    "nothing was changed")
        self.remove(doomed)

    def discard(self, staged: RbdLoc) -> None:
        self.remove(staged)

    def _staged_of(self, final: RbdLoc) -> list[str]:
        if final.snap is not None:
            try:
                return sorted(n for n in self.snapshots_of(final)
                              if n.startswith(final.snap + TMP_MARK))
            except errors.ImageMissing:
                return []
        return sorted(n for n in self.images() if n.startswith(final.image + TMP_MARK))

    def pending(self, final: RbdLoc) -> bool:
        return bool(self._staged_of(final))

    def doom(self, final: RbdLoc) -> RbdLoc:
        if final.snap is not None:      # a snapshot: removed after the commit, if no clone
            children = self.children_of(final)
            if children:
                raise errors.StateError(detail=f"{final.owner} has clones: "
                                        f"{', '.join(children)}; delete those disks first")
            doomed = RbdLoc(final.store, final.image, f"{final.snap}{DELETED_MARK}{host_name()}",
                            owner=final.owner)
            self._rename_snap(final, final.snap, doomed.snap)   # missing: just drop the row
            return doomed
        names = self._snaps_or_empty(final)
        if names:
            raise errors.StateError(detail=f"{final.owner} has RBD snapshots: "
                                    f"{', '.join(names)}; delete its snapshots first")
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

    def _snaps_or_empty(self, loc: RbdLoc) -> list[str]:
        try:
            return self.snapshots_of(loc)
        except errors.ImageMissing:
            return []

    def remove(self, doomed: RbdLoc) -> None:
        _, rbd = modules()
        if doomed.snap is not None:
            try:
                with self.image(doomed.named(doomed.image)) as img:
                    if doomed.snap not in [s["name"] for s in img.list_snaps()]:
                        return
                    if img.is_protected_snap(doomed.snap):
                        img.unprotect_snap(doomed.snap)
                    img.remove_snap(doomed.snap)
            except errors.ImageMissing:
                pass
            return
        try:
            rbd.RBD().remove(self.ioctx, doomed.image)
        except rbd.ImageNotFound:
            pass
        except rbd.Error as exc:
            raise ceph_error(self.cfg, exc, image=doomed.image, owner=doomed.owner) from None

    def _recover_snapshots(self, conn: sqlite3.Connection) -> list[str]:
        """Snapshots staged by this host's dead processes on the images of this store's
        disks: published if their row committed, removed otherwise; and snapshots this
        host doomed: removed if their delete committed, renamed back otherwise."""
        host, actions = host_name(), []
        prefix = f"{REF_PREFIX}{self.cfg.name}/"
        for (ref,) in conn.execute("SELECT path FROM disks WHERE path LIKE ?",
                                   (prefix + "%",)).fetchall():
            disk = self.locate(ref)
            snaps = self._snaps_or_empty(disk)
            for name in [n for n in snaps if n.endswith(f"{DELETED_MARK}{host}")]:
                final = RbdLoc(disk.store, disk.image, name.split(DELETED_MARK, 1)[0])
                with db.write_txn(conn):   # a delete still in its transaction ends first
                    row = conn.execute("SELECT 1 FROM snapshots WHERE id = ? AND path = ?",
                                       (final.snap, str(final))).fetchone()
                    if row is not None:
                        self._rename_snap(disk, name, final.snap)
                        actions.append(f"restored {final} (delete did not commit)")
                    else:
                        self.remove(RbdLoc(disk.store, disk.image, name))
                        actions.append(f"removed deleted {disk}@{name}")
            staged = [n for n in snaps if f"{TMP_MARK}{host}-" in n]
            for name in staged:
                if not _abandoned(name):
                    continue
                final = RbdLoc(disk.store, disk.image, name.split(TMP_MARK, 1)[0])
                with db.write_txn(conn):
                    row = conn.execute("SELECT 1 FROM snapshots WHERE id = ? AND path = ?",
                                       (final.snap, str(final))).fetchone()
                    if row is not None:
                        self.publish(RbdLoc(disk.store, disk.image, name), final)
                        actions.append(f"completed creation of {final}")
                    else:
                        self.remove(RbdLoc(disk.store, disk.image, name))
                        actions.append(f"removed unfinished {disk}@{name}")
        return actions

    def recover(self, conn: sqlite3.Connection, table: str) -> list[str]:
        """This host's markers only (see the module doc); under the write lock."""
        assert table in ("disks", "snapshots")   # interpolated into SQL below
        if table == "snapshots":
            return self._recover_snapshots(conn)
        host = host_name()
        mine = [n for n in self.images() if n.startswith(IMAGE_PREFIX) and (
            f"{TMP_MARK}{host}-" in n or n.endswith(f"{DELETED_MARK}{host}"))]
        if not mine:
            return []
        actions = []
        with db.write_txn(conn):
            for name in sorted(mine, key=lambda n: DELETED_MARK in n):   # staged first
                live = set(self.images())
                obj_id = name[len(IMAGE_PREFIX):].split(".", 1)[0]
                final = f"{IMAGE_PREFIX}{obj_id}"
                ref = f"{REF_PREFIX}{self.cfg.name}/{final}"
                has_row = conn.execute(f"SELECT 1 FROM {table} WHERE id = ? AND path = ?",
                                       (obj_id, ref)).fetchone() is not None
                loc = RbdLoc(self.cfg.name, name)
                if TMP_MARK in name:
                    if not _abandoned(name):
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
                elif has_row:      # the old image of a reinit whose new one is in place
                    self.remove(loc)
                    actions.append(f"removed replaced {REF_PREFIX}{self.cfg.name}/{name}")
                else:
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
