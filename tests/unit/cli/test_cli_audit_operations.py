"""Every management operation leaves one record in the audit chain, successful or
refused, with who (uid, pid) and which object (issue 12 item 11); `audit verify`
still proves the chain.  The operations that need a block device (attach, detach,
serve, copy) are in tests/e2e/test_audit_operations.py."""
from __future__ import annotations

import json
import os

import pytest

from blockcrypt import errors


@pytest.fixture
def bc(bc_home, tmp_path):
    run = bc_home
    run("disk", "create", "d1", "--size", "4M")
    run("disk", "create", "plain", "--size", "4M", "--no-encrypted")
    run("snapshot", "create", "d1", "s1")
    run("snapshot", "create", "plain", "p1")
    run("key", "create", "--alias", "k1")
    run("disk", "header-backup", "d1", tmp_path / "d1.hdr")
    return run


def records(bc) -> list[dict]:
    return json.loads(bc("audit", "--json").stdout)


# (operation recorded, objects as (type, name), argv of a success, argv of a refusal
#  and the error it must record)
OPERATIONS = [
    ("disk-create", [("disk", "d2")], ["disk", "create", "d2", "--size", "4M"],
     (["disk", "create", "d1", "--size", "4M"], errors.AlreadyExists)),
    ("disk-delete", [("disk", "d1")], ["disk", "delete", "d1"],
     (["disk", "delete", "nope"], errors.DiskNotFound)),
    ("disk-reset", [("disk", "d1"), ("snapshot", "s1")], ["disk", "reset", "d1", "--snapshot", "s1"],
     (["disk", "reset", "d1", "--snapshot", "p1"], errors.LineageMismatch)),
    ("disk-resize", [("disk", "d1")], ["disk", "resize", "d1", "--size", "8M"],
     (["disk", "resize", "d1", "--size", "1M"], errors.InvalidSize)),
    ("disk-reinit", [("disk", "d1")], ["disk", "reinit", "d1"],
     (["disk", "reinit", "nope"], errors.DiskNotFound)),
    ("disk-create-from-snapshot", [("disk", "d3"), ("snapshot", "s1")],
     ["disk", "create", "d3", "--from-snapshot", "s1"],
     (["disk", "create", "d3", "--from-snapshot", "s1", "--no-encrypted"],
      errors.ConversionRefused)),
    ("snapshot-create", [("disk", "d1"), ("snapshot", "s2")], ["snapshot", "create", "d1", "s2"],
     (["snapshot", "create", "d1", "s1"], errors.AlreadyExists)),
    ("snapshot-delete", [("snapshot", "s1")], ["snapshot", "delete", "s1"],
     (["snapshot", "delete", "nope"], errors.SnapshotNotFound)),
    ("snapshot-export", [("snapshot", "p1")], ["snapshot", "export", "p1", "{tmp}/p1.img"],
     (["snapshot", "export", "s1", "{tmp}/s1.img"], errors.ExportRefused)),
    ("disk-header-backup", [("disk", "d1")], ["disk", "header-backup", "d1", "{tmp}/b.hdr"],
     (["disk", "header-backup", "nope", "{tmp}/c.hdr"], errors.DiskNotFound)),
    ("disk-header-restore", [("disk", "d1")], ["disk", "header-restore", "d1", "{tmp}/d1.hdr"],
     (["disk", "header-restore", "plain", "{tmp}/d1.hdr"], errors.HeaderBackupMismatch)),
    ("create", [], ["key", "create", "--alias", "k2"],
     (["key", "create", "--alias", "k1"], errors.AlreadyExists)),
    ("disable", [], ["key", "disable", "k1"],
     (["key", "disable", "blockcrypt/default"], errors.ServiceKeyProtected)),
    ("change-passphrase", [], ["passphrase", "change", "--new-passphrase-file", "{tmp}/new"],
     None),
]


@pytest.mark.parametrize("operation, objects, ok, refusal", OPERATIONS,
                         ids=[o[0] for o in OPERATIONS])
def test_every_operation_is_audited_with_who_and_what(bc, tmp_path, operation, objects, ok,
                                                      refusal):
    (tmp_path / "new").write_text("another passphrase 123\n")
    (tmp_path / "new").chmod(0o600)              # secret files must be private
    fill = [a.replace("{tmp}", str(tmp_path)) for a in ok]
    before = records(bc)
    ids_before = {o["name"]: o["id"] for r in before for o in r.get("objects", [])
                  if o["id"]}
    cp = bc(*fill)
    new = [r for r in records(bc)[len(before):] if r["operation"] == operation]
    assert len(new) == 1, [r["operation"] for r in records(bc)[len(before):]]
    rec = new[0]
    assert rec["result"] == "success" and rec["error"] is None
    assert rec["caller"]["uid"] == os.getuid() and rec["caller"]["pid"] not in (None, os.getpid())
    assert fill[0] in rec["caller"]["command"]
    if objects:
        assert [(o["type"], o["name"]) for o in rec["objects"]] == objects
        for o in rec["objects"]:       # every object is named with its id
            assert o["id"] and len(o["id"]) == 32, o
            if o["name"] in ids_before:
                assert o["id"] == ids_before[o["name"]]
    else:
        assert rec["key_id"] or operation == "change-passphrase"   # store-wide
    if refusal is not None:
        argv, error = refusal
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        count = len(records(bc))
        cp = bc(*argv, check=False)
        assert cp.returncode == error.exit_code, cp.stderr.decode()
        refused = [r for r in records(bc)[count:] if r["operation"] == operation]
        assert len(refused) == 1
        assert refused[0]["result"] == "refused"
        assert refused[0]["error"].startswith(error.__name__ + ":")
        if objects:
            assert refused[0]["exit_code"] == error.exit_code
            assert refused[0]["objects"][0]["type"] == objects[0][0]
    verified = bc("audit", "verify", "--json")
    assert json.loads(verified.stdout)["ok"] is True


def test_a_management_record_that_is_edited_breaks_the_chain(bc, home):
    """The new records are in the same chain: editing one is caught by `audit verify`."""
    import sqlite3
    bc("disk", "delete", "d1")
    conn = sqlite3.connect(home / "blockcrypt.db")
    with conn:
        seq, raw = conn.execute("SELECT seq, record FROM audit_log WHERE operation = "
                                "'disk-delete'").fetchone()
        conn.execute("UPDATE audit_log SET record = ? WHERE seq = ?",
                     (raw.replace('"d1"', '"dX"'), seq))
    conn.close()
    cp = bc("audit", "verify", check=False)
    assert cp.returncode == errors.AuditTampered.exit_code
    assert f"record {seq} was edited" in cp.stderr.decode()


def test_audit_table_shows_the_objects(bc):
    bc("disk", "delete", "d1")
    out = bc("audit").stdout.decode()
    assert "disk-delete" in out and "disk d1" in out
