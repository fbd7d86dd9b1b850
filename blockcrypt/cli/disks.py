"""`blockcrypt disk ...`: create (also from a snapshot), resize, reset, reinit, copy, list, show,
delete, attach, detach, serve, header-backup, header-restore."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from .. import errors, names
from ..constants import DEFAULT_SECTOR_SIZE, SECTOR_SIZES
from . import App, cli, json_option, pass_app
from .output import format_fields, format_table, human_size
from .params import ASCII_INT
from .progress import shown
from .progress import wanted as progress_wanted


@contextlib.contextmanager
def _service(app: App):
    """The disk service on this home's key store (closed, KEK wiped, on exit)."""
    from ..services.disks import DiskService
    from .store import open_store
    with open_store(app) as store:
        yield DiskService(app.home, store.conn, store)


def _print_disk(d: dict) -> None:
    rows = [
        ("name", d["name"]), ("id", d["id"]),
        ("size", f"{human_size(d['size_bytes'])} ({d['size_bytes']} bytes)"),
        ("sector size", d["sector_size"]),
        ("encrypted", "yes (aes-xts-plain64)" if d["encrypted"] else "no"),
        ("cmk", d["cmk_id"] or "-"), ("lineage", d["lineage_id"] or "-"),
        ("discard", "yes" if d["discard"] else "no"), ("created", d["created_at"]),
        ("state", d["state"]), ("store", d.get("store", "file")),
    ]
    if d.get("key"):
        rows.append(("key", d["key"]["note"]))
    if d["state"] != "available":
        rows += [("device", d["device"] or "-"), ("method", d["method"]),
                 ("read-only", "yes" if d["read_only"] else "no"),
                 ("socket", d["socket"] or "-")]
    if "persistent" in d:
        rows.append(("at boot", "attaches (persistent)" if d["persistent"] else "no"))
    rows.append(("file" if d.get("store", "file") == "file" else "image", d["path"]))
    click.echo(format_fields(rows))


def _print_table(disks: list[dict]) -> None:
    if not disks:
        click.echo("no disks; create one with `blockcrypt disk create NAME --size 10G`")
        return
    click.echo(format_table(
        ["NAME", "SIZE", "SECTOR", "ENCRYPTED", "CMK", "STORE", "STATE", "DEVICE"],
        [[d["name"], human_size(d["size_bytes"]), d["sector_size"],
          "yes" if d["encrypted"] else "no", d["cmk_id"] or "-", d.get("store", "file"),
          d["state"],
          d["device"] or ("served" if d["method"] == "serve" else "-")] for d in disks]))


@cli.group("disk")
def disk_group():
    """Encrypted and plain virtual disks."""


@disk_group.command("create")
@click.argument("name")
@click.option("--size", "size_text", default=None,
              help="Size in bytes or with a suffix K, M, G, T (powers of 1024), e.g. 10G. "
                   "Required unless --from-snapshot (then it may only grow the disk).")
@click.option("--encrypted/--no-encrypted", default=None,
              help="Encrypt with AES-256-XTS under a CMK (the default), or make a plain disk. "
                   "With --from-snapshot it may only confirm the snapshot's encryption.")
@click.option("--key", "key_ref", default=None,
              help="CMK id or alias wrapping the data key (default: the service key "
                   "blockcrypt/default).")
@click.option("--sector-size", type=click.Choice([str(s) for s in SECTOR_SIZES]), default=None,
              help=f"Logical sector size of the disk (default {DEFAULT_SECTOR_SIZE}).")
@click.option("--discard", is_flag=True,
              help="Let trim deallocate space in the file (reveals which ranges are unused).")
@click.option("--from-snapshot", "snapshot", default=None,
              help="Create the disk from this snapshot: same contents, encryption, CMK, "
                   "sector size and data key.")
@click.option("--flatten", is_flag=True,
              help="With --from-snapshot of a disk on Ceph: copy the snapshot's data into "
                   "the new disk now, so that it does not depend on the snapshot (which can "
                   "then be deleted). A disk in the home never depends on its snapshot.")
