"""The audit trail: one hash-chained record per key or management operation,
successful or refused.

Each record is a JSON object (UTC time, operation, key id and version, the
encryption context, the caller's uid / pid / command line, the result and, for a
refusal, the error).  A management operation (disk, snapshot, attach, serve...)
is recorded by :func:`record`, with the ``objects`` it acted on (type, name, id)
and, for a refusal, the ``exit_code``; key operations are recorded by the key
provider inside the transaction of their change.  It is stored as canonical JSON (sorted keys, no whitespace)
together with::

    hash(n) = SHA-256( bytes.fromhex(hash(n-1)) || canonical_json(record n) )

with hash(0) = 32 zero bytes.  Every record also carries its own sequence number
``seq`` (1, 2, 3, ... without gaps), and the table ``audit_head`` holds the
sequence number and hash of the newest record, updated in the same transaction
as each append.  :func:`verify` therefore detects an edited record (its hash no
longer matches), a removed or reordered record (a gap in ``seq`` or a broken
``prev_hash`` link) and a truncated tail (the head points past the last record).

What it cannot do: the chain has no secret key (refused operations are logged
even when no passphrase was given), so someone who can rewrite the whole
database can recompute a consistent chain and head.  Against that, note the head
(``blockcrypt audit verify`` prints it) somewhere the attacker cannot write, and
later check it is still part of the chain with ``audit verify --anchor SEQ:HASH``.

Appends must run inside the caller's write transaction (``BEGIN IMMEDIATE``), so
records are totally ordered even across concurrent processes.  The tables are
registered with the database by :mod:`blockcrypt.kms.schema`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from datetime import datetime, timezone

from ..storage.db import write_txn

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq         INTEGER PRIMARY KEY,      -- 1, 2, 3, ... no gaps
    time        TEXT NOT NULL,            -- UTC, %Y-%m-%dT%H:%M:%S.%fZ (sorts as text)
    operation   TEXT NOT NULL,
    key_id      TEXT,                     -- NULL when the key could not be resolved
    record      TEXT NOT NULL,            -- canonical JSON of the record: what is hashed
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_key ON audit_log(key_id);
CREATE TABLE IF NOT EXISTS audit_head (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         INTEGER NOT NULL,
    hash        TEXT NOT NULL
)
"""

GENESIS_HASH = "00" * 32


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def chain_hash(prev_hash: str, record_bytes: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + record_bytes).hexdigest()


def caller() -> dict:
    """Who asked: uid, pid and command line (argv never holds secrets in blockcrypt)."""
    return {"uid": os.getuid(), "pid": os.getpid(), "command": list(sys.argv)}


