"""Where a disk's or snapshot's bytes are, whichever store holds them, for tests that
run over every store (``store_name``): the catalog row's ``path`` names a file under
the home or an RBD image (``rbd:STORE/IMAGE[@SNAP]``, docs/FORMAT.md §10).

The test's own view: a container is read as a file (the home's, or an ``rbd export``
of the image, which FORMAT.md F-42 says is a container file) with the file-format
code; data is written through the volume classes the nbdkit plugin serves with.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
from pathlib import Path

from blockcrypt.storage.volume import FileVolume, Volume

_exports = itertools.count()


def catalog_ref(home: Path, table: str, name: str) -> str:
    """The ``path`` the catalog records for disk or snapshot ``name`` (``table``:
    ``disks`` or ``snapshots``)."""
    with contextlib.closing(sqlite3.connect(home / "blockcrypt.db")) as conn:
        row = conn.execute(f"SELECT path FROM {table} WHERE name = ?", (name,)).fetchone()
    assert row is not None, f"no {table} row named {name!r}"
    return row[0]


def is_rbd(ref: str) -> bool:
    return ref.startswith("rbd:")


def container_file(home: Path, table: str, name: str, *, cluster=None,
                   scratch: Path | None = None) -> Path:
    """A container file holding disk or snapshot ``name`` now: its file in the home, or
    an ``rbd export`` of its image (or image snapshot) into ``scratch``."""
    ref = catalog_ref(home, table, name)
    if not is_rbd(ref):
        return home / ref
    assert cluster is not None and scratch is not None, f"{name} is on RBD: {ref}"
    return cluster.export(ref, scratch / f"{table}-{name}-{next(_exports)}.bcd")


def allocated_bytes(home: Path, table: str, name: str, cluster=None) -> int:
    """What disk or snapshot ``name`` occupies: its file's blocks, or what `rbd du`
    reports as used by its image (or image snapshot)."""
    ref = catalog_ref(home, table, name)
    if not is_rbd(ref):
        return (home / ref).stat().st_blocks * 512
    spec = f"{cluster.pool}/{ref.split('/', 1)[1]}"
    du = json.loads(cluster.rbd("du", "--format", "json", spec).stdout)
    return sum(i["used_size"] for i in du["images"])


def open_disk_volume(home: Path, name: str, *, read_only: bool) -> Volume:
    """The volume of disk ``name`` as the plugin opens it: a FileVolume, or an RbdVolume
    through the store's recorded cephx user (taking the image's lock to write)."""
    ref = catalog_ref(home, "disks", name)
    if not is_rbd(ref):
        return FileVolume(home / ref, read_only=read_only)
    from blockcrypt.storage import stores
    from blockcrypt.storage.rbd_volume import RbdVolume
    store, image = ref[len("rbd:"):].split("/", 1)
    with contextlib.closing(sqlite3.connect(home / "blockcrypt.db")) as conn:
        conn.row_factory = sqlite3.Row
        cfg = stores.get(conn, store)
    return RbdVolume(cfg, image, read_only=read_only, disk=name, home=str(home))


def stored_objects(home: Path, cluster=None) -> list[str]:
    """Everything the stores hold: the home's container files (``disks/...``,
    ``snapshots/...``) and, with ``cluster``, the images of its pool with their
    snapshots (``IMAGE@SNAP``): what a refused command must leave as it was."""
    found = [str(p.relative_to(home)) for sub in ("disks", "snapshots")
             if (home / sub).is_dir() for p in sorted((home / sub).iterdir())]
    if cluster is not None:      # `rbd ls -l` lists each image and each of its snapshots
        listing = json.loads(cluster.rbd("ls", "-l", "--format", "json", cluster.pool).stdout)
        found += ["@".join(filter(None, (e["image"], e.get("snapshot")))) for e in listing]
    return sorted(found)
