"""`blockcrypt snapshot ...`: create, list, show, delete, export."""
from __future__ import annotations

import contextlib
from pathlib import Path

import click

from . import App, cli, json_option, pass_app
from .output import format_fields, format_table, human_size
from .progress import shown


@contextlib.contextmanager
def lifecycle(app: App):
    """The LifecycleService of this home, its key store closed (KEK wiped) on exit.
    The passphrase is asked for only when a data key must be re-wrapped."""
    from ..services.snapshots import LifecycleService
    from .store import open_store
    with open_store(app) as store:
        yield LifecycleService(app.home, store.conn, store)


def _print_snapshot(s: dict) -> None:
    if s["state"] != "complete":
        click.echo(format_fields([("name", s["name"]), ("disk", s["disk_name"]),
                                  ("state", f"{s['state']} ({s['percent']}% copied)")]))
        return
    rows = [
        ("name", s["name"]), ("id", s["id"]),
        ("disk", s["disk_name"] + ("" if s["disk_exists"] else " (deleted)")),
        ("size", f"{human_size(s['size_bytes'])} ({s['size_bytes']} bytes)"),
        ("allocated", human_size(s["allocated_bytes"])),
        ("sector size", s["sector_size"]),
        ("encrypted", "yes (aes-xts-plain64, the disk's data key)" if s["encrypted"] else "no"),
        ("cmk", s["cmk_id"] or "-"), ("lineage", s["lineage_id"] or "-"),
        ("created", s["created_at"]), ("file", s["path"]),
    ]
    click.echo(format_fields(rows))


def _print_list(snaps: list[dict]) -> None:
    if not snaps:
        click.echo("no snapshots; take one with `blockcrypt snapshot create DISK NAME`")
        return
    click.echo(format_table(
        ["NAME", "DISK", "STATE", "SIZE", "ALLOCATED", "ENCRYPTED", "CMK", "CREATED"],
        [[s["name"], s["disk_name"], "complete", human_size(s["size_bytes"]),
          human_size(s["allocated_bytes"]), "yes" if s["encrypted"] else "no",
          s["cmk_id"], s["created_at"]] if s["state"] == "complete" else
         [s["name"], s["disk_name"], f"copying {s['percent']}%", human_size(s["total_bytes"]),
          "-", "-", "-", "-"] for s in snaps]))


@cli.group("snapshot")
def snapshot_group():
    """Snapshots of disks: the stored data (ciphertext for encrypted disks) and the
    same data key, copied thin (reflink or sparse copy)."""


@snapshot_group.command("create")
@click.argument("disk")
@click.argument("name")
@click.option("--freeze", is_flag=True,
              help="Freeze DISK's mounted file system (fsfreeze) around the instant: an "
                   "application-consistent snapshot (DISK attached and mounted here).")
@json_option
@pass_app
def create_cmd(app: App, disk, name, freeze):
    """Snapshot DISK as NAME, whether DISK is attached or not.

    While attached, I/O is paused only to fix the instant (milliseconds): a
    reflink where the file system has one (XFS, btrfs), else the data is copied
    in the background while writes go on, each first saving the old data it
    overwrites into the snapshot (copy-before-write).  Crash-consistent: a
    mounted file system recovers on the copy as after a power cut; --freeze
    makes it clean.
    """
    with lifecycle(app) as life, shown(app.json_output, f"snapshot {name} of disk {disk}"):
        s = life.create_snapshot(disk, name, freeze=freeze)
    how = "I/O paused to fix the instant" if s["quiesced"] else "disk not in use"
    app.emit(s, f"created snapshot {name} of disk {disk} ({s['copy_method']} copy, {how}; "
                f"{human_size(s['allocated_bytes'])} allocated)")


@snapshot_group.command("list")
@click.option("--disk", default=None, help="Only snapshots of this disk.")
@json_option
@pass_app
def list_cmd(app: App, disk):
    """List snapshots."""
    with lifecycle(app) as life:
        app.emit(life.list_snapshots(disk), _print_list)


@snapshot_group.command("show")
@click.argument("name")
@json_option
@pass_app
def show_cmd(app: App, name):
    """Show one snapshot."""
    with lifecycle(app) as life:
        app.emit(life.show_snapshot(name), _print_snapshot)


@snapshot_group.command("delete")
@click.argument("name")
@json_option
@pass_app
def delete_cmd(app: App, name):
    """Delete a snapshot (disks created from it are independent and unaffected)."""
    with lifecycle(app) as life:
        app.emit(life.delete_snapshot(name), f"deleted snapshot {name}")


@snapshot_group.command("export")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@pass_app
def export_cmd(app: App, name, file):
    """Write an UNENCRYPTED snapshot to FILE as a raw disk image (sparse).

    Encrypted snapshots cannot be exported; create a disk from one and copy
    its files with `blockcrypt disk copy` instead.
    """
    with lifecycle(app) as life, shown(app.json_output, f"exporting snapshot {name}"):
        r = life.export_snapshot(name, file)
    app.emit(r, f"exported snapshot {name} to {file} ({human_size(r['size_bytes'])} raw image)")
