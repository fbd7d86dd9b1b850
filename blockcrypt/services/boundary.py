"""The boundary of every management operation: its audit record, and errors that name
the disk or snapshot.

:func:`audited` decorates the service methods the CLI calls for a change (disk
create, delete, resize, attach, detach, serve, copy, reset, reinit; snapshot create,
delete, export; disk create --from-snapshot): one record per call in the audit
chain that also holds the key operations (:func:`blockcrypt.kms.audit.record`),
successful or refused, with who (uid, pid, command line), the objects (type,
name, id) and, for a refusal, the error and its exit code.  A record that cannot
be written (a full or damaged home) never turns a finished operation into a
failure nor hides the error of a refused one: it is reported on stderr instead
(the ``blockcrypt`` logger).

:func:`about` rewrites a container error (the FormatError family, StorageError,
a missing container file) to name the disk or snapshot, with its file as detail,
and a full file system (ENOSPC) as HomeFull.  :func:`audited` applies it to the
first object of every operation; code that reads another object's container
(the source of a snapshot) wraps that read itself.

Must not: decide anything about the operations; it only records and words them.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import errors
from ..kms import audit
from ..storage.publish import TMP_MARK

log = logging.getLogger("blockcrypt")
MAX_NAME_CHARS = 256   # a refused, hostile name is recorded at most this long
_TABLES = {"disk": "disks", "snapshot": "snapshots"}


def object_id(conn: sqlite3.Connection, what: str, name) -> str | None:
    """The id of the disk or snapshot ``name`` in the catalog, None if there is none."""
    if not isinstance(name, str) or what not in _TABLES:
        return None                     # a store is known by its name alone
    row = conn.execute(f"SELECT id FROM {_TABLES[what]} WHERE name = ?", (name,)).fetchone()
    return row["id"] if row else None


def _is_container(path, home: Path) -> bool:
    """Whether path is a container file (or a temporary one) of the home."""
    try:
        parent = Path(path).resolve().parent
        home = home.resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return parent in (home / "disks", home / "snapshots")


def _rewrite(e: errors.BlockcryptError, what: str, name: str, home: Path,
             file) -> errors.BlockcryptError:
    """``e`` worded about disk or snapshot ``name`` with the file as detail, if it is an
    error about one of the home's container files; else ``e`` itself."""
    label = f"{what} {name!r}"
    if "object" in e.fields or isinstance(e, (errors.DatabaseDamaged,
                                               errors.DatabaseUnusable)):
        return e
    if isinstance(e, errors.NotFound) and str(e.fields.get("what", "")).endswith("file"):
        path = e.fields.get("name")
        msg = "its container file is missing; restore it from a backup, or delete and " \
              "recreate it"
    elif isinstance(e, (errors.FormatError, errors.StorageError)) and e.fields.get("path"):
        path = e.fields["path"]
        msg = e.message
        if msg.startswith(f"{path}: "):
            msg = msg[len(path) + 2:]
        msg = msg.replace(str(path), "its container")
    else:
        return e
    if not _is_container(path, home):
        return e                      # another file (an export's destination...)
    if isinstance(e, (errors.ChecksumMismatch, errors.BadMagic)) and what == "disk":
        msg += (f"; if you saved its header with `blockcrypt disk header-backup`, put it back "
                f"with `blockcrypt disk header-restore {name} FILE`")
    detail = file if file is not None and TMP_MARK in str(path) else path
    new = type(e)(f"{label}: {msg} (file {detail})", **{**e.fields, "object": label})
    new.__cause__ = None
    return new


@contextlib.contextmanager
def about(what: str, name: str, home: Path, file: Path | str | None = None) -> Iterator[None]:
    """Errors raised inside name ``what`` ``name`` (a disk or snapshot) instead of a file.

    ``file`` is the object's container, shown as detail when the failing file was a
    temporary copy; ENOSPC becomes HomeFull naming ``home``.
    """
    label = f"{what} {name!r}"
    try:
        yield
    except errors.NoSpace as e:
        if isinstance(e, errors.HomeFull) or str(e.fields.get("path", "")).startswith("rbd:"):
            raise                     # (a full Ceph cluster is not a full home)
        raise errors.HomeFull(home=str(home), what=label) from None
    except errors.BlockcryptError as e:
        new = _rewrite(e, what, name, home, file)
        if new is e:
            raise
        raise new from None


def _objects(bound: inspect.BoundArguments, specs: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        what, _, arg = spec.partition(":")
        value = bound.arguments.get(arg)
        out.append((what, value[:MAX_NAME_CHARS] if isinstance(value, str) else value))
    return out


def record(service, operation: str, objects: list[tuple[str, object]],
           ids: dict[int, str | None] | None = None, error: errors.BlockcryptError | None = None,
           details: dict | None = None) -> None:
    """Write one record for ``service`` (anything with ``conn``); never raises: a record
    that cannot be written is reported on stderr."""
    try:
        conn = service.conn
        entries = [{"type": what, "name": name,
                    "id": (ids or {}).get(i) or object_id(conn, what, name)}
                   for i, (what, name) in enumerate(objects)]
        audit.record(conn, operation, objects=entries, error=error, details=details)
    except (errors.BlockcryptError, sqlite3.Error) as exc:
        reason = exc.message if isinstance(exc, errors.BlockcryptError) else str(exc)
        log.warning("warning: the audit record of %s (%s) was not written: %s", operation,
                    ", ".join(f"{w} {n!r}" for w, n in objects), reason)


def audited(operation: str, *specs: str) -> Callable:
    """Decorate a service method: one audit record per call (see the module doc).

    ``specs`` name the objects as ``"TYPE:ARGUMENT"`` (``"disk:name"``,
    ``"snapshot:snap_name"``); the first is the one errors are worded about.  The
    decorated object has ``conn`` (the catalog connection) and ``home``.
    """
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            objects = _objects(signature.bind(self, *args, **kwargs), specs)
            try:   # ids before the operation: a deleted object's id is gone after it
                ids = {i: object_id(self.conn, w, n) for i, (w, n) in enumerate(objects)}
            except sqlite3.Error:
                ids = {}
            what, name = objects[0]
            try:
                with about(what, str(name), self.home.path):
                    result = fn(self, *args, **kwargs)
            except errors.BlockcryptError as e:
                record(self, operation, objects, ids, error=e)
                raise
            record(self, operation, objects, ids)
            return result
        return wrapper
    return decorate
