"""The crypto-shred record: proof of erasure when a CMK's material is destroyed.

When a key's deletion window has passed and its material is destroyed (by any
provider: the local store's sealed rows, a token's objects, a KMIP server's
objects), the same transaction appends, after the ``destroy`` record, one
``shred`` audit record listing every disk and snapshot whose data key can no
longer be unwrapped: kind, name, container uid and lineage id, with the key (id,
alias, provider) and the versions destroyed.  It is part of the hash chain, so
``audit verify`` proves it was not edited; :func:`reports` finds it again by key
id or by the alias the key had (aliases are freed at destruction).

Which containers use a key is the disk catalog's knowledge: the store is given an
:data:`Inventory` callable (the CLI passes
:func:`blockcrypt.storage.catalog.key_inventory`); without one the record lists
the dependants' names only.

A key shared from another host (origin ``shared``, see :mod:`.adopt`) gets no
shred record here: its material is not destroyed, only forgotten by this host.
"""
from __future__ import annotations

import json
import sqlite3
from typing import Callable

from .. import audit

Inventory = Callable[[sqlite3.Connection, str], list[dict]]
"""``inventory(conn, key_id)``: the containers whose data key the key wraps, as dicts
with ``kind`` (disk | snapshot), ``name``, ``uid`` and ``lineage_id``."""

SHRED = "shred"


def details(conn: sqlite3.Connection, row, versions: list[int], provider: str,
            inventory: Inventory | None, dependants: list[str]) -> dict:
    """The body of a shred record for key ``row`` whose ``versions`` were destroyed."""
    if inventory is not None:
        items = inventory(conn, row["id"])
    else:
        items = [{"kind": d.split(" ", 1)[0], "name": d.split(" ", 1)[-1], "uid": None,
                  "lineage_id": None} for d in dependants]
    return {"key": {"id": row["id"], "alias": row["alias"], "provider": provider,
                    "origin": row["origin"], "created_at": row["created_at"]},
            "versions_destroyed": versions,
            "unrecoverable": items,
            "unrecoverable_count": len(items),
            "statement": "the material of every listed version is destroyed; the data keys "
                         "of the listed disks and snapshots, wrapped only by this key, can no "
                         "longer be unwrapped and their data cannot be read"}


def reports(conn: sqlite3.Connection, ref: str) -> list[dict]:
    """Shred records of the key with id ``ref``, or whose alias was ``ref``."""
    out = []
    for row in conn.execute("SELECT seq, record, hash FROM audit_log WHERE operation = ? "
                            "ORDER BY seq", (SHRED,)):
        rec = json.loads(row["record"])
        key = rec.get("details", {}).get("key", {})
        if ref in (rec.get("key_id"), key.get("alias")):
            rec["hash"] = row["hash"]
            out.append(rec)
    return out


def verified(conn: sqlite3.Connection) -> dict:
    """The chain check the report carries (an edited record breaks it)."""
    return audit.verify(conn, expect_records=True)
