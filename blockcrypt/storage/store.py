"""The storage seam, management half: what the services may do to a container.

A :class:`Store` keeps containers (docs/FORMAT.md) at *locations* it chooses:
for :class:`~blockcrypt.storage.file_store.FileStore` a location is a path
under the blockcrypt home; :class:`~blockcrypt.storage.rbd_store.RbdStore` uses
image names of a Ceph RBD pool.  The
services (``blockcrypt.services``) create, copy, lock, update and remove
containers only through this interface and keep everything else (catalog rows,
crash points, key wrapping, error messages about disks) to themselves, so a
second store is added without touching them.  The I/O half, a served disk's
open/read/write/flush/punch, is :mod:`blockcrypt.storage.volume`.

This module owns the contract only; it must not import a concrete store, the
catalog's tables, the key store or anything of nbdkit.

The contract, in the spirit of sops's ``keys.MasterKey``: every method is
small, documented by what it guarantees, and raises only
:class:`~blockcrypt.errors.BlockcryptError` subclasses (NotFound, AlreadyExists,
NoSpace, StorageError, the FormatError family) unless it says otherwise.

Life of a new container (the crash-safe create of :mod:`.publish`)::

    staged = store.staging(final)          # private to this process
    store.create(staged, header)           # or store.clone(src, staged)
    ... commit the catalog row ...         # (on failure: store.discard(staged))
    store.publish(staged, final)           # False: a delete doomed it meanwhile

and of its removal::

    with db.write_txn(conn):
        doomed = store.doom(final)         # out of the way, inside the transaction
        ... delete the row ...
    store.remove(doomed)                   # after the commit

Every command first calls :meth:`Store.recover`, which finishes or undoes
what a killed process left between those steps.
"""
from __future__ import annotations

import abc
import contextlib
import sqlite3
from pathlib import Path
from typing import Generic, TypeVar

from .header import Header

#: A location in a store (FileStore: a :class:`pathlib.Path`).
L = TypeVar("L")


class ContainerLock(abc.ABC):
    """An open container and, if :attr:`held`, its whole-file lock.

    The lock is the one a server takes while it serves the container
    (exclusive read-write, shared read-only): holding it shared keeps every
    writer out, holding it exclusive keeps every server out.  A handle whose
    lock was not granted still names the very container that was opened, so
    :meth:`Store.clone` can copy it (e.g. with I/O paused by other means).
    """

    #: Whether the lock was granted.
    held: bool
    #: Whether it was asked for exclusive (True) or shared (False).
    exclusive: bool


