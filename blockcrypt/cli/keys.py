"""`blockcrypt key ...`: customer master keys (CMKs), in the local key store or a provider."""
from __future__ import annotations

import os
from pathlib import Path

import click

from .. import errors
from ..kms import byok
from ..kms.local import (
    ORIGINS,
    PENDING_DAYS_DEFAULT,
    PENDING_DAYS_MAX,
    PENDING_DAYS_MIN,
    ROTATION_DAYS_MAX,
    ROTATION_DAYS_MIN,
)
from ..storage.home import ensure_private_dir, private_umask
from . import App, cli, json_option, pass_app
from .output import format_fields, format_table, indent
from .params import ASCII_INT
from .store import open_store


@cli.group("key")
def key_group():
    """Customer master keys (CMKs).

    A CMK wraps the data keys of disks; its material never leaves its provider
    (the local key store, or an HSM: see `blockcrypt provider`).
    KEY is a key id or an alias.
    """


def _ref(key: dict) -> str:
    return key["alias"] or key["id"]


def _version_summary(key: dict) -> str:
    n = len(key["versions"])
    return f"{key['current_version']} of {n}" if key["current_version"] else f"- of {n}"


def _print_key_list(keys: list[dict]) -> None:
    if not keys:
        click.echo("no keys yet; create one with `blockcrypt key create --alias NAME`")
        return
    rows = [[k["id"], k["alias"], k["state"], k["provider"], k["origin"], _version_summary(k),
             f"{k['rotation_period_days']}d" if k["rotation_period_days"] else None,
             len(k["dependants"]), k["created_at"]] for k in keys]
    click.echo(format_table(["ID", "ALIAS", "STATE", "PROVIDER", "ORIGIN", "VERSION",
                             "ROTATION", "USED BY", "CREATED"], rows))


def _print_key(key: dict) -> None:
    fields = [("Key", key["id"]), ("Alias", key["alias"] or "-"),
              ("Description", key["description"] or "-"), ("State", key["state"]),
              ("Provider", key["provider"]),
              ("Origin", key["origin"] + ("  (service key)" if key["service"] else "")),
              ("Created", key["created_at"])]
    if key["rotation_period_days"]:
        fields.append(("Rotation", f"every {key['rotation_period_days']} days, next "
                                   f"{key['next_rotation_at']}"))
    elif key["origin"] == "external":
        fields.append(("Rotation", "not possible (imported material)"))
    else:
        fields.append(("Rotation", "manual (`blockcrypt key rotate`)"))
    if key["deletion_date"] and key["state"] == "PendingDeletion":
        fields.append(("Deletion", f"material destroyed on {key['deletion_date']}"))
    if key["destroyed_at"]:
        fields.append(("Destroyed", key["destroyed_at"]))
    if key["import_expires_at"]:
        fields.append(("Import token", f"valid until {key['import_expires_at']}"))
    if key["material_expires_at"]:
        fields.append(("Material", f"imported, expires {key['material_expires_at']}"))
    click.echo(format_fields(fields, colon=False))
    click.echo("\nVersions")
    if key["versions"]:
        rows = [[v["version"], v["created_at"],
                 "destroyed" if v["destroyed"] else
                 "current (new wraps)" if v["version"] == key["current_version"] else
                 "unwraps only"] for v in key["versions"]]
        click.echo(indent(format_table(["VERSION", "CREATED", "STATUS"], rows)))
    else:
        click.echo("  none (material not imported yet)")
    click.echo("\nUsed by")
    click.echo(indent("\n".join(key["dependants"]) if key["dependants"] else "nothing"))


@key_group.command("create")
@click.option("--alias", default=None, help="A unique name: 1-64 of A-Z a-z 0-9 / _ - .")
@click.option("--description", default=None, help="Free text (up to 256 characters).")
@click.option("--origin", type=click.Choice(ORIGINS), default="blockcrypt", show_default=True,
              help="'external' makes a key in PendingImport for your own material (BYOK).")
@click.option("--rotation-period-days", type=ASCII_INT, default=None,
              help=f"Rotate automatically every N days ({ROTATION_DAYS_MIN}..{ROTATION_DAYS_MAX}).")
