"""`blockcrypt audit` (list records) and `blockcrypt audit verify` (check the hash chain)."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import click

from .. import errors
from . import App, cli, json_option
from .output import format_table
from .store import open_store

_AGE_RE = re.compile(r"([0-9]{1,12})([smhd])", re.ASCII)
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_ANCHOR_RE = re.compile(r"([0-9]{1,19}):([0-9a-fA-F]{64})", re.ASCII)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC unless it carries an offset) or an age like 30m, 12h, 7d,
    in ASCII characters."""
    bad = errors.InvalidInput(
        detail=f"--since {text!r}: use an ISO time such as 2025-01-31T12:00:00Z or an "
               "age such as 30m, 12h, 7d, in ASCII characters")
    text = text.strip(" \t")
    if not text.isascii():
        raise bad
    m = _AGE_RE.fullmatch(text)
    try:
        if m:
            now = now or datetime.now(timezone.utc)
            return now - timedelta(**{_AGE_UNITS[m.group(2)]: int(m.group(1))})
        t = datetime.fromisoformat(text)
    except (ValueError, OverflowError):     # not a time, or before year 1
        raise bad from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def parse_anchor(text: str) -> tuple[int, str]:
    """--anchor SEQ:HASH (ASCII digits, 64 hex digits) -> (seq, hash)."""
    m = _ANCHOR_RE.fullmatch(text)
    if not m:
        raise errors.InvalidInput(detail=f"--anchor {text!r}: use SEQ:HASH as printed by "
                                         "`blockcrypt audit verify`")
    return int(m.group(1)), m.group(2)


def _summary(rec: dict) -> str:
    if rec["error"]:
        return rec["error"]
    if rec["context"]:
        return "context " + json.dumps(rec["context"], sort_keys=True, separators=(",", ":"))
    details = {k: v for k, v in (rec.get("details") or {}).items() if v not in (None, False)}
    return json.dumps(details, sort_keys=True, separators=(",", ":")) if details else ""


def _print_records(records: list[dict]) -> None:
    if not records:
        click.echo("no audit records match")
        return
    rows = [[r["seq"], r["time"], r["operation"], _subject(r), r["key_version"], r["result"],
             r["caller"]["uid"], r["caller"]["pid"], _summary(r)] for r in records]
    click.echo(format_table(["#", "TIME (UTC)", "OPERATION", "KEY / OBJECT", "VER", "RESULT",
                             "UID", "PID", "DETAIL"], rows))


def _subject(rec: dict) -> str | None:
    """The key of a key operation; the disks and snapshots of a management operation."""
    objects = rec.get("objects")
    if not objects:
        return rec["key_id"]
    return ", ".join(f"{o['type']} {o['name']}" for o in objects)


@cli.group("audit", invoke_without_command=True)
@click.option("--key", default=None, help="Only records of this key (id or alias).")
@click.option("--since", default=None,
              help="Only records from this time on: ISO 8601 (UTC unless an offset is "
                   "given) or an age such as 30m, 12h, 7d.")
@json_option
@click.pass_context
def audit_group(ctx: click.Context, key: str | None, since: str | None):
    """List the audit trail of key and management operations (successful and refused).

    `blockcrypt audit verify` checks that no record was edited, removed or reordered.
    """
    if ctx.invoked_subcommand is not None:
        return
    app: App = ctx.find_object(App)
    since_t = parse_since(since) if since else None
    with open_store(app) as store:
        records = store.audit_records(key=key, since=since_t)
    app.emit(records, _print_records)


@audit_group.command("verify")
@click.option("--anchor", "anchors", multiple=True, metavar="SEQ:HASH",
              help="A head noted earlier (seq and hash from a previous verify); it must "
                   "still be part of the chain.  Repeatable.")
@json_option
@click.pass_context
def audit_verify(ctx: click.Context, anchors: tuple[str, ...]):
    """Verify the hash chain of the audit trail; exit non-zero if it was tampered with."""
    app: App = ctx.find_object(App)
    parsed = [parse_anchor(a) for a in anchors]
    with open_store(app) as store:
        report = store.verify_audit(anchors=parsed)
    if report["ok"]:
        app.emit(report, f"audit trail intact: {report['records']} records; head "
                         f"{report['head_seq']}:{report['head_hash']}\n"
                         "(keep this head elsewhere and check it later with "
                         "`blockcrypt audit verify --anchor SEQ:HASH`)")
        return
    if app.json_output:
        app.emit(report)
    raise errors.AuditTampered(detail="; ".join(report["problems"]))
