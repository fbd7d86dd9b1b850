"""`blockcrypt provider ...`: the key providers of this home (add, list, show, remove).

``local`` is built in.  ``pkcs11`` providers hold CMKs in an HSM or token, ``kmip``
providers on a KMIP key manager that many hosts share; each type's options are checked
by :func:`blockcrypt.kms.registry.validated_config` and the provider is tried before it
is recorded.  Options name files (PIN file, CA, client certificate and key), never
secrets.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..kms.registry import TYPES
from . import App, cli, json_option, pass_app
from .output import format_fields, format_table, indent
from .store import open_store

_PATH = click.Path(path_type=Path)


@cli.group("provider")
def provider_group():
    """Key providers: where CMK material is made and kept.

    `local` (built in) keeps it in this home's key store, sealed under the store
    passphrase.  A `pkcs11` provider keeps it inside an HSM or token as
    non-extractable keys; its keys need no passphrase (the token's PIN comes from a
    0600 file), so disks under them can attach unattended at boot.  A `kmip` provider
    keeps it on a KMIP key manager that many hosts share, each host authenticated by
    its own client certificate.
    """


def kmip_options(f):
    """`provider add` options of a kmip provider (files are paths; the key file 0600)."""
    for opt in reversed([
        click.option("--host", default=None, help="kmip: the KMIP server's host name or IP "
                                                  "address (its certificate must name it)."),
        click.option("--port", type=int, default=None, help="kmip: the server's port "
                                                            "(default 5696)."),
        click.option("--ca", type=_PATH, default=None,
                     help="kmip: CA certificate (PEM) that signed the server's certificate."),
        click.option("--cert", type=_PATH, default=None,
                     help="kmip: this host's client certificate (PEM)."),
        click.option("--key", "key_file", type=_PATH, default=None,
                     help="kmip: this host's client private key (PEM, mode 0600)."),
    ]):
        f = opt(f)
    return f


def _abs(p: Path | None) -> str | None:
    return None if p is None else str(p.absolute())


def _config_line(p: dict) -> str:
    c = p["config"]
    if p["type"] == "pkcs11":
        return f"module {c['module']}, token {c['token_label']!r}, PIN file {c['pin_file']}"
    if p["type"] == "kmip":
        return f"KMIP server {c['host']}:{c['port']}, client certificate {c['cert']}"
    return "built in: the key store of this home"


def _print_list(providers: list[dict]) -> None:
    rows = [[p["name"], p["type"], len(p["keys"]), _config_line(p)] for p in providers]
    click.echo(format_table(["NAME", "TYPE", "KEYS", "WHERE"], rows))


def _print_one(p: dict) -> None:
    fields = [("Provider", p["name"]), ("Type", p["type"]), ("Where", _config_line(p))]
    if p["created_at"]:
        fields.append(("Added", p["created_at"]))
    server = p.get("server")
    if server:
        fields.append(("Server", server["server"]))
        fields.append(("Reachable", "yes" if server.get("reachable") else
                       f"no: {server.get('error')}"))
        if server.get("reachable"):
            fields += [("Server identity", server["server_identity"]),
                       ("Server vendor", server["vendor"] or "-"),
                       ("Protocol versions", ", ".join(server["protocol_versions"]))]
        fields += [("Protocol used", f"KMIP {server['protocol_version_used']}"),
                   ("This host", f"CN {server['client_identity']}")]
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
@kmip_options
@json_option
@pass_app
def provider_add(app: App, name, type_, module, token_label, pin_file, host, port, ca, cert,
                 key_file):
    """Add a key provider after checking it works (pkcs11: the token is there and the PIN
    logs in; kmip: TLS with the client certificate, KMIP 1.4, AES-GCM with bound context)."""
    options = ({"module": module, "token_label": token_label, "pin_file": pin_file}
               if type_ == "pkcs11" else
               {"host": host, "port": port, "ca": _abs(ca), "cert": _abs(cert),
                "key": _abs(key_file)})
    with open_store(app) as store:
        data = store.add_provider(name, type_, **options)
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
    """Show a provider's configuration and the keys it holds; for kmip also the server's
    identity, protocol versions and whether it is reachable."""
    with open_store(app) as store:
        data = store.get_provider(name)
        status = store.provider_status(name) if data["type"] != "local" else None
    if status is not None:
        data["server"] = status
    app.emit(data, _print_one)


@provider_group.command("remove")
@click.argument("name")
@json_option
@pass_app
def provider_remove(app: App, name):
    """Forget a provider (refused while keys that are not Destroyed use it)."""
    with open_store(app) as store:
        data = store.remove_provider(name)
    app.emit(data, f"key provider {name} removed; the objects it holds (token objects, "
                   "server keys) are untouched")
