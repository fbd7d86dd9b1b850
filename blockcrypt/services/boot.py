"""Persistent disks: attached whenever the host runs, by the boot units, without a person.

``disk attach NAME --persistent`` / ``disk set NAME --persistent`` record a disk
(:mod:`blockcrypt.storage.persistent`); :meth:`PersistentDisks.attach_all` is what
the boot unit runs (``disk attach --all-persistent``) and
:meth:`PersistentDisks.detach_all` what it runs at shutdown (``disk detach --all``).

attach_all tries every persistent disk that is not attached yet; one failing
does not stop the others.  A disk whose key provider is unreachable (a token
not plugged in yet, its daemon not up: :class:`~blockcrypt.errors.ProviderUnavailable`)
(or whose Ceph store does not answer yet) is retried with exponential backoff (1 s
doubling to 30 s) until ``wait_s`` has
passed, and ``on_wait`` is told which disks wait and why; any other failure is
final at once.  The result lists what was attached and what failed; the caller
turns failures into :class:`~blockcrypt.errors.SomeDisksFailed`.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from .. import errors
from ..constants import utc_timestamp
from ..storage import db, persistent
from ..storage.stores import FILE_STORE, store_name_of

if TYPE_CHECKING:
    from .disks import DiskService

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0

Waiting = Callable[[dict[str, str], float], None]
"""``on_wait({disk name: reason}, retry_in_s)``: disks waiting for their key provider."""


class PersistentDisks:
    """The persistent disks of one home (see the module doc)."""

    def __init__(self, disks: DiskService, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.disks = disks
        self._sleep = sleep
        self._clock = clock

    @property
    def conn(self):
        return self.disks.conn

    def set(self, name: str, on: bool, *, read_only: bool = False) -> dict:
        """Record (``on``) or forget that disk ``name`` attaches at boot."""
        with db.write_txn(self.conn):
            disk = self.disks.disk_row(name)
            persistent.set_persistent(self.conn, disk["id"], on, read_only=read_only,
                                      since=utc_timestamp())
        return self.describe(name)

    def describe(self, name: str) -> dict:
        d = self.disks.show(name)
        d["persistent"] = persistent.is_persistent(self.conn, d["id"])
        return d

    def names(self) -> list[str]:
        return [r["name"] for r in persistent.persistent_disks(self.conn)]

    def needs_network(self, name: str) -> bool:
        """Whether disk ``name`` can only attach with the network up: it lives in a
        Ceph store, or its key is in a KMIP key manager."""
        d = self.disks.disk_row(name)           # the catalog only: no store is contacted
        if store_name_of(d["path"]) != FILE_STORE:
            return True
        if not d["encrypted"]:
            return False
        provider = self.disks.keys.get_key(d["cmk_id"])["provider"]
        return self.disks.keys.get_provider(provider)["type"] == "kmip"

    def _selected(self, name: str, network: bool | None) -> bool:
        return network is None or self.needs_network(name) == network

    def attach_all(self, *, wait_s: float = 0.0, on_wait: Waiting | None = None,
                   network: bool | None = None) -> dict:
        """Attach every persistent disk not attached yet (see the module doc); with
        ``network`` True or False, only those that need the network, or only the others
        (the two boot units).

        Returns {"attached": [names], "already": [names], "failed": {name: message}}.
        """
        rows = [r for r in persistent.persistent_disks(self.conn)
                if self._selected(r["name"], network)]
        result: dict = {"attached": [], "already": [], "failed": {}}
        todo = []
        for row in rows:
            if self.disks.show(row["name"])["state"] == "attached":
                result["already"].append(row["name"])
            else:
                todo.append(row)
        deadline = self._clock() + max(0.0, wait_s)
        delay = BACKOFF_FIRST_S
        while todo:
            waiting: dict[str, str] = {}
            for row in todo:
                try:
                    self.disks.attach(row["name"], read_only=bool(row["persistent_read_only"]))
                    result["attached"].append(row["name"])
                except (errors.ProviderUnavailable, errors.StoreUnreachable,
                        errors.StoreNotAnswering) as e:
                    waiting[row["name"]] = e.message
                except errors.BlockcryptError as e:
                    result["failed"][row["name"]] = e.message
            todo = [r for r in todo if r["name"] in waiting]
            if not todo:
                break
            left = deadline - self._clock()
            if left <= 0:
                for name, why in waiting.items():
                    result["failed"][name] = f"gave up waiting after {wait_s:g} s: {why}"
                break
            pause = min(delay, left)
            if on_wait is not None:
                on_wait(waiting, pause)
            self._sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX_S)
        return result

    def detach_all(self, *, network: bool | None = None) -> dict:
        """Detach every attached disk (block devices; `disk serve` servers are left to
        their own process); ``network`` as for :meth:`attach_all`.
        Returns {"detached": [...], "failed": {name: message}}."""
        result: dict = {"detached": [], "failed": {}}
        for d in self.disks.list():
            if d["state"] not in ("attached", "stale") or d["method"] == "serve" or \
                    not self._selected(d["name"], network):
                continue
            try:
                self.disks.detach(d["name"])
                result["detached"].append(d["name"])
            except errors.BlockcryptError as e:
                result["failed"][d["name"]] = e.message
        return result


def failures(result: dict, action: str) -> errors.SomeDisksFailed | None:
    """The error summing up a batch's failures (None if none failed)."""
    failed = result["failed"]
    if not failed:
        return None
    total = len(failed) + sum(len(result.get(k, [])) for k in ("attached", "already",
                                                                "detached"))
    detail = "; ".join(f"disk {n}: {msg}" for n, msg in sorted(failed.items()))
    return errors.SomeDisksFailed(failed=len(failed), total=total, action=action, detail=detail)



