"""`blockcrypt service install/uninstall`: the systemd unit that attaches persistent disks
at boot (:mod:`blockcrypt.services.units`) and detaches them at shutdown."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import click

from .. import errors
from ..services import units
from . import App, cli, json_option, pass_app
from .store import open_store

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
PASSTHROUGH_ENV = ("SOFTHSM2_CONF",)
"""Variables copied into the unit when set: where a PKCS#11 module finds its tokens."""


@cli.group("service")
def service_group():
    """The systemd unit that attaches persistent disks at boot, unattended."""


def _program() -> str:
    script = Path(sys.executable).parent / "blockcrypt"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    found = shutil.which("blockcrypt")
    if found is None:
        raise errors.MissingTool(tool="blockcrypt", package="blockcrypt (run `make install`)")
    return str(Path(found).resolve())


def _check_credential(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as e:
        raise errors.PassphraseFileError(path=str(path), reason=e.strerror) from None
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        raise errors.PassphraseFileError(
            path=str(path), reason=f"it must be a regular file only its owner can read; run "
                                   f"`chmod 600 {path}`")


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


@service_group.command("install")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              default=SYSTEM_UNIT_DIR, show_default=True,
              help="Where to write blockcrypt-disks.service.")
@click.option("--passphrase-credential", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="A root-only file holding the store passphrase, handed to the unit with "
                   "LoadCredential= (needed only for disks under local keys).")
@click.option("--wait", "wait_s", type=click.IntRange(0, 3600), default=units.WAIT_DEFAULT_S,
              show_default=True,
              help="Seconds to keep retrying disks whose key provider is unreachable.")
@json_option
@pass_app
def install_cmd(app: App, unit_dir: Path, passphrase_credential: Path | None, wait_s: int):
    """Write the boot unit for this home and (with systemd running) enable it."""
    home = app.home.path.resolve()
    if passphrase_credential is not None:
        passphrase_credential = passphrase_credential.resolve()
        _check_credential(passphrase_credential)
    program = _program()
    mounts = [str(Path(program).parent)]
    local_disks: list[str] = []
    with open_store(app) as store:
        for p in store.list_providers():
            if p["type"] == "pkcs11":
                mounts.append(str(Path(p["config"]["pin_file"]).parent))
    from ..services.boot import PersistentDisks
    from .disks import _service
    with _service(app) as svc:
        boot = PersistentDisks(svc)
        for name in boot.names():
            d = svc.show(name)
            if d["encrypted"] and svc.keys.get_key(d["cmk_id"])["provider"] == "local":
                local_disks.append(name)
    if passphrase_credential is not None:
        mounts.append(str(passphrase_credential.parent))
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    unit_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for unit_name, network in ((units.UNIT_NAME, False), (units.NET_UNIT_NAME, True)):
        text = units.disks_unit(program=program, home=home,
                                credential_file=passphrase_credential, wait_s=wait_s,
                                mounts_for=mounts, environment=env, network=network)
        path = unit_dir / unit_name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
        paths.append(path)
    path = paths[0]
    enabled = False
    if unit_dir == SYSTEM_UNIT_DIR and _systemd_running():
        for argv in (["systemctl", "daemon-reload"],
                     ["systemctl", "enable", units.UNIT_NAME, units.NET_UNIT_NAME]):
            cp = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if cp.returncode != 0:
                raise errors.CommandFailed(cmd=" ".join(argv), rc=cp.returncode,
                                           stderr=cp.stderr.strip()[-300:])
        enabled = True
    if local_disks and passphrase_credential is None:
        app.info(f"warning: persistent disks {', '.join(local_disks)} use local keys, which "
                 "need the store passphrase at boot; run again with "
                 "--passphrase-credential FILE, or they will not attach")
    data = {"unit": str(path), "network_unit": str(paths[1]), "enabled": enabled,
            "persistent_disks_with_local_keys": local_disks,
            "credential": str(passphrase_credential or "") or None}
    both = f"{units.UNIT_NAME} {units.NET_UNIT_NAME}"
    next_step = ("enabled: they run at the next boot (`systemctl start "
                 f"{both}` to run them now)" if enabled else
                 f"next: `systemctl daemon-reload && systemctl enable {both}`")
    app.emit(data, f"wrote {path} and {paths[1]} (disks on Ceph or under KMIP keys, after "
                   f"the network)\n{next_step}\nfstab entries on these disks need "
                   f"x-systemd.requires={units.UNIT_NAME}, or _netdev,x-systemd.requires="
                   f"{units.NET_UNIT_NAME} for disks that need the network (see README)")


@service_group.command("uninstall")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              default=SYSTEM_UNIT_DIR, show_default=True)
@json_option
@pass_app
def uninstall_cmd(app: App, unit_dir: Path):
    """Disable and remove the boot units (attached disks stay attached)."""
    path = unit_dir / units.UNIT_NAME
    if unit_dir == SYSTEM_UNIT_DIR and _systemd_running():
        subprocess.run(["systemctl", "disable", units.UNIT_NAME, units.NET_UNIT_NAME],
                       capture_output=True, stdin=subprocess.DEVNULL)
    removed = path.exists()
    path.unlink(missing_ok=True)
    (unit_dir / units.NET_UNIT_NAME).unlink(missing_ok=True)
    app.emit({"unit": str(path), "removed": removed},
             f"removed {path}" if removed else f"{path} was not installed")
