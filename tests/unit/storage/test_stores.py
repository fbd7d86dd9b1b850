"""storage/stores.py: the stores table beside the catalog's (whose DDL stays exactly
as before: other homes' databases and tools read it), and the registry's naming."""
from __future__ import annotations

import hashlib
import os

import pytest

from blockcrypt import errors
from blockcrypt.storage import catalog, db, stores
from blockcrypt.storage.ceph import StoreConfig
from blockcrypt.storage.file_store import FileStore
from blockcrypt.storage.rbd_store import RbdLoc, RbdStore

# sha256 of catalog.SCHEMA before RBD stores existed (commit 1a1d963)
CATALOG_SCHEMA_SHA256 = "7cd365b0379a5f59191805e58cd894d22f66eb9d4efec3825cf16dccb00c65d5"


@pytest.fixture
def conn(tmp_path):
    c = db.connect(tmp_path / "blockcrypt.db", create=True)
    yield c
    c.close()


def test_existing_tables_are_byte_identical(conn):
    assert hashlib.sha256(catalog.SCHEMA.encode()).hexdigest() == CATALOG_SCHEMA_SHA256
    ddl = {r["name"]: r["sql"] for r in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table'")}
    for table in ("disks", "snapshots", "attachments"):
        assert ddl[table].replace("IF NOT EXISTS ", "") in catalog.SCHEMA.replace(
            "IF NOT EXISTS ", "")
    assert "stores" in ddl and "stores" not in catalog.SCHEMA


def test_store_rows_users_and_registry(conn, tmp_path):
    cfg = StoreConfig("ceph", "/etc/ceph/ceph.conf", "rbd", "blockcrypt", "/etc/ceph/k")
    with db.write_txn(conn):
        stores.insert(conn, cfg)
    assert stores.get(conn, "ceph") == cfg
    with pytest.raises(errors.AlreadyExists), db.write_txn(conn):
        stores.insert(conn, cfg)
    with pytest.raises(errors.DiskStoreNotFound, match="'nosuch'"):
        stores.get(conn, "nosuch")
    with db.write_txn(conn):
        catalog.insert_disk(conn, id="ab" * 16, name="db", path=f"rbd:ceph/bc-{'ab' * 16}",
                            size_bytes=1 << 20, sector_size=4096, encrypted=0, cmk_id=None,
                            lineage_id=None, discard=0, source_snapshot_id=None,
                            created_at="now")
    assert stores.users(conn, "ceph") == ["disk db"]
    assert stores.users(conn, "other") == []

    reg = stores.Stores(tmp_path, lambda: conn)
    assert isinstance(reg.named(None), FileStore) and reg.named("file") is reg.files
    rbd = reg.named("ceph")
    assert isinstance(rbd, RbdStore) and reg.named("ceph") is rbd   # one per name
    assert reg.for_ref("disks/x.bcd") is reg.files
    loc = reg.locate(f"rbd:ceph/bc-{'ab' * 16}@{'cd' * 16}", owner="snapshot 's'")
    assert loc == RbdLoc("ceph", f"bc-{'ab' * 16}", "cd" * 16) and loc.owner == "snapshot 's'"
    assert str(loc) == f"rbd:ceph/bc-{'ab' * 16}@{'cd' * 16}"
    assert rbd.new_ref("disks", "ef" * 16) == f"rbd:ceph/bc-{'ef' * 16}"
    for bad in ("rbd:ceph/other", "rbd:ceph/bc-x/../y", "rbd:ceph/bc-1@a b"):
        with pytest.raises(errors.CatalogTampered):
            reg.locate(bad)
    with pytest.raises(errors.DiskStoreNotFound):
        reg.locate("rbd:gone/bc-00")
    staged = rbd.staging(loc)
    assert staged.image == loc.image and staged.snap.startswith(loc.snap + ".tmp-")


def test_add_store_refuses_the_file_name(conn):
    with pytest.raises(errors.InvalidName):
        stores.add_store(conn, StoreConfig("file", "/c", "rbd"))


def test_rbd_export_leaves_zero_blocks_as_holes(tmp_path):
    """An RBD export reads whole 4 MiB objects; what is written of them is only the
    non-zero 4 KiB blocks (runs merged), so the file is as sparse as the data."""
    from blockcrypt.storage.rbd_store import write_nonzero
    block = 4096
    data = bytearray(64 * block + 100)                  # a short tail block too
    for i in (3, 4, 5, 40):
        data[i * block + 7] = 1
    data[-1] = 2
    out = tmp_path / "export"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    try:
        write_nonzero(fd, bytes(data), 8 * block)
        os.ftruncate(fd, 8 * block + len(data))
    finally:
        os.close(fd)
    assert out.read_bytes() == bytes(8 * block) + bytes(data)
    allocated = [off for off in range(0, out.stat().st_size, block)
                 if _data_at(out, off)]
    assert allocated == [(8 + i) * block for i in (3, 4, 5, 40, 64)]


def _data_at(path, off: int) -> bool:
    """Is the 4 KiB block at ``off`` allocated (SEEK_DATA lands on it)?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, off, os.SEEK_DATA) == off
    except OSError:          # ENXIO: only holes from off to the end
        return False
    finally:
        os.close(fd)
