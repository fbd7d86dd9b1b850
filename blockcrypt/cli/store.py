"""`blockcrypt init` and `blockcrypt passphrase change`, plus helpers the other command
modules share: :func:`open_store` and :func:`format_table`."""
from __future__ import annotations

import sys

import click

from .. import errors
from ..crypto.secret import Secret
from ..kms.store import KeyStore
from . import App, cli, json_option, pass_app, read_passphrase_file


def open_store(app: App) -> KeyStore:
    """The key store of this home; the passphrase is asked for only if material is needed."""
    return KeyStore.open(app.home, app.passphrase)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned columns separated by two spaces (the last column is not padded)."""
    cells = [[str(c) if c is not None else "-" for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_fields(rows: list[tuple[str, object]]) -> str:
    """`name: value` lines with the values aligned (one object's details)."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


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
    with KeyStore.open(app.home, lambda: app.passphrase("Current store passphrase")) as store:
        store.unlock()  # check the current passphrase before asking for a new one
        with _new_passphrase(new_passphrase_file) as new:
            store.change_passphrase(new)
    app.emit({"home": str(app.home.path), "changed": True},
             f"passphrase changed for the key store at {app.home.path}; "
             "all key material is now encrypted under the new passphrase")


def _new_passphrase(path: str | None):
    if path:
        return read_passphrase_file(path)
    if sys.stdin.isatty():
        value = click.prompt("New store passphrase", hide_input=True,
                             confirmation_prompt=True, err=True)
        if not value:
            raise errors.PassphraseError(detail="the passphrase must not be empty")
        return Secret(value.encode())
    raise errors.PassphraseError(
        detail="the new passphrase is needed: pass --new-passphrase-file FILE or run on a "
               "terminal to be prompted")
