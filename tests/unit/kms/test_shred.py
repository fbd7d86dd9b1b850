"""The crypto-shred record (blockcrypt/kms/local/shred.py), for keys of every provider.

When a key's deletion window passes, its material is destroyed and the audit chain
gains one ``shred`` record naming every disk and snapshot that can no longer be
decrypted (kind, name, container uid, lineage), the key and the versions destroyed;
``audit verify`` fails if the record is edited.  The CLI prints it with
``blockcrypt audit shred-report KEY``.
"""
from __future__ import annotations

import json
import sqlite3

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage import catalog
from blockcrypt.storage.home import Home

from support.cli import run_cli
from support.clock import Clock
from support.providers import provider_args, provider_spec

PASS = b"shred test passphrase"
CTX = {"uid": "aa" * 16}


def source():
    return lambda: Secret(PASS)


def _add_container(conn, table: str, name: str, uid: str, key_id: str) -> None:
    if table == "disks":
        conn.execute("INSERT INTO disks (id, name, path, size_bytes, sector_size, encrypted, "
                     "cmk_id, lineage_id, created_at) VALUES (?, ?, ?, 4096, 4096, 1, ?, ?, "
                     "'2030-01-01T00:00:00Z')", (uid, name, f"disks/{uid}.bcd", key_id,
                                                 "11" * 16))
    else:
        conn.execute("INSERT INTO snapshots (id, name, disk_id, disk_name, path, size_bytes, "
                     "sector_size, encrypted, cmk_id, lineage_id, created_at) VALUES "
                     "(?, ?, NULL, 'db', ?, 4096, 4096, 1, ?, ?, '2030-01-01T00:00:00Z')",
                     (uid, name, f"snapshots/{uid}.bcd", key_id, "11" * 16))
    conn.commit()


def test_destroying_a_key_writes_one_shred_record(tmp_path, provider_name, request):
    clock = Clock()
    home = Home(tmp_path / "home")
    KeyStore.init(home, Secret(PASS), now=clock)
    opened = dict(now=clock, dependants=catalog.key_dependants, inventory=catalog.key_inventory)
    with KeyStore.open(home, source(), **opened) as ks:
        if provider_name != "local":
            type_, options = provider_spec(request, provider_name)
            ks.add_provider(provider_name, type_, **options)
        key = ks.create_key(alias="doomed", provider=provider_name)
        ks.rotate("doomed")
        other = ks.create_key(alias="kept", provider=provider_name)
        ks.generate_data_key("doomed", CTX)[0].wipe()
        _add_container(ks.conn, "disks", "db", "aa" * 16, key["id"])
        _add_container(ks.conn, "snapshots", "db-monday", "bb" * 16, key["id"])
        _add_container(ks.conn, "disks", "web", "cc" * 16, other["id"])
        ks.schedule_deletion("doomed", pending_days=7, force=True)
    clock.advance(days=7)
    with KeyStore.open(home, source(), **opened) as ks:
        assert ks.get_key(key["id"])["state"] == "Destroyed"
        reports = ks.shred_reports(key["id"])
        assert reports == ks.shred_reports("doomed")       # also by the alias it had
        assert len(reports) == 1
        rec = reports[0]
        assert (rec["operation"], rec["key_id"], rec["result"]) == ("shred", key["id"],
                                                                     "success")
        d = rec["details"]
        assert d["key"]["alias"] == "doomed" and d["key"]["provider"] == provider_name
        assert d["versions_destroyed"] == [1, 2]
        assert d["unrecoverable"] == [
            {"kind": "disk", "name": "db", "uid": "aa" * 16, "lineage_id": "11" * 16,
             "created_at": "2030-01-01T00:00:00Z"},
            {"kind": "snapshot", "name": "db-monday", "uid": "bb" * 16,
             "lineage_id": "11" * 16, "created_at": "2030-01-01T00:00:00Z"}]
        ops = [r["operation"] for r in ks.audit_records(key=key["id"])]
        assert ops[-2:] == ["destroy", "shred"]             # one record, after the destroy
        assert ks.verify_audit()["ok"]
        assert ks.shred_reports("kept") == []
    # An edited shred record breaks the chain.
    conn = sqlite3.connect(home.db_path)
    raw = conn.execute("SELECT record FROM audit_log WHERE seq = ?", (rec["seq"],)).fetchone()[0]
    forged = json.loads(raw)
    forged["details"]["unrecoverable"] = forged["details"]["unrecoverable"][:1]
    conn.execute("UPDATE audit_log SET record = ? WHERE seq = ?",
                 (json.dumps(forged, sort_keys=True, separators=(",", ":")), rec["seq"]))
    conn.commit()
    conn.close()
    with KeyStore.open(home, source(), now=clock) as ks:
        report = ks.verify_audit()
        assert not report["ok"] and f"record {rec['seq']} was edited" in report["problems"][0]


def test_shred_report_command(tmp_path, passphrase_file, provider_name, request):
    home = tmp_path / "home"

    def cli(*args, check=True, env=None):
        return run_cli(*args, home=home, passphrase_file=passphrase_file, check=check, env=env)
    cli("init")
    if provider_name != "local":
        cli(*provider_args(request, provider_name))
    key = json.loads(cli("key", "create", "--alias", "gone", "--provider", provider_name,
                         "--json").stdout)
    disk = json.loads(cli("disk", "create", "vol", "--size", "1M", "--key", "gone",
                          "--json").stdout)
    cli("key", "schedule-deletion", "gone", "--pending-days", "7", "--force")
    cp = cli("audit", "shred-report", "gone", check=False)
    assert cp.returncode == errors.NotFound.exit_code and "not found" in cp.stderr.decode()
    # Eight days on (test-only clock skew): opening the store destroys the key.
    later = {"BLOCKCRYPT_TESTONLY_CLOCK_SKEW_DAYS": "8"}
    assert json.loads(cli("key", "show", key["id"], "--json", env=later).stdout)["state"] \
        == "Destroyed"
    out = cli("audit", "shred-report", "gone").stdout.decode()
    assert "Unrecoverable (1)" in out and disk["id"] in out and "vol" in out
    assert "intact" in out and "Versions destroyed  1" in out
    data = json.loads(cli("audit", "shred-report", key["id"], "--json").stdout)
    assert data["chain"]["ok"] is True
    assert data["records"][0]["details"]["unrecoverable"][0]["uid"] == disk["id"]
