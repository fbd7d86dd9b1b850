"""`blockcrypt store ...`: the disk stores besides the home's files (Ceph RBD pools):
add, list, show, remove."""
from __future__ import annotations

import contextlib

import click

from . import App, cli, json_option, pass_app
from .output import format_fields, format_table
from .params import ASCII_INT


@contextlib.contextmanager
def _service(app: App):
    from ..services.stores import StoreService
    from .store import open_store
    with open_store(app) as keys:
        yield StoreService(app.home, keys.conn)


def _print_store(d: dict) -> None:
    click.echo(format_fields([
        ("name", d["name"]), ("type", d["type"]), ("pool", d["pool"]),
        ("ceph conf", d["conf"]), ("client", f"client.{d['client_id']}"),
        ("keyring", d["keyring"] or "(from the conf)"),
        ("I/O timeout", f"{d['io_timeout_s']} s"), ("created", d["created_at"]),
        ("used by", ", ".join(d["used_by"]) or "-")]))


@cli.group("store")
def store_group():
    """Where disks live: the home's files (default) or a Ceph RBD pool."""


@store_group.command("add")
@click.argument("name")
@click.option("--type", "type_", type=click.Choice(["rbd"]), required=True,
              help="The kind of store: rbd (a Ceph RBD pool).")
@click.option("--conf", required=True, type=click.Path(dir_okay=False),
              help="The ceph.conf naming the cluster's monitors.")
@click.option("--pool", required=True, help="The RBD pool (application rbd).")
@click.option("--client-id", default="admin", show_default=True,
              help="The cephx user client.ID (give it `profile rbd` on the pool).")
@click.option("--keyring", default=None, type=click.Path(dir_okay=False),
              help="That user's keyring file, mode 0600 (default: the conf's keyring). "
                   "Only its path is recorded, never the key.")
@click.option("--io-timeout", "io_timeout_s", type=ASCII_INT, default=30, show_default=True,
              metavar="SECONDS",
              help="How long a served disk's request may wait for the OSDs before the "
                   "client gets an I/O error (EIO) instead of a hang (1-3600).")
@json_option
@pass_app
def add_cmd(app: App, name, type_, conf, pool, client_id, keyring, io_timeout_s):
    """Add store NAME after checking that the cluster answers, the user is accepted and
    the pool exists as an RBD pool (nothing is recorded otherwise)."""
    with _service(app) as svc:
        d = svc.add(name, type_=type_, conf=conf, pool=pool, client_id=client_id,
                    keyring=keyring, io_timeout_s=io_timeout_s)
    app.emit(d, f"added store {name}: pool {pool} as client.{client_id}\n"
                f"next: `blockcrypt disk create NAME --size 10G --store {name}`")


@store_group.command("list")
@json_option
@pass_app
def list_cmd(app: App):
    """List the stores (the home's files are always there, as `file`)."""
    with _service(app) as svc:
        stores = svc.list()

    def human(rows):
        if not rows:
            click.echo("no stores besides the home's files; add one with "
                       "`blockcrypt store add NAME --type rbd --conf FILE --pool POOL`")
            return
        click.echo(format_table(["NAME", "TYPE", "POOL", "CLIENT", "DISKS"],
                                [[d["name"], d["type"], d["pool"], f"client.{d['client_id']}",
                                  len(d["used_by"])] for d in rows]))
    app.emit(stores, human)


@store_group.command("show")
@click.argument("name")
@json_option
@pass_app
def show_cmd(app: App, name):
    """Show store NAME and the disks and snapshots it holds."""
    with _service(app) as svc:
        d = svc.show(name)
    app.emit(d, _print_store)


@store_group.command("remove")
@click.argument("name")
@json_option
@pass_app
def remove_cmd(app: App, name):
    """Forget store NAME (refused while disks or snapshots live in it); the pool and
    its images are not touched."""
    with _service(app) as svc:
        svc.remove(name)
    app.emit({"name": name, "removed": True}, f"removed store {name}")