class Store(abc.ABC, Generic[L]):
    """Where containers live, and the operations the services need on them."""

    def check(self) -> None:
        """Raise if the store cannot be used now (a cluster unreachable, a pool
        missing); the home's files always can."""

    # -- naming ----------------------------------------------------------------
    @abc.abstractmethod
    def new_ref(self, table: str, obj_id: str) -> str:
        """The catalog reference (a row's ``path``) for a new container with id
        ``obj_id`` whose row goes into ``table`` (``disks`` or ``snapshots``)."""

    @abc.abstractmethod
    def locate(self, ref: str, *, owner: str = "a container") -> L:
        """The location of the container the catalog records as ``ref`` (a
        row's ``path``, e.g. ``disks/<id>.bcd``) for ``owner`` (``"disk 'db'"``).
        CatalogTampered if ``ref`` names anything outside the store."""

    @abc.abstractmethod
    def staging(self, final: L) -> L:
        """Where this process builds the container that will become ``final``
        (a new one, or the replacement of an existing one).  Only this process
        uses it while it lives; :meth:`recover` handles it once it is gone."""

    # -- inspecting --------------------------------------------------------------
    @abc.abstractmethod
    def exists(self, loc: L) -> bool:
        """Whether a container is at ``loc``."""

    @abc.abstractmethod
    def allocated_bytes(self, loc: L) -> int:
        """Bytes of storage the container occupies (0 if it is missing): holes
        are not counted; extents shared with a clone count in each."""

    @abc.abstractmethod
    def read_header(self, loc: L, *, repair: bool = True) -> Header:
        """The container's winning header (FORMAT.md F-22).  With ``repair``,
        a damaged or stale copy is rewritten when the container is writable
        (F-24).  NotFound if missing, the FormatError family if malformed."""

    @abc.abstractmethod
    def write_header(self, loc: L, header: Header) -> Header:
        """Replace the header crash-safely (F-25, F-26): at every instant one
        copy holds the old or the new header.  Returns the stored header
        (seq = old seq + 1; ``header.seq`` is ignored)."""

    @abc.abstractmethod
    def restore_header(self, loc: L, header: Header) -> Header:
        """Put ``header`` (from a header backup) back into the container, even when no
        copy in it is valid (F-37); crash-safe like :meth:`write_header`."""

    @abc.abstractmethod
    def reserve(self, loc: L, header: Header) -> None:
        """Make the container large enough for ``header``'s data area, before
        :meth:`write_header` stores a larger size (growth only; a staged copy)."""

    @abc.abstractmethod
    def grow(self, loc: L, header: Header) -> Header:
        """Grow the container in place to ``header.size_bytes`` (growth only, F-29): the
        data area is extended first, then the header is updated crash-safely (both
        copies, F-25); ``header`` carries the DK re-wrapped for the new key context.
        Returns the header as stored.  InvalidSize if it would shrink."""

    # -- creating ------------------------------------------------------------------
    @abc.abstractmethod
    def create(self, staged: L, header: Header) -> Header:
        """A new, empty (sparse) container at ``staged`` holding ``header``
        with seq 0; durable when it returns.  AlreadyExists if ``staged`` is
        taken; on failure nothing is left behind."""

    @abc.abstractmethod
    def clone(self, src: L | ContainerLock, dst: L) -> str:
        """A thin copy of the container ``src`` (a location, or an open
        container from :meth:`locked`) as the new container ``dst``; durable
        when it returns.  The bytes are copied as stored (ciphertext stays
        ciphertext); the caller keeps ``src`` still meanwhile.  Returns how:
        ``"reflink"`` (shared extents) or ``"sparse"`` (data copied, holes
        skipped).  NotFound if ``src`` is missing; on failure ``dst`` is
        removed."""

    @abc.abstractmethod
    def export(self, loc: L, dest: Path, *, offset: int, length: int) -> str:
        """Copy bytes [offset, offset + length) of the container to a new local
        file ``dest``, atomically (complete or absent); AlreadyExists if
        ``dest`` exists.  Returns the method, as :meth:`clone`."""

    # -- the publish protocol (see the module doc and :mod:`.publish`) -----------
    @abc.abstractmethod
    def publish(self, staged: L, final: L) -> bool:
        """Move a staged container whose catalog row committed to ``final``,
        durably.  False if a concurrent delete took it first (:meth:`doom`)."""

    @abc.abstractmethod
    def swap(self, staged: L, final: L) -> None:
        """Replace the existing container ``final`` by ``staged`` atomically
        (reset, re-initialise): a reader sees the old or the new one."""

    @abc.abstractmethod
    def discard(self, staged: L) -> None:
        """Remove a staged container that will not be published (missing: no-op)."""

    @abc.abstractmethod
    def pending(self, final: L) -> bool:
        """Whether a staged container for ``final`` exists: a create that
        committed its row may be about to publish it."""

    @abc.abstractmethod
    def doom(self, final: L) -> L:
        """Inside the delete's write transaction: move ``final`` (or, if its
        creator has not published yet, its staged container) out of the way,
        so the creator's :meth:`publish` finds nothing.  Returns the handle for
        :meth:`remove`.  StateError if it keeps changing."""

    @abc.abstractmethod
    def remove(self, doomed: L) -> None:
        """After the delete committed: destroy what :meth:`doom` set aside, durably."""

    @abc.abstractmethod
    def recover(self, conn: sqlite3.Connection, table: str) -> list[str]:
        """Finish or undo the creates and deletes a killed process left among
        the containers whose rows live in ``table`` (``disks`` or
        ``snapshots``), under the database write lock.  Returns one line per
        action, for the user."""

    # -- locking -----------------------------------------------------------------------
    @abc.abstractmethod
    def locked(self, loc: L, *, exclusive: bool,
               timeout_s: float = 0.0) -> contextlib.AbstractContextManager[ContainerLock]:
        """Open the container and try to take its whole-file lock (the one a
        server holds, see :class:`ContainerLock`) for up to ``timeout_s``
        (0: one attempt).  Yields the handle whether or not the lock was
        granted (check :attr:`ContainerLock.held`); leaving the block releases
        both.  NotFound if the container is missing.

        The services' three uses::

            with store.locked(loc, exclusive=not ro, timeout_s=120) as lock:
                if not lock.held: raise StateError(...)   # attach waits out a copy
            with store.locked(loc, exclusive=True) as lock:
                if not lock.held: raise DiskAttached(...) # no unknown server
            with store.locked(loc, exclusive=False) as lock:
                if lock.held: store.clone(lock, staged)   # a still copy
        """

