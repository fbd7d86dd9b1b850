import os
import stat
import threading

import pytest

from blockcrypt.storage import db
from blockcrypt.storage.home import Home, default_home


def test_default_home_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKCRYPT_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    monkeypatch.delenv("BLOCKCRYPT_HOME")
    if os.geteuid() == 0:
        assert str(default_home()) == "/var/lib/blockcrypt"
    else:
        assert str(default_home()).endswith(".local/share/blockcrypt")


def test_create_dirs_are_private(tmp_path):
    os.umask(0o022)
    h = Home(tmp_path / "home")
    h.create_dirs()
    for d in (h.path, h.disks_dir, h.snapshots_dir, h.run_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_db_pragmas_modes_and_schema(tmp_path):
    h = Home(tmp_path / "home")
    h.create_dirs()
    conn = db.connect(h.db_path, create=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"disks", "snapshots", "attachments"} <= names
    with db.write_txn(conn):
        conn.execute("INSERT INTO disks(id,name,path,size_bytes,sector_size,encrypted,created_at)"
                     " VALUES('a','d1','/x',4096,4096,0,'t')")
    for p in h.path.iterdir():
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_db_missing_not_created(tmp_path):
    with pytest.raises(FileNotFoundError):
        db.connect(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()


def test_write_txn_rolls_back(tmp_path):
    conn = db.connect(tmp_path / "x.db", create=True)
    with pytest.raises(RuntimeError):
        with db.write_txn(conn):
            conn.execute("INSERT INTO disks(id,name,path,size_bytes,sector_size,encrypted,created_at)"
                         " VALUES('a','d1','/x',4096,4096,0,'t')")
            raise RuntimeError("boom")
    assert conn.execute("SELECT count(*) FROM disks").fetchone()[0] == 0


def test_concurrent_writers_serialise(tmp_path):
    path = tmp_path / "x.db"
    db.connect(path, create=True).close()
    errs = []

    def worker(i):
        try:
            c = db.connect(path)
            for j in range(20):
                with db.write_txn(c):
                    n = c.execute("SELECT count(*) FROM disks").fetchone()[0]
                    c.execute("INSERT INTO disks(id,name,path,size_bytes,sector_size,encrypted,"
                              "created_at) VALUES(?,?,?,?,?,?,?)",
                              (f"{i}-{j}", f"n{i}-{j}-{n}", "/x", 4096, 4096, 0, "t"))
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs
    c = db.connect(path)
    assert c.execute("SELECT count(*) FROM disks").fetchone()[0] == 160
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
