"""`blockcrypt provider ...`: the key providers of this home (add, list, show, remove).

``local`` is built in.  ``pkcs11`` providers hold CMKs in a token, ``kmip`` providers
on a KMIP key manager that many hosts share; each type's options are checked by
:func:`blockcrypt.kms.registry.validated_config` and the provider is tried before it
is recorded.  Options name files (PIN file, CA, client certificate and key), never
secrets.
"""
from __future__ import annotations

from pathlib import Path

import click

from . import App, cli, json_option, pass_app
from .output import format_fields, format_table, indent
from .store import open_store

_PATH = click.Path(path_type=Path)


@cli.group("provider")
def provider_group():
    """Key providers: where the material of customer master keys lives."""


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


@provider_group.command("add")
@click.argument("name")
@click.option("--type", "type_", required=True, type=click.Choice(["pkcs11", "kmip"]),
              help="The provider type.")
@click.option("--module", default=None, help="pkcs11: path of the token's PKCS#11 module.")
@click.option("--token-label", default=None, help="pkcs11: the token's label.")
@click.option("--pin-file", default=None, help="pkcs11: file holding the user PIN (0600).")
@kmip_options
@json_option
@pass_app
def provider_add(app: App, name, type_, module, token_label, pin_file, host, port, ca, cert,
                 key_file):
    """Add a key provider after checking that it works."""
    options = ({"module": module, "token_label": token_label, "pin_file": pin_file}
               if type_ == "pkcs11" else
               {"host": host, "port": port, "ca": _abs(ca), "cert": _abs(cert),
                "key": _abs(key_file)})
    with open_store(app) as store:
        p = store.add_provider(name, type_, **options)
    app.emit(p, f"key provider {name!r} ({type_}) added; next: `blockcrypt key create --alias "
                f"NAME --provider {name}`")


@provider_group.command("list")
@json_option
@pass_app
def provider_list(app: App):
    """List the key providers."""
    with open_store(app) as store:
        ps = store.list_providers()
    app.emit(ps, lambda d: click.echo(format_table(
        ["NAME", "TYPE", "KEYS"], [[p["name"], p["type"], len(p["keys"])] for p in d])))


def _print_provider(p: dict) -> None:
    rows = [("Provider", p["name"]), ("Type", p["type"])]
    rows += [(k.replace("_", " ").capitalize(), v) for k, v in sorted(p["config"].items())]
    server = p.get("server")
    if server:
        rows.append(("Server", server["server"]))
        rows.append(("Reachable", "yes" if server.get("reachable") else
                     f"no: {server.get('error')}"))
        if server.get("reachable"):
            rows += [("Server identity", server["server_identity"]),
                     ("Server vendor", server["vendor"] or "-"),
                     ("Protocol versions", ", ".join(server["protocol_versions"]))]
        rows += [("Protocol used", f"KMIP {server['protocol_version_used']}"),
                 ("This host", f"CN {server['client_identity']}")]
    click.echo(format_fields(rows, colon=False))
    click.echo("\nKeys")
    click.echo(indent("\n".join(f"{k['alias'] or k['id']}  {k['state']}" for k in p["keys"])
                      or "none"))


@provider_group.command("show")
@click.argument("name")
@json_option
@pass_app
def provider_show(app: App, name):
    """Show a provider; for kmip: the server's identity, protocol version, reachability."""
    with open_store(app) as store:
        p = store.get_provider(name)
        status = store.provider_status(name) if p["type"] != "local" else None
    if status is not None:
        p["server"] = status
    app.emit(p, _print_provider)


@provider_group.command("remove")
@click.argument("name")
@json_option
@pass_app
def provider_remove(app: App, name):
    """Forget a provider (refused while keys that are not Destroyed use it)."""
    with open_store(app) as store:
        store.remove_provider(name)
    app.emit({"name": name, "removed": True}, f"key provider {name!r} removed")