@click.option("--provider", default="local", show_default=True,
              help="The key provider that makes and keeps the material (`blockcrypt provider "
                   "list`): a pkcs11 provider makes it inside the HSM, a kmip provider on the "
                   "KMIP server.")
@json_option
@pass_app
def key_create(app: App, alias, description, origin, rotation_period_days, provider):
    """Create a customer master key and print its id."""
    with open_store(app) as store:
        key = store.create_key(alias=alias, description=description, origin=origin,
                               rotation_period_days=rotation_period_days, provider=provider)
    if key["state"] == "PendingImport":
        app.info(f"key {key['id']} created in PendingImport; next: `blockcrypt key "
                 f"get-import-params {_ref(key)} --out-dir DIR`")
    app.emit(key, key["id"])


@key_group.command("list")
@json_option
@pass_app
def key_list(app: App):
    """List the keys."""
    with open_store(app) as store:
        keys = store.list_keys()
    app.emit(keys, _print_key_list)


@key_group.command("show")
@click.argument("key")
@json_option
@pass_app
def key_show(app: App, key):
    """Show a key: state, versions and the disks and snapshots that depend on it."""
    with open_store(app) as store:
        data = store.get_key(key)
    app.emit(data, _print_key)


@key_group.command("enable")
@click.argument("key")
@json_option
@pass_app
def key_enable(app: App, key):
    """Enable a disabled key."""
    with open_store(app) as store:
        data = store.enable(key)
    app.emit(data, f"key {_ref(data)} is Enabled")


@key_group.command("disable")
@click.argument("key")
@click.option("--force", is_flag=True,
              help="Disable even if disks or snapshots depend on the key.")
@json_option
@pass_app
def key_disable(app: App, key, force):
    """Disable a key: it wraps and unwraps nothing until enabled again."""
    with open_store(app) as store:
        data = store.disable(key, force=force)
    app.emit(data, f"key {_ref(data)} is Disabled; disks under it cannot be attached until "
                   f"`blockcrypt key enable {_ref(data)}`")


@key_group.command("schedule-deletion")
@click.argument("key")
@click.option("--pending-days", type=ASCII_INT, default=PENDING_DAYS_DEFAULT, show_default=True,
              help="Days before the material is destroyed "
                   f"({PENDING_DAYS_MIN}..{PENDING_DAYS_MAX}).")
@click.option("--force", is_flag=True,
              help="Schedule even if disks or snapshots depend on the key.")
@json_option
@pass_app
def key_schedule_deletion(app: App, key, pending_days, force):
    """Schedule a key's destruction after a waiting period (cancellable until then)."""
    with open_store(app) as store:
        data = store.schedule_deletion(key, pending_days=pending_days, force=force)
    app.emit(data, f"key {_ref(data)} is PendingDeletion: its material will be destroyed on "
                   f"{data['deletion_date']}; cancel with `blockcrypt key cancel-deletion "
                   f"{_ref(data)}`")


@key_group.command("cancel-deletion")
@click.argument("key")
@json_option
@pass_app
def key_cancel_deletion(app: App, key):
    """Cancel a scheduled deletion (the key comes back Disabled)."""
    with open_store(app) as store:
        data = store.cancel_deletion(key)
    hint = (f"; enable it with `blockcrypt key enable {_ref(data)}`"
            if data["state"] == "Disabled" else "")
    app.emit(data, f"deletion of key {_ref(data)} cancelled; it is {data['state']}{hint}")


@key_group.command("rotate")
@click.argument("key")
@json_option
@pass_app
def key_rotate(app: App, key):
    """Add a new key version; new data keys use it, older versions still unwrap."""
    with open_store(app) as store:
        data = store.rotate(key)
    app.emit(data, f"key {_ref(data)} rotated: version {data['current_version']} wraps new "
                   "data keys; older versions still unwrap what they wrapped")


@key_group.command("get-import-params")
@click.argument("key")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the wrapping public key (PEM) and the import token.")
@click.option("--oaep-hash", type=click.Choice(byok.OAEP_HASHES), default="sha256",
              show_default=True,
              help="OAEP (and MGF1) hash the wrapped material will use; `local` keys take "
                   "sha256; a pkcs11 token may need sha1 (SoftHSM 2.6).")
