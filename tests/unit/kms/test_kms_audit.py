"""The audit trail (blockcrypt/kms/audit.py): records, the hash chain, tamper detection."""
from __future__ import annotations

import json
import os
import sqlite3
import sys

import pytest

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import audit
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage.home import Home

PASS = b"audit test passphrase"
CTX = {"uid": "11" * 16, "cipher": "aes-xts-plain64"}


@pytest.fixture
def home(tmp_path) -> Home:
    """A store with a mix of successful and refused operations (12 records)."""
    h = Home(tmp_path / "home")
    KeyStore.init(h, Secret(PASS))
    with KeyStore.open(h, lambda: Secret(PASS)) as ks:
        ks.create_key(alias="k")
        dk, blob = ks.generate_data_key("k", CTX)
        ks.decrypt_data_key(blob, CTX).wipe()
        ks.rotate("k")
        ks.disable("k")
        with pytest.raises(errors.KeyStateError):
            ks.decrypt_data_key(blob, CTX)
        ks.enable("k")
        with pytest.raises(errors.UnwrapError):
            ks.decrypt_data_key(blob, {"uid": "other"})
        ks.reencrypt_data_key(blob, CTX, {**CTX, "uid": "22" * 16})
        ks.schedule_deletion("k", pending_days=7)
        ks.cancel_deletion("k")
    return h


def verify(h: Home, **kw) -> dict:
    with KeyStore.open(h) as ks:
        return ks.verify_audit(**kw)


def edit(h: Home, sql: str, *args) -> None:
    conn = sqlite3.connect(h.db_path)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_records_describe_every_operation(home):
    with KeyStore.open(home) as ks:
        records = ks.audit_records()
        key_id = ks.get_key("k")["id"]
    assert [(r["operation"], r["result"]) for r in records] == [
        ("init", "success"), ("create", "success"), ("generate", "success"),
        ("decrypt", "success"), ("rotate", "success"), ("disable", "success"),
        ("decrypt", "refused"), ("enable", "success"), ("decrypt", "refused"),
        ("reencrypt", "success"), ("schedule-deletion", "success"),
        ("cancel-deletion", "success")]
    assert [r["seq"] for r in records] == list(range(1, 13))
    gen = records[2]
    assert (gen["key_id"], gen["key_version"], gen["context"]) == (key_id, 1, CTX)
    assert gen["caller"] == {"uid": os.getuid(), "pid": os.getpid(), "command": sys.argv}
    assert gen["time"].endswith("Z")
    refused = records[6]
    assert refused["error"].startswith("KeyStateError: ") and "Disabled" in refused["error"]
    assert records[8]["context"] == {"uid": "other"}
    assert records[9]["key_version"] == 2 and records[9]["details"]["from_version"] == 1
    report = verify(home)
    assert report == {"ok": True, "records": 12, "head_seq": 12,
                      "head_hash": records[-1]["hash"], "problems": []}


def test_filters(home):
    with KeyStore.open(home) as ks:
        assert {r["key_id"] for r in ks.audit_records(key="k")} == {ks.get_key("k")["id"]}
        assert len(ks.audit_records(key="k")) == 11
        with pytest.raises(errors.KeyNotFound):
            ks.audit_records(key="missing")
        from datetime import datetime, timedelta, timezone
        future = datetime.now(timezone.utc) + timedelta(minutes=5)
        assert ks.audit_records(since=future) == []
        assert len(ks.audit_records(since=future - timedelta(hours=1))) == 12


def test_edited_record_is_detected(home):
    row = sqlite3.connect(home.db_path).execute(
        "SELECT record FROM audit_log WHERE seq = 7").fetchone()[0]
    rec = json.loads(row)
    rec["result"] = "success"
    edit(home, "UPDATE audit_log SET record = ? WHERE seq = 7", audit.canonical(rec).decode())
    report = verify(home)
    assert not report["ok"]
    assert any("record 7 was edited" in p for p in report["problems"])


