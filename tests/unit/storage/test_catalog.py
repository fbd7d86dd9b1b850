"""blockcrypt.storage.catalog: rows of disks, snapshots and attachments, and the
check that a container's header agrees with its row."""
from __future__ import annotations

import pytest

from blockcrypt import errors
from blockcrypt.storage import catalog, db
from blockcrypt.storage.header import Kind, new_header


def _disk(**kw) -> dict:
    row = dict(id="ab" * 16, name="d1", path=f"disks/{'ab' * 16}.bcd", size_bytes=4096,
               sector_size=4096, encrypted=0, cmk_id=None, lineage_id=None, discard=0,
               source_snapshot_id=None, created_at="2026-01-01T00:00:00Z")
    row.update(kw)
    return row


def test_insert_rows_of_every_table(conn):
    with db.write_txn(conn):
        catalog.insert_disk(conn, **_disk())
        catalog.insert_snapshot(conn, id="cd" * 16, name="s1", disk_id="ab" * 16,
                                disk_name="d1", path=f"snapshots/{'cd' * 16}.bcd",
                                size_bytes=4096, sector_size=4096, encrypted=0, cmk_id=None,
                                lineage_id="ab" * 16, created_at="2026-01-01T00:00:01Z")
        catalog.insert_attachment(conn, disk_id="ab" * 16, state="attaching", method="serve",
                                  read_only=0, run_dir=str(catalog.home_of(conn) / "run" / "d1"), attached_at="t")
    assert catalog.get_disk(conn, "d1")["path"] == f"disks/{'ab' * 16}.bcd"
    snap = conn.execute("SELECT * FROM snapshots WHERE name = 's1'").fetchone()
    assert tuple(snap.keys()) == catalog.SNAPSHOT_COLUMNS and snap["disk_name"] == "d1"
    assert catalog.get_attachment(conn, "ab" * 16)["state"] == "attaching"
    assert catalog.key_dependants(conn, "k") == []


@pytest.mark.parametrize("insert, what", [(catalog.insert_disk, "disk"),
                                          (catalog.insert_snapshot, "snapshot"),
                                          (catalog.insert_attachment, "attachment")])
def test_insert_refuses_unknown_columns(conn, insert, what):
    """Column names are interpolated into the SQL: only known ones pass."""
    with pytest.raises(ValueError, match=f"unknown {what} columns .*'id; DROP'"):
        insert(conn, **{"id; DROP": 1})


def test_check_header_matches(tmp_path):
    header = new_header(Kind.DISK, 4096, 4096, encrypted=False)
    row = _disk(id=header.uid_hex)
    catalog.check_header_matches(header, row, tmp_path / "d.bcd")
    with pytest.raises(errors.FormatError, match="is not the catalog's"):
        catalog.check_header_matches(header, _disk(), tmp_path / "d.bcd")
    with pytest.raises(errors.FormatError, match="header says uncrypted but the catalog "
                                                 "records 'd1' as encrypted"):
        catalog.check_header_matches(header, _disk(id=header.uid_hex, encrypted=1),
                                     tmp_path / "d.bcd")