@json_option
@pass_app
def key_get_import_params(app: App, key, out_dir: Path, oaep_hash: str):
    """Write an RSA wrapping public key and an import token (valid 24 hours)."""
    with open_store(app) as store:
        params = store.get_import_params(key, oaep_hash=oaep_hash)
    if not out_dir.exists():
        ensure_private_dir(out_dir)
    stem = params["key_id"]
    pem_path = out_dir / f"{stem}.wrapping-key.pem"
    token_path = out_dir / f"{stem}.import-token"
    _write_private(pem_path, params["public_key_pem"].encode("ascii"))
    _write_private(token_path, (params["import_token"] + "\n").encode("ascii"))
    data = {"key_id": params["key_id"], "public_key_file": str(pem_path),
            "token_file": str(token_path), "expires_at": params["expires_at"],
            "wrapping_algorithm": params["wrapping_algorithm"],
            "wrapping_key_spec": params["wrapping_key_spec"]}
    app.emit(data, "\n".join([
        f"wrapping public key  {pem_path}",
        f"import token         {token_path}  (valid until {params['expires_at']})",
        "",
        f"Wrap your 32 bytes of key material with {params['wrapping_algorithm']}, for example:",
        f"  openssl pkeyutl -encrypt -pubin -inkey {pem_path} -in material.bin "
        "-out material.wrapped \\",
        f"    -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:{oaep_hash} "
        f"-pkeyopt rsa_mgf1_md:{oaep_hash}",
        f"then: blockcrypt key import {key} --material material.wrapped --token {token_path}",
    ]))


def _write_private(path: Path, data: bytes) -> None:
    """Write a file 0600, replacing an older one atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with private_umask():
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@key_group.command("import")
@click.argument("key")
@click.option("--material", "material_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The wrapped material: RSA-OAEP ciphertext, raw (512 bytes) or base64.")
@click.option("--token", required=True,
              help="The import token, or the file get-import-params wrote it to.")
@click.option("--expires-at", default=None, metavar="TIME",
              help="When the imported material expires (ISO 8601, UTC unless it has an "
                   "offset): the key then becomes PendingImport and unwraps nothing until the "
                   "same material is imported again.  Default: never.")
@json_option
@pass_app
def key_import(app: App, key, material_file: Path, token: str, expires_at: str | None):
    """Import your own (wrapped) key material into a PendingImport key and enable it."""
    expires = _parse_time("--expires-at", expires_at) if expires_at else None
    try:
        wrapped = material_file.read_bytes()
    except OSError as e:
        raise errors.InvalidInput(
            detail=f"cannot read the wrapped material {material_file}: {e.strerror}") from None
    token_path = Path(token)
    if token_path.is_file():
        try:
            token = token_path.read_text("ascii").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise errors.InvalidInput(detail=f"cannot read the import token {token_path}: {e}")
    with open_store(app) as store:
        data = store.import_material(key, wrapped, token, material_expires_at=expires)
    until = (f"; the material expires at {data['material_expires_at']}"
             if data["material_expires_at"] else "")
    app.emit(data, f"key material imported: key {_ref(data)} is Enabled{until}")


def _parse_time(option: str, text: str):
    from datetime import datetime, timezone
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise errors.InvalidInput(
            detail=f"{option} {text!r}: use an ISO 8601 time such as 2031-01-31T12:00:00Z"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@key_group.command("delete-imported-material")
@click.argument("key")
@json_option
@pass_app
def key_delete_imported_material(app: App, key):
    """Delete an imported key's material now (it becomes PendingImport).

    Disks already attached keep running; nothing else unwraps until the same
    material is imported again (get-import-params, then import).
    """
    with open_store(app) as store:
        data = store.delete_imported_material(key)
    app.emit(data, f"key {_ref(data)}: imported material deleted; it is PendingImport. "
                   f"Import the same material again to restore it: `blockcrypt key "
                   f"get-import-params {_ref(data)} --out-dir DIR`")
