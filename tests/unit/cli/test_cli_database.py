"""A damaged blockcrypt.db, run through the real CLI: every command gives one line
naming the database file and the next step, with a documented exit code, never a
traceback (issue 12 item 4).  A key row whose state this blockcrypt does not know
is listed and refused, not a crash."""
from __future__ import annotations

import os
import sqlite3

import pytest

from blockcrypt import errors

# Commands a user runs first on a broken home; none may crash.
COMMANDS = [("disk", "list"), ("audit", "verify"), ("audit",), ("key", "list"),
            ("disk", "show", "d1"), ("snapshot", "list"), ("disk", "create", "d2", "--size", "4M"),
            ("key", "create", "--alias", "k2"), ("disk", "delete", "d1")]


@pytest.fixture
def damaged_home(bc_home, home):
    """A home with a key k1 and a disk d1, its database closed (checkpointed)."""
    run = bc_home
    run("key", "create", "--alias", "k1")
    run("disk", "create", "d1", "--size", "4M", "--key", "k1")
    assert not (home / "blockcrypt.db-wal").exists() or \
        (home / "blockcrypt.db-wal").stat().st_size == 0
    return run


def _garbage(db):
    db.write_bytes(os.urandom(64 * 1024))


def _truncated_header(db):
    os.truncate(db, 8192)


def _truncated_middle(db):
    os.truncate(db, db.stat().st_size // 2)


def _text_file(db):
    db.write_text("this is not a database\n")


def _zeroed_pages(db):
    with open(db, "r+b") as f:       # keep the header, wipe the b-tree pages
        f.seek(4096)
        f.write(b"\xff" * (db.stat().st_size - 4096))


DAMAGE = {"garbage": _garbage, "truncated-8k": _truncated_header,
          "truncated-half": _truncated_middle, "text": _text_file, "pages": _zeroed_pages}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c))
def test_damaged_database_is_an_error_naming_the_file(damaged_home, home, damage, command):
    db = home / "blockcrypt.db"
    for extra in ("-wal", "-shm"):
        (home / ("blockcrypt.db" + extra)).unlink(missing_ok=True)
    DAMAGE[damage](db)
    cp = damaged_home(*command, check=False)
    err = cp.stderr.decode()
    assert "Traceback" not in err
    assert cp.returncode == errors.DatabaseDamaged.exit_code, err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(db) in err and "restore it from a backup" in err and ".recover" in err


def test_damaged_database_json_error(damaged_home, home):
    _garbage(home / "blockcrypt.db")
    cp = damaged_home("disk", "list", "--json", check=False)
    assert cp.returncode == errors.DatabaseDamaged.exit_code
    assert '"error": "DatabaseDamaged"' in cp.stderr.decode()


def _set_state(home, alias, state):
    conn = sqlite3.connect(home / "blockcrypt.db")
    with conn:
        conn.execute("UPDATE kms_keys SET state = ? WHERE alias = ?", (state, alias))
    conn.close()


def test_unknown_key_state_is_listed_and_refused(damaged_home, home):
    _set_state(home, "k1", "Bogus")
    listing = damaged_home("key", "list").stdout.decode()
    assert "Bogus" in listing
    assert "Bogus" in damaged_home("key", "show", "k1").stdout.decode()
    for command in (("disk", "create", "d2", "--size", "4M", "--key", "k1"),
                    ("key", "enable", "k1"), ("key", "disable", "k1"), ("key", "rotate", "k1")):
        cp = damaged_home(*command, check=False)
        err = cp.stderr.decode()
        assert "Traceback" not in err, (command, err)
        assert cp.returncode == errors.KeyStateError.exit_code, (command, err)
        assert "blockcrypt.db" in err and "upgrade blockcrypt or restore" in err
    assert damaged_home("audit", "verify").returncode == 0


def _sqlite_error(cls, message, code):
    exc = cls(message)
    exc.sqlite_errorcode = code
    return exc


@pytest.mark.parametrize("exc, expected, phrase", [
    (_sqlite_error(sqlite3.OperationalError, "database or disk is full", 13),
     errors.HomeFull, "no space left in HOME"),
    (_sqlite_error(sqlite3.DatabaseError, "database disk image is malformed", 11),
     errors.DatabaseDamaged, "restore it from a backup"),
    (_sqlite_error(sqlite3.DatabaseError, "file is not a database", 26),
     errors.DatabaseDamaged, "restore it from a backup"),
    (_sqlite_error(sqlite3.OperationalError, "attempt to write a readonly database", 8),
     errors.DatabaseUnusable, "writable"),
    (_sqlite_error(sqlite3.OperationalError, "disk I/O error", 10),
     errors.DatabaseUnusable, "dmesg"),
    (_sqlite_error(sqlite3.OperationalError, "database is locked", 5),
     errors.DatabaseUnusable, "retry"),
])
def test_db_error_maps_every_sqlite_error_to_the_tree(tmp_path, exc, expected, phrase):
    """The error mapping alone (the damaged-file tests above run the real path)."""
    from blockcrypt.storage import db
    e = db.db_error(tmp_path / "blockcrypt.db", exc)
    assert type(e) is expected and phrase in e.message
    assert str(tmp_path / "blockcrypt.db") in e.message


# -- item 6: every path read from the catalog resolves inside the home ---------------

def _sql(home, statement, *args):
    conn = sqlite3.connect(home / "blockcrypt.db")
    with conn:
        conn.execute(statement, args)
    conn.close()


@pytest.mark.parametrize("where", ["relative", "absolute", "the-database"])
@pytest.mark.parametrize("table", ["disks", "snapshots"])
def test_delete_never_follows_a_catalog_path_out_of_the_container_folders(
        damaged_home, home, tmp_path, where, table):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    ref = {"relative": "../victim", "absolute": str(victim),
           "the-database": f"{table}/../blockcrypt.db"}[where]
    name = "d1"
    if table == "snapshots":
        damaged_home("snapshot", "create", "d1", "s1")
        name = "s1"
    _sql(home, f"UPDATE {table} SET path = ? WHERE name = ?", ref, name)
    what = "disk" if table == "disks" else "snapshot"
    cp = damaged_home(what, "delete", name, check=False)
    err = cp.stderr.decode()
    assert cp.returncode == errors.CatalogTampered.exit_code, err
    assert "Traceback" not in err and f"{what} {name!r}" in err and ref in err
    assert victim.read_text() == "keep me"
    assert damaged_home("key", "list").returncode == 0      # the database is untouched


def test_a_run_directory_outside_the_home_is_never_removed(damaged_home, home, tmp_path):
    victim = tmp_path / "victim-dir"
    victim.mkdir()
    (victim / "f").write_text("keep me")
    disk_id = damaged_home("disk", "show", "d1", "--json").stdout.decode().split(
        '"id": "')[1].split('"')[0]
    _sql(home, "INSERT INTO attachments (disk_id, state, owner_pid, owner_start, method, "
               "read_only, run_dir, attached_at) VALUES (?, 'detaching', 999999999, 1, "
               "'nbd-client', 0, ?, 't')", disk_id, str(victim))
    for command in (("disk", "list"), ("disk", "show", "d1"), ("disk", "delete", "d1")):
        cp = damaged_home(*command, check=False)
        err = cp.stderr.decode()
        assert cp.returncode == errors.CatalogTampered.exit_code, (command, err)
        assert "Traceback" not in err and str(victim) in err
    assert (victim / "f").read_text() == "keep me"
