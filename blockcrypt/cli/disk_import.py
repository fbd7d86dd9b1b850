"""`blockcrypt disk import NAME FILE`, and what `disk show` says about a disk's key.

Import adds a container file made on another host (:mod:`blockcrypt.services.imports`).
:func:`key_note` tells whether the disk's key can unwrap now: for a kmip key the key
manager is asked about each version (revoked or destroyed there, or unreachable),
so an attached disk whose key was revoked on the server says it keeps serving
until detached and that a new attach would be refused.
"""
from __future__ import annotations

from pathlib import Path

import click

from . import App, json_option, pass_app
from .disks import _print_disk, _service, disk_group


@disk_group.command("import")
@click.argument("name")
@click.argument("file")
@click.option("--provider", default=None,
              help="The kmip provider holding the disk's key (needed only if this host has "
                   "several).")
@click.option("--store", default=None,
              help="FILE is the name of an RBD image in this store (`blockcrypt store list`), "
                   "made by another host sharing the store: it is recorded, not copied.")
@json_option
@pass_app
def import_cmd(app: App, name, file: str, provider, store):
    """Add the container FILE (made on another host) as disk NAME.

    The header is checked, the file is copied into this home, and a kmip key this
    host does not know yet is added to its key catalog (origin shared).  Attaching
    it then asks the key manager, which decides whether this host may use the key.
    With --store, FILE is an RBD image of that store: it stays where it is, and the
    data key must unwrap on this host before the disk is recorded.
    """
    from ..services.imports import import_disk, import_image
    with _service(app) as svc:
        if store is not None:
            d = import_image(svc, name, store, file, provider)
        else:
            d = import_disk(svc, name, Path(file), provider)
    app.info(f"disk {name!r} imported from {file}; next: `blockcrypt disk attach {name}`")
    app.emit(d, _print_disk)


def key_note(keys, disk: dict) -> dict | None:
    """{"usable": bool, "note": text} for an encrypted disk's key, None if unencrypted."""
    if not disk["encrypted"]:
        return None
    h = keys.key_health(disk["cmk_id"])
    attached = disk["state"] not in ("available", "stale")
    problems = []
    if h["state"] != "Enabled":
        problems.append(f"key is {h['state']} here")
    for version, state in sorted((h["server_states"] or {}).items()):
        if state != "ACTIVE":
            problems.append(f"version {version} is {state} on the key manager of provider "
                            f"{h['provider']!r}")
    if not problems:
        return {"usable": True, "note": "usable", "server_states": h["server_states"]}
    text = "; ".join(problems)
    text += ("; the attached disk keeps serving until it is detached, and a new attach will be "
             "refused" if attached else "; an attach will be refused")
    return {"usable": False, "note": text, "server_states": h["server_states"]}