def append(conn: sqlite3.Connection, *, time: str, operation: str, key_id: str | None,
           key_version: int | None, context: dict | None, result: str,
           error: str | None = None, details: dict | None = None,
           **extra) -> dict:
    """Append one record; call inside a write transaction.  Returns the record.
    ``extra`` fields (``objects``, ``exit_code``) are part of the record when given."""
    head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    seq, prev = (head["seq"] + 1, head["hash"]) if head else (1, GENESIS_HASH)
    record = {"seq": seq, "time": time, "operation": operation, "key_id": key_id,
              "key_version": key_version, "context": context, "caller": caller(),
              "result": result, "error": error, "details": details or {}}
    record.update({k: v for k, v in extra.items() if v is not None})
    raw = canonical(record)
    h = chain_hash(prev, raw)
    conn.execute("INSERT INTO audit_log (seq, time, operation, key_id, record, prev_hash, hash)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (seq, time, operation, key_id, raw.decode("utf-8"), prev, h))
    conn.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                 "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                 (seq, h))
    return record


def record(conn: sqlite3.Connection, operation: str, *, objects: list[dict],
           error=None, details: dict | None = None) -> dict:
    """Record a management operation in a write transaction of its own.

    ``objects``: what it acted on, each ``{"type", "name", "id"}`` (the id is None
    when the object does not exist); ``error``: the BlockcryptError of a refusal.
    """
    time = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with write_txn(conn):
        return append(conn, time=time, operation=operation, key_id=None, key_version=None,
                      context=None, result="refused" if error else "success",
                      error=f"{type(error).__name__}: {error.message}" if error else None,
                      details=details, objects=objects,
                      exit_code=error.exit_code if error else None)


def query(conn: sqlite3.Connection, *, key_id: str | None = None,
          since: str | None = None) -> list[dict]:
    """Records in chain order, optionally for one key id and from a UTC time on."""
    sql, args = "SELECT seq, record, hash FROM audit_log WHERE 1=1", []
    if key_id is not None:
        sql += " AND key_id = ?"
        args.append(key_id)
    if since is not None:
        sql += " AND time >= ?"
        args.append(since)
    out = []
    for row in conn.execute(sql + " ORDER BY seq", args):
        rec = json.loads(row["record"])
        rec["hash"] = row["hash"]
        out.append(rec)
    return out


def verify(conn: sqlite3.Connection, *, anchors: list[tuple[int, str]] = (),
           expect_records: bool = True) -> dict:
    """Check the whole chain.  Returns {ok, records, head_seq, head_hash, problems}.

    ``anchors`` are (seq, hash) pairs noted earlier; each must still be in the chain.
    """
    problems: list[str] = []
    prev_hash, expected_seq, count = GENESIS_HASH, 1, 0
    hashes: dict[int, str] = {}
    cur = conn.execute("SELECT seq, time, operation, key_id, record, prev_hash, hash "
                       "FROM audit_log ORDER BY seq")
    for row in cur:
        count += 1
        seq = row["seq"]
        if seq != expected_seq:  # rows come sorted by their unique seq: a gap
            missing = (f"record {expected_seq} is" if seq == expected_seq + 1
                       else f"records {expected_seq} to {seq - 1} are")
            problems.append(f"{missing} missing (removed from the trail)")
        raw = row["record"] if isinstance(row["record"], str) else str(row["record"])
        try:
            rec = json.loads(raw)
            fields_ok = (rec.get("seq") == seq and rec.get("time") == row["time"]
                         and rec.get("operation") == row["operation"]
                         and rec.get("key_id") == row["key_id"])
        except (ValueError, AttributeError):
            fields_ok = False
        if not fields_ok:
            problems.append(f"record {seq} was edited (its columns disagree with its content)")
        if row["prev_hash"] != prev_hash:
            problems.append(f"record {seq} does not follow the record before it "
                            "(a record was removed, inserted or reordered)")
        computed = (chain_hash(row["prev_hash"], raw.encode("utf-8"))
                    if _is_hex64(row["prev_hash"]) else None)
        if computed is None or computed != row["hash"]:
            problems.append(f"record {seq} was edited (its hash does not match its content)")
        hashes[seq] = row["hash"]
        prev_hash = row["hash"]
        expected_seq = seq + 1
    last_seq = expected_seq - 1
    head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    if head is None:
        if count or expect_records:
            problems.append("the audit head is missing (the trail was removed or rewritten)")
    else:
        if head["seq"] > last_seq:
            problems.append(f"records {last_seq + 1} to {head['seq']} are missing "
                            "(the end of the trail was cut off)")
        elif head["seq"] < last_seq:
            problems.append(f"records after {head['seq']} were added behind the audit head")
        elif head["hash"] != prev_hash:
            problems.append("the audit head does not match the last record")
    if expect_records and count == 0:
        problems.append("the audit trail is empty although the store exists")
    for seq, h in anchors:
        if hashes.get(seq) != h.lower():
            problems.append(f"anchor {seq}:{h} is not in the chain (the trail was rewritten)")
    return {"ok": not problems, "records": count,
            "head_seq": last_seq if count else 0, "head_hash": prev_hash if count else None,
            "problems": problems}


def _is_hex64(s) -> bool:
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)
