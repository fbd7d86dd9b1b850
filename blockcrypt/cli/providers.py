"""`blockcrypt provider ...`: the key providers that hold CMK material (local, pkcs11 HSMs)."""
from __future__ import annotations

import click

from ..kms.registry import TYPES
from . import App, cli, json_option, pass_app
from .output import format_fields, format_table, indent
from .store import open_store


@cli.group("provider")
def provider_group():
    """Key providers: where CMK material is made and kept.

    `local` (built in) keeps it in this home's key store, sealed under the store
    passphrase.  A `pkcs11` provider keeps it inside an HSM or token as
    non-extractable keys; its keys need no passphrase (the token's PIN comes from a
    0600 file), so disks under them can attach unattended at boot.
    """


def _config_line(p: dict) -> str:
    c = p["config"]
    if p["type"] == "pkcs11":
        return f"module {c['module']}, token {c['token_label']!r}, PIN file {c['pin_file']}"
    return "built in: the key store of this home"


def _print_list(providers: list[dict]) -> None:
    rows = [[p["name"], p["type"], len(p["keys"]), _config_line(p)] for p in providers]
    click.echo(format_table(["NAME", "TYPE", "KEYS", "WHERE"], rows))


def _print_one(p: dict) -> None:
    fields = [("Provider", p["name"]), ("Type", p["type"]), ("Where", _config_line(p))]
    if p["created_at"]:
        fields.append(("Added", p["created_at"]))
    click.echo(format_fields(fields, colon=False))
    click.echo("\nKeys")
    lines = [f"{k['id']}  {k['alias'] or '-'}  {k['state']}" for k in p["keys"]]
    click.echo(indent("\n".join(lines) if lines else "none"))


@provider_group.command("add")
@click.argument("name")
@click.option("--type", "type_", type=click.Choice(TYPES), required=True,
              help="The kind of provider.")
@click.option("--module", default=None,
              help="pkcs11: absolute path of the token's PKCS#11 module, e.g. "
                   "/usr/lib/softhsm/libsofthsm2.so.")
@click.option("--token-label", default=None, help="pkcs11: the label of the token.")
@click.option("--pin-file", default=None,
              help="pkcs11: absolute path of a file (mode 0600) holding the user PIN; "
                   "blockcrypt stores the path, never the PIN.")
@json_option
@pass_app
def provider_add(app: App, name, type_, module, token_label, pin_file):
    """Add a key provider after checking it works (the token is there, the PIN logs in)."""
    with open_store(app) as store:
        data = store.add_provider(name, type_, module=module, token_label=token_label,
                                  pin_file=pin_file)
    app.emit(data, f"key provider {name} added ({_config_line(data)})\nnext: `blockcrypt key "
                   f"create --alias NAME --provider {name}` makes a key inside it")


@provider_group.command("list")
@json_option
@pass_app
def provider_list(app: App):
    """List the key providers."""
    with open_store(app) as store:
        data = store.list_providers()
    app.emit(data, _print_list)


@provider_group.command("show")
@click.argument("name")
@json_option
@pass_app
def provider_show(app: App, name):
    """Show a provider's configuration and the keys it holds."""
    with open_store(app) as store:
        data = store.get_provider(name)
    app.emit(data, _print_one)


@provider_group.command("remove")
@click.argument("name")
@json_option
@pass_app
def provider_remove(app: App, name):
    """Forget a provider (refused while keys that are not Destroyed use it)."""
    with open_store(app) as store:
        data = store.remove_provider(name)
    app.emit(data, f"key provider {name} removed; its token and any objects in it are "
                   "untouched")