@click.option("--store", "store", default=None,
              help="The store the disk lives in (`blockcrypt store list`; default: files "
                   "under the home).")
@json_option
@pass_app
def create_cmd(app: App, name, size_text, encrypted, key_ref, sector_size, discard, snapshot,
               flatten, store):
    """Create a disk NAME of --size bytes, or from a snapshot."""
    names.validate_name(name)
    if flatten and snapshot is None:
        raise errors.InvalidInput(detail="--flatten applies to a disk created from a "
                                         "snapshot; add --from-snapshot SNAPSHOT or drop it")
    if snapshot is not None and store is not None:
        raise errors.InvalidInput(detail="a disk from a snapshot lives in the snapshot's "
                                         "store; --store cannot be used with --from-snapshot")
    if snapshot is not None:
        size_bytes = names.parse_size(size_text) if size_text is not None else None
        from ..services.snapshots import LifecycleService
        with _service(app) as svc, shown(app.json_output, f"disk {name} from snapshot {snapshot}"):
            d = LifecycleService(app.home, svc.conn, svc.keys, disks=svc).create_disk_from_snapshot(
                name, snapshot, size_bytes=size_bytes, encrypted=encrypted, key_ref=key_ref,
                sector_size=int(sector_size) if sector_size else None, discard=discard,
                flatten=flatten)
        enc = f"encrypted under key {d['cmk_id']}" if d["encrypted"] else "not encrypted"
        app.emit(d, f"created disk {name} from snapshot {snapshot}: "
                    f"{human_size(d['size_bytes'])}, {enc}")
        return
    if size_text is None:
        raise click.UsageError("Missing option '--size' (required unless --from-snapshot).")
    encrypted = True if encrypted is None else encrypted
    sector = int(sector_size or DEFAULT_SECTOR_SIZE)
    size_bytes = names.check_size(names.parse_size(size_text), sector, size_text)
    if key_ref is not None and not encrypted:
        raise errors.InvalidInput(detail="--key names the CMK of an encrypted disk; "
                                         "it cannot be used with --no-encrypted")
    with _service(app) as svc:
        d = svc.create(name, size_bytes, encrypted=encrypted, key_ref=key_ref,
                       sector_size=sector, discard=discard, store=store)
    enc = f"encrypted under key {d['cmk_id']}" if d["encrypted"] else "not encrypted"
    app.emit(d, f"created disk {name}: {human_size(d['size_bytes'])}, "
                f"{d['sector_size']}-byte sectors, {enc}")


@disk_group.command("resize")
@click.argument("name")
@click.option("--size", "size_text", required=True,
              help="The new size, larger than the current one: bytes or with a suffix K, M, "
                   "G, T (powers of 1024), e.g. 20G.")
@json_option
@pass_app
def resize_cmd(app: App, name, size_text):
    """Grow disk NAME to --size (ResizeDisk), detached or attached.

    Disks only grow; for a smaller one, create it and `blockcrypt disk copy` the
    files.  Afterwards grow the file system (e.g. `resize2fs DEVICE`).  An attached
    disk's device keeps its old size until the disk is detached and attached again.
    """
    names.validate_name(name)
    size_bytes = names.parse_size(size_text)
    with _service(app) as svc:
        d = svc.resize(name, size_bytes)
    if not d["changed"]:
        text = f"disk {name} already has {human_size(d['size_bytes'])}; nothing to do"
    else:
        text = (f"disk {name} grown from {human_size(d['old_size_bytes'])} to "
                f"{human_size(d['size_bytes'])}")
        if d["reattach_required"]:
            text += (f"\nit is attached ({d['device'] or d['method']}), which still shows "
                     f"{human_size(d['old_size_bytes'])}: to use the new size, unmount it, run "
                     f"`blockcrypt disk detach {name}` and `blockcrypt disk attach {name}`, "
                     "then grow the file system (e.g. `resize2fs DEVICE`)")
        else:
            text += "; grow its file system after attaching (e.g. `resize2fs DEVICE`)"
    app.emit(d, text)


