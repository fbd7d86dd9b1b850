"""`blockcrypt init` and `blockcrypt passphrase change`, and :func:`open_store`, the one
place the CLI opens the key store.

Composition root of the key side: the ``local`` provider
(:class:`blockcrypt.kms.local.KeyStore`) learns which disks and snapshots use a
key from the disk catalog (:func:`blockcrypt.storage.catalog.key_dependants`),
wired here (:class:`CatalogKeyStore`) so that neither package imports the other.
"""
from __future__ import annotations

from datetime import datetime
from typing import Callable

import click

from .. import errors
from ..crypto.secret import Secret
from ..kms.local import Dependants, KeyStore
from ..storage import catalog
from ..storage.home import Home
from . import App, cli, json_option, pass_app
from .passphrase import obtain_passphrase


class CatalogKeyStore(KeyStore):
    """The local key store as blockcrypt runs it: a key's dependants are the disks and
    snapshots the catalog lists under it (disable and schedule-deletion refuse while
    there are any; `key show` lists them)."""

    @classmethod
    def open(cls, home: Home, passphrase_source: Callable[[], Secret] | None = None, *,
             now: Callable[[], datetime] | None = None,
             dependants: Dependants = catalog.key_dependants,
             inventory=catalog.key_inventory) -> KeyStore:
        return super().open(home, passphrase_source, now=now, dependants=dependants,
                            inventory=inventory)


def open_store(app: App) -> KeyStore:
    """The key store of this home; the passphrase is asked for only if material is needed."""
    return CatalogKeyStore.open(app.home, app.passphrase)


@cli.command("init")
@json_option
@pass_app
def init_cmd(app: App):
    """Create the key store in the blockcrypt home (asks for a new passphrase).

    Run again on an existing store, it changes nothing and says so.
    """
    home = app.home
    if KeyStore.exists(home):
        created = False
    else:
        with app.passphrase("New store passphrase", confirm=True) as passphrase:
            created = KeyStore.init(home, passphrase)
    data = {"home": str(home.path), "created": created}
    if created:
        human = (f"key store created at {home.path}\n"
                 "next: `blockcrypt key create --alias NAME` makes a customer master key")
    else:
        human = f"a key store already exists at {home.path}; nothing was changed"
    app.emit(data, human)


@cli.group("passphrase")
def passphrase_group():
    """The key store passphrase."""


@passphrase_group.command("change")
@click.option("--new-passphrase-file", type=str, default=None,
              help="File holding the new passphrase (default: a confirmed prompt on a terminal).")
@json_option
@pass_app
def passphrase_change(app: App, new_passphrase_file: str | None):
    """Re-encrypt all key material under a new passphrase, atomically.

    The current passphrase comes from --passphrase-file (or its usual sources).
    A crash at any point leaves either the old or the new passphrase working.
    """
    with CatalogKeyStore.open(app.home,
                              lambda: app.passphrase("Current store passphrase")) as store:
        store.unlock()  # check the current passphrase before asking for a new one
        missing = errors.PassphraseError(
            detail="the new passphrase is needed: pass --new-passphrase-file FILE or run on a "
                   "terminal to be prompted")
        with obtain_passphrase(new_passphrase_file, "New store passphrase", confirm=True,
                               missing=missing) as new:
            store.change_passphrase(new)
    app.emit({"home": str(app.home.path), "changed": True},
             f"passphrase changed for the key store at {app.home.path}; "
             "all key material is now encrypted under the new passphrase")
