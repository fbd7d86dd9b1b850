"""SQLite WAL + synchronous=FULL (docs/RELIABILITY.md §2): a writer killed with SIGKILL,
between transactions or in the middle of one, loses nothing it committed and leaves
nothing it did not (issue 12, guarantees with no test).  A real writer process, real
SQLite through blockcrypt.storage.db, a real kill."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from blockcrypt.storage import db

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from blockcrypt.storage import db
    conn = db.connect(Path(sys.argv[1]), create=True)
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, pad BLOB)")
    stop_inside = int(sys.argv[2])
    n = conn.execute("SELECT coalesce(max(n), 0) FROM t").fetchone()[0]
    while True:
        n += 1
        with db.write_txn(conn):
            conn.execute("INSERT INTO t VALUES (?, randomblob(3000))", (n,))
            if n == stop_inside:
                print("inside", n, flush=True)
                sys.stdin.read()          # killed here, the transaction open
        print("committed", n, flush=True)  # only after COMMIT returned
""")


def _run_writer(path, stop_inside: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(stop_inside)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _rows(path) -> set[int]:
    conn = db.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {r[0] for r in conn.execute("SELECT n FROM t")}
    finally:
        conn.close()


def test_connections_use_wal_and_synchronous_full(tmp_path):
    conn = db.connect(tmp_path / "x.db", create=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    finally:
        conn.close()


def test_kill9_inside_a_transaction_keeps_every_commit_and_drops_the_open_one(tmp_path):
    path = tmp_path / "x.db"
    p = _run_writer(path, stop_inside=40)
    committed = []
    for line in p.stdout:
        word, n = line.split()
        if word == b"inside":
            break
        committed.append(int(n))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert committed == list(range(1, 40))
    assert (tmp_path / "x.db-wal").exists()          # the commits were in the WAL
    assert _rows(path) == set(committed)             # 40 was never committed


@pytest.mark.parametrize("seed", range(5))
def test_kill9_at_a_random_moment_loses_no_commit(tmp_path, seed):
    """Killed while it commits as fast as it can: every transaction it saw commit is
    there after reopening, and at most the one in flight besides."""
    path = tmp_path / "x.db"
    rng = random.Random(seed)
    p = _run_writer(path, stop_inside=-1)
    last = 0
    target = rng.randint(20, 400)
    for line in p.stdout:
        last = int(line.split()[1])
        if last >= target:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    rows = _rows(path)
    assert set(range(1, last + 1)) <= rows
    assert rows <= set(range(1, last + 2))


def test_reopened_database_is_not_damaged_by_the_kill(tmp_path):
    """After the kill the next writer continues the same table (nothing is locked)."""
    path = tmp_path / "x.db"
    p = _run_writer(path, stop_inside=5)
    assert p.stdout.readline().startswith(b"committed 1")
    while not p.stdout.readline().startswith(b"inside"):
        pass
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    conn = db.connect(path)
    try:
        with db.write_txn(conn):
            conn.execute("INSERT INTO t VALUES (5, NULL)")
        assert [r[0] for r in conn.execute("SELECT n FROM t ORDER BY n")] == [1, 2, 3, 4, 5]
    finally:
        conn.close()
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