@disk_group.command("reset")
@click.argument("name")
@click.option("--snapshot", required=True, help="A snapshot of this disk's lineage.")
@json_option
@pass_app
def reset_cmd(app: App, name, snapshot):
    """Restore a detached disk to a snapshot of the same disk (ResetDisk)."""
    from ..services.snapshots import LifecycleService
    with _service(app) as svc, shown(app.json_output, f"resetting disk {name}"):
        d = LifecycleService(app.home, svc.conn, svc.keys, disks=svc).reset_disk(name, snapshot)
    app.emit(d, f"disk {name} reset to snapshot {snapshot}")


@disk_group.command("reinit")
@click.argument("name")
@json_option
@pass_app
def reinit_cmd(app: App, name):
    """Return a detached disk to its initial state (blank, or the snapshot it was
    created from), keeping its key (ReInitDisk)."""
    from ..services.snapshots import LifecycleService
    with _service(app) as svc:
        d = LifecycleService(app.home, svc.conn, svc.keys, disks=svc).reinit_disk(name)
    app.emit(d, f"disk {name} re-initialised")


@disk_group.command("copy")
@click.argument("src")
@click.argument("dst")
@json_option
@pass_app
def copy_cmd(app: App, src, dst):
    """Copy the files of disk SRC onto disk DST (root).

    The supported way to move data between an unencrypted and an encrypted
    disk, or to a disk under another CMK: both disks must be detached; SRC is
    attached and mounted read-only, DST gets a file system of SRC's type if it
    has none, `rsync -aHAX` copies, and both are detached again.
    """
    with _service(app) as svc:
        r = svc.copy(src, dst, progress=progress_wanted(app.json_output))
    made = f" (made a new {r['file_system']} file system)" if r["made_file_system"] else ""
    app.emit(r, f"copied the files of disk {src} to disk {dst}{made}")


@disk_group.command("list")
@json_option
@pass_app
def list_cmd(app: App):
    """List disks with their state (available / attached) and device."""
    with _service(app) as svc:
        disks = svc.list()
    app.emit(disks, _print_table)


@disk_group.command("show")
@click.argument("name")
@json_option
@pass_app
def show_cmd(app: App, name):
    """Show one disk."""
    from ..services.boot import PersistentDisks
    from .disk_import import key_note
    with _service(app) as svc:
        d = PersistentDisks(svc).describe(name)
        d["key"] = key_note(svc.keys, d)
    app.emit(d, _print_disk)


@disk_group.command("delete")
@click.argument("name")
@json_option
@pass_app
def delete_cmd(app: App, name):
    """Delete a disk and its data (refused while it is attached)."""
    with _service(app) as svc:
        svc.delete(name)
    app.emit({"name": name, "deleted": True}, f"deleted disk {name}")


@disk_group.command("attach")
@click.argument("name", required=False)
@click.option("--read-only", is_flag=True, help="Attach read-only (writes fail with EROFS).")
@click.option("--threads", type=ASCII_INT, default=None, metavar="N",
              help="nbdkit worker threads per connection (1-64; default 4, and 16 for a disk "
                   "on Ceph RBD). More help only when the disk sits on slow or remote storage.")
@click.option("--persistent", is_flag=True,
              help="Also record that the disk attaches whenever the host runs (at boot, by "
                   "the unit of `blockcrypt service install`).")
@click.option("--all-persistent", is_flag=True,
              help="Attach every persistent disk not attached yet (what the boot unit runs); "
                   "one failing does not stop the others.")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 3600), default=0.0,
              help="With --all-persistent: seconds to keep retrying, with backoff, disks whose "
                   "key provider (e.g. an HSM) is not reachable yet.")
@click.option("--network/--local", "network", default=None,
              help="With --all-persistent: only the disks that need the network (on Ceph, "
                   "or under a KMIP key), or only the others (the two boot units).")
@click.option("--force", is_flag=True,
              help="Attach even though a file system is still mounted from the device of "
                   "this disk's earlier server, which died (two devices would then serve "
                   "the same disk; unmount the old one instead if you can).")
@click.option("--break-lock", is_flag=True,
              help="A disk on Ceph held by another host whose server died: break that "
                   "host's exclusive lock (Ceph blocklists it) and take the disk over. "
                   "Audited. Never use it while that server may still run.")
