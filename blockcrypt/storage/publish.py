"""The temp-file protocol that makes creating and deleting a container crash-safe.

Owns the two marker names in a container directory and the three steps built
on them; it must not know about disks, snapshots, keys or nbdkit beyond the
name of the catalog table whose rows it checks.  (Moved here unchanged from
``blockcrypt.services.disks``, which documents the whole scheme.)

create: 1. write the container to ``<id>.bcd.tmp-<pid>-<start>`` (fsynced);
        2. insert the catalog row (a committed transaction);
        3. :func:`publish`: rename the file to ``<id>.bcd``, fsync the directory.
delete: 1. in one write transaction: :func:`doom` renames ``<id>.bcd`` to
           ``<id>.bcd.deleted`` (or, if a create committed but has not renamed
           yet, its temp file; the creator's :func:`publish` then finds nothing),
           delete the row, commit;
        2. unlink ``<id>.bcd.deleted``.

So a ``<id>.bcd`` file always has a committed row, and :func:`recover_dir`
(run under the database write lock) only ever acts on the two marker names:

- ``.tmp-<pid>-<start>`` whose creator is gone: with a row, the create
  committed, so finish it (rename); without one, it never committed, so remove
  the file; with a row *and* ``<id>.bcd`` present, it is the replacement an
  interrupted ``disk reset``/``reinit`` was building, so remove it;
- ``.deleted``: with a row, the delete never committed, so rename it back;
  without one, finish it (unlink).

A plain ``<id>.bcd`` is never removed automatically, nor a row whose file is
missing: those are left to the operator.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .. import errors
from ..system import proc
from . import db
from .home import fsync_dir

SUFFIX = ".bcd"             # a published container: <id>.bcd
TMP_MARK = ".tmp-"
DELETED_MARK = ".deleted"


def container_name(obj_id: str) -> str:
    """The file name of the published container with id ``obj_id``."""
    return obj_id + SUFFIX


def staged_of(final: Path) -> list[Path]:
    """The temp files any process is building ``final`` under, sorted."""
    return sorted(final.parent.glob(final.name + TMP_MARK + "*"))


def tmp_name(final: Path, pid: int, start: int) -> Path:
    """The temp name under which process (pid, start) builds ``final``."""
    return final.with_name(f"{final.name}{TMP_MARK}{pid}-{start}")


def publish(tmp: Path, final: Path) -> bool:
    """Rename a committed container from its temp name to its final name and
    fsync the directory; False if a concurrent delete took it first (see doom)."""
    try:
        os.rename(tmp, final)
    except FileNotFoundError:
        return False
    fsync_dir(final.parent)
    return True


def doom(final: Path) -> Path:
    """Move a container out of the way of its delete (inside the delete's write
    transaction): ``<id>.bcd`` -> ``<id>.bcd.deleted``.  A create commits its row
    before it renames its temp file into place, so if ``<id>.bcd`` is not there
    yet, its committed temp file is taken instead (the creator's rename then
    finds nothing and leaves it).  Returns the ``.deleted`` path to unlink
    after the commit."""
    doomed = final.with_name(final.name + DELETED_MARK)
    for _ in range(100):
        try:
            os.rename(final, doomed)
            return doomed
        except FileNotFoundError:
            pass
        temps = staged_of(final)
        if not temps:
            return doomed       # no file at all (left to the operator): drop the row
        try:
            os.rename(temps[0], doomed)
            return doomed
        except FileNotFoundError:
            continue            # the creator renamed it just now: take <id>.bcd
    raise errors.StateError(detail=f"{final.name} keeps changing; retry the delete")


def recover_dir(conn: sqlite3.Connection, d: Path, table: str) -> list[str]:
    """Finish or undo interrupted creates/deletes of the containers in d whose
    rows live in table (``disks`` or ``snapshots``); see the module doc.
    Runs under the database write lock; returns what it did."""
    assert table in ("disks", "snapshots")   # interpolated into SQL below
    try:
        pending = [n for n in os.listdir(d) if TMP_MARK in n or n.endswith(DELETED_MARK)]
    except FileNotFoundError:
        return []
    if not pending:
        return []
    actions = []
    with db.write_txn(conn):
        for fname in pending:
            path = d / fname
            if not path.exists():
                continue  # someone else recovered it meanwhile
            obj_id = fname.split(".", 1)[0]
            final = d / container_name(obj_id)
            has_row = conn.execute(f"SELECT 1 FROM {table} WHERE id = ?",
                                   (obj_id,)).fetchone() is not None
            if TMP_MARK in fname:
                owner = fname.split(TMP_MARK, 1)[1].split("-")
                try:
                    pid, start = int(owner[0]), int(owner[1])
                except (IndexError, ValueError):
                    continue  # not ours: leave it
                if proc.process_alive(pid, start):
                    continue  # a create in progress
                if has_row and not final.exists():
                    os.rename(path, final)
                    actions.append(f"completed creation of {final.name}")
                elif not has_row:
                    path.unlink()
                    actions.append(f"removed unfinished {fname}")
                else:  # row and file both exist: a reset/reinit that never swapped
                    path.unlink()
                    actions.append(f"removed unfinished replacement {fname}")
            else:
                if has_row and not final.exists():
                    os.rename(path, final)
                    actions.append(f"restored {final.name} (delete did not commit)")
                elif not has_row:
                    path.unlink()
                    actions.append(f"removed deleted {fname}")
        fsync_dir(d)
    return actions
