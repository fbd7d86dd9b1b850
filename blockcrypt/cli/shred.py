"""`blockcrypt audit shred-report KEY`: the proof of erasure of a destroyed key.

Prints the crypto-shred record(s) of the key (:mod:`blockcrypt.kms.local.shred`):
which disks and snapshots can no longer be decrypted, the key and the versions
whose material was destroyed, the record's place and hash in the audit chain, and
whether the whole chain verifies (an edited record would not).
"""
from __future__ import annotations

import click

from .. import errors
from . import App, json_option, pass_app
from .audit import audit_group
from .output import format_fields, format_table, indent
from .store import open_store


def _print(data: dict) -> None:
    for rec in data["records"]:
        d = rec["details"]
        key = d["key"]
        click.echo(format_fields([
            ("Key", key["id"]), ("Alias (freed)", key["alias"] or "-"),
            ("Provider", key["provider"]), ("Destroyed at", rec["time"]),
            ("Versions destroyed", ", ".join(map(str, d["versions_destroyed"])) or "-"),
            ("Audit record", f"#{rec['seq']} {rec['hash']}"),
            ("Audit chain", "intact (`blockcrypt audit verify`)" if data["chain"]["ok"] else
             "TAMPERED: " + "; ".join(data["chain"]["problems"]))], colon=False))
        click.echo(f"\nUnrecoverable ({d['unrecoverable_count']})")
        rows = [[i["kind"], i["name"], i["uid"], i["lineage_id"]] for i in d["unrecoverable"]]
        click.echo(indent(format_table(["KIND", "NAME", "UID", "LINEAGE"], rows) if rows
                          else "no disk or snapshot used this key"))
        click.echo(f"\n{d['statement']}.")


@audit_group.command("shred-report")
@click.argument("key")
@json_option
@pass_app
def shred_report(app: App, key: str):
    """The crypto-shred record of a destroyed key (by id or the alias it had)."""
    with open_store(app) as store:
        records = store.shred_reports(key)
        chain = store.verify_audit()
    if not records:
        raise errors.NotFound(what="crypto-shred record of key", name=key)
    data = {"key": key, "records": records, "chain": chain}
    app.emit(data, _print)
    if not chain["ok"]:
        raise errors.AuditTampered(detail="; ".join(chain["problems"]))