@json_option
@pass_app
def attach_cmd(app: App, name, read_only, threads, persistent, all_persistent, wait_s, network,
               force, break_lock):
    """Attach a disk as a local block device (root) and print the device path."""
    from ..services.boot import PersistentDisks, failures
    if network is not None and not all_persistent:
        raise click.UsageError("--network/--local go with --all-persistent")
    if all_persistent:
        if name or persistent or read_only or threads or force or break_lock:
            raise click.UsageError("--all-persistent takes no NAME, --persistent, --read-only, "
                                   "--threads or --force (each disk's recorded settings "
                                   "apply)")
        with _service(app) as svc:
            def waiting(disks: dict[str, str], retry_in: float) -> None:
                for disk, why in sorted(disks.items()):
                    click.echo(f"waiting: disk {disk}: {why}; retrying in {retry_in:g} s",
                               err=True)
            r = PersistentDisks(svc).attach_all(wait_s=wait_s, on_wait=waiting,
                                                network=network)
        app.emit(r, "\n".join([f"attached disk {n}" for n in r["attached"]]
                              + [f"disk {n} was attached already" for n in r["already"]])
                 or "no persistent disks to attach")
        err = failures(r, "attached")
        if err is not None:
            raise err
        return
    if not name:
        raise click.UsageError("Missing argument 'NAME' (or pass --all-persistent).")
    with _service(app) as svc:
        d = svc.attach(name, read_only=read_only, threads=threads, force=force,
                       break_lock=break_lock)
        if persistent:
            d = PersistentDisks(svc).set(name, True, read_only=read_only)
    app.emit(d, d["device"])


@disk_group.command("set")
@click.argument("name")
@click.option("--persistent/--no-persistent", default=None, required=True,
              help="Attach the disk whenever the host runs (at boot), or no longer.")
@click.option("--read-only", is_flag=True, help="With --persistent: attach it read-only.")
@json_option
@pass_app
def set_cmd(app: App, name, persistent, read_only):
    """Change a disk's settings: whether it attaches at boot."""
    from ..services.boot import PersistentDisks
    with _service(app) as svc:
        d = PersistentDisks(svc).set(name, persistent, read_only=read_only)
    app.emit(d, f"disk {name} {'attaches' if persistent else 'no longer attaches'} at boot"
                + ("; install the boot unit with `blockcrypt service install`"
                   if persistent else ""))


@disk_group.command("detach")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True,
              help="Detach every attached disk (what the boot unit runs at shutdown); one "
                   "failing does not stop the others.")
@click.option("--network/--local", "network", default=None,
              help="With --all: only the disks that need the network, or only the others.")
@json_option
@pass_app
def detach_cmd(app: App, name, all_, network):
    """Detach an attached disk (refused while its device is mounted)."""
    if network is not None and not all_:
        raise click.UsageError("--network/--local go with --all")
    if all_:
        if name:
            raise click.UsageError("--all takes no NAME")
        from ..services.boot import PersistentDisks, failures
        with _service(app) as svc:
            r = PersistentDisks(svc).detach_all(network=network)
        app.emit(r, "\n".join(f"detached disk {n}" for n in r["detached"])
                 or "no attached disks")
        err = failures(r, "detached")
        if err is not None:
            raise err
        return
    if not name:
        raise click.UsageError("Missing argument 'NAME' (or pass --all).")
    with _service(app) as svc:
        r = svc.detach(name)
    if r["stale"]:
        app.info(f"disk {name}: its server had stopped; cleaned the stale attachment")
    if r.get("catalog_pending"):
        app.info(f"disk {name}: no space left in HOME {app.home.path} to record the detach; "
                 "the next blockcrypt command after space is freed records it")
    app.emit(r, f"detached disk {name} from {r['device']}")


@disk_group.command("serve")
@click.argument("name")
@click.option("--unix", "unix_path", type=click.Path(path_type=Path), default=None,
              help="Serve on this Unix socket. For local clients: put it in a directory only "
                   "you can enter (mkdir -m 0700 DIR); the socket itself is made 0600.")