def test_edited_record_with_recomputed_hash_is_detected(home):
    conn = sqlite3.connect(home.db_path)
    prev, raw = conn.execute("SELECT prev_hash, record FROM audit_log WHERE seq = 5").fetchone()
    conn.close()
    rec = json.loads(raw)
    rec["key_version"] = 9
    raw = audit.canonical(rec)
    edit(home, "UPDATE audit_log SET record = ?, hash = ? WHERE seq = 5", raw.decode(),
         audit.chain_hash(prev, raw))
    report = verify(home)
    assert any("record 6 does not follow" in p for p in report["problems"])


def test_edited_column_is_detected(home):
    edit(home, "UPDATE audit_log SET operation = 'enable' WHERE seq = 6")
    assert any("record 6 was edited" in p for p in verify(home)["problems"])


def test_removed_record_is_detected(home):
    edit(home, "DELETE FROM audit_log WHERE seq = 4")
    problems = verify(home)["problems"]
    assert any("record 4 is missing" in p for p in problems)
    assert any("record 5 does not follow" in p for p in problems)


def test_reordered_records_are_detected(home):
    conn = sqlite3.connect(home.db_path)
    a = conn.execute("SELECT * FROM audit_log WHERE seq = 3").fetchone()
    b = conn.execute("SELECT * FROM audit_log WHERE seq = 4").fetchone()
    conn.execute("DELETE FROM audit_log WHERE seq IN (3, 4)")
    # Swap their places (each row keeps its content, hashes and links).
    conn.execute("INSERT INTO audit_log VALUES (3, ?, ?, ?, ?, ?, ?)", b[1:])
    conn.execute("INSERT INTO audit_log VALUES (4, ?, ?, ?, ?, ?, ?)", a[1:])
    conn.commit()
    conn.close()
    report = verify(home)
    assert not report["ok"]
    assert any("does not follow" in p for p in report["problems"])


def test_truncated_tail_is_detected(home):
    edit(home, "DELETE FROM audit_log WHERE seq > 10")
    report = verify(home)
    assert report["problems"] == ["records 11 to 12 are missing (the end of the trail was cut off)"]


def test_removing_everything_is_detected(home):
    edit(home, "DELETE FROM audit_log")
    edit(home, "DELETE FROM audit_head")
    problems = verify(home)["problems"]
    assert any("audit head is missing" in p for p in problems)
    assert any("empty" in p for p in problems)


def test_a_consistent_rewrite_is_caught_only_by_an_anchor(home):
    """The documented limit: without a secret, a full rewrite verifies; an anchor does not."""
    head = verify(home)
    conn = sqlite3.connect(home.db_path)
    rows = conn.execute("SELECT seq, record FROM audit_log ORDER BY seq").fetchall()
    conn.execute("DELETE FROM audit_log")
    prev = audit.GENESIS_HASH
    for seq, raw in rows[:-1]:                 # drop the last record, rehash the rest
        rec = json.loads(raw)
        h = audit.chain_hash(prev, raw.encode())
        conn.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (seq, rec["time"], rec["operation"], rec["key_id"], raw, prev, h))
        prev = h
    conn.execute("UPDATE audit_head SET seq = ?, hash = ?", (len(rows) - 1, prev))
    conn.commit()
    conn.close()
    assert verify(home)["ok"]
    report = verify(home, anchors=[(head["head_seq"], head["head_hash"])])
    assert not report["ok"] and "anchor" in report["problems"][0]


def test_refusals_are_recorded_although_the_operation_rolled_back(home):
    with KeyStore.open(home) as ks:
        before = ks.list_keys()
        n = len(ks.audit_records())
        with pytest.raises(errors.PassphraseRequired):
            ks.create_key(alias="x")
        with pytest.raises(errors.KeyNotFound):
            ks.disable("missing")
        assert ks.list_keys() == before
        recs = ks.audit_records()[n:]
    assert [(r["operation"], r["result"], r["key_id"]) for r in recs] == [
        ("create", "refused", None), ("disable", "refused", None)]
    assert recs[0]["error"].startswith("PassphraseRequired")
    assert verify(home)["ok"]