@click.option("--tcp", default=None, metavar="HOST:PORT",
              help="Serve over TCP on this IP address and port; requires --tls-certificates "
                   "or --tls-psk.")
@click.option("--read-only", is_flag=True, help="Serve read-only.")
@click.option("--tls-psk", type=click.Path(path_type=Path), default=None,
              help="TLS with pre-shared keys: a file of username:hexkey lines (psktool -u NAME "
                   "-p FILE), mode 0600. Only the usernames in it can connect.")
@click.option("--tls-certificates", type=click.Path(path_type=Path), default=None,
              help="TLS with certificates: a directory with ca-cert.pem, server-cert.pem and "
                   "server-key.pem (mode 0600). Every client must present a certificate "
                   "signed by ca-cert.pem; others are refused.")
@click.option("--insecure-plaintext-tcp", is_flag=True,
              help="DANGEROUS: serve TCP without TLS, loopback addresses only. Every account "
                   "on this machine can then read and write the decrypted disk; use --unix "
                   "for local clients instead.")
@click.option("--no-tls", is_flag=True, hidden=True)
@click.option("--threads", type=ASCII_INT, default=None, metavar="N",
              help="nbdkit worker threads per connection (1-64; default 4, and 16 for a disk "
                   "on Ceph RBD). More help only when the disk sits on slow or remote storage.")
@json_option
@pass_app
def serve_cmd(app: App, name, unix_path, tcp, read_only, tls_psk, tls_certificates,
              insecure_plaintext_tcp, no_tls, threads):
    """Serve a disk over NBD with nbdkit in the foreground until interrupted.

    Local clients: use --unix PATH with PATH inside a directory only you can
    enter (mode 0700), e.g. `mkdir -m 0700 ~/nbd && blockcrypt disk serve NAME
    --unix ~/nbd/NAME.sock`.  Remote clients: --tcp with --tls-certificates
    (client certificates required) or --tls-psk.
    """
    if no_tls:
        raise errors.InvalidInput(
            detail="--no-tls was removed: local clients should use --unix PATH (in a 0700 "
                   "directory); plain TCP on loopback needs --insecure-plaintext-tcp, which "
                   "gives every local account the decrypted disk")

    def ready(info: dict) -> None:
        if insecure_plaintext_tcp:
            from ..services.serve import plaintext_tcp_warning
            click.echo(plaintext_tcp_warning(name, tcp), err=True)
        app.emit(info, f"serving disk {name} on {info['endpoint']} (export name {name!r}"
                       f"{', read-only' if read_only else ''}"
                       f"{', TLS' if info['tls'] else ''}); Ctrl-C to stop")
        sys.stdout.flush()

    with _service(app) as svc:
        svc.serve(name, unix_path=unix_path, tcp=tcp, read_only=read_only, tls_psk=tls_psk,
                  tls_certificates=tls_certificates,
                  insecure_plaintext_tcp=insecure_plaintext_tcp, on_ready=ready,
                  threads=threads)
    app.info(f"stopped serving disk {name}")


@disk_group.command("header-backup")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@pass_app
def header_backup_cmd(app: App, name, file):
    """Save the header of disk NAME to a new FILE (mode 0600), as cryptsetup's
    luksHeaderBackup.

    FILE holds the public header fields and the data key wrapped by the CMK, never a
    plaintext key; keep it to repair the disk with `blockcrypt disk header-restore`
    if both header copies in its file are ever damaged.
    """
    with _service(app) as svc:
        r = svc.header_backup(name, file)
    app.emit(r, f"saved the header of disk {name} to {file}")


@disk_group.command("header-restore")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@pass_app
def header_restore_cmd(app: App, name, file):
    """Put a header saved by `blockcrypt disk header-backup` back into disk NAME, as
    cryptsetup's luksHeaderRestore (the disk must be detached).

    Refused, with nothing written, unless FILE is a backup of this very disk (same
    id, lineage, encryption, CMK and geometry).
    """
    with _service(app) as svc:
        r = svc.header_restore(name, file)
    app.emit(r, f"restored the header of disk {name} from {file}")
