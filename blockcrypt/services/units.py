"""The systemd unit that attaches persistent disks at boot and detaches them at shutdown.

:func:`disks_unit` writes the text of ``blockcrypt-disks.service`` (``blockcrypt
service install`` puts it in /etc/systemd/system):

- ``Type=oneshot`` + ``RemainAfterExit``: ExecStart runs ``disk attach
  --all-persistent --wait N`` (which retries disks whose key provider is not
  reachable yet, with backoff, and names them) and the unit stays active;
  ExecStop runs ``disk detach --all`` when it stops.
- ``DefaultDependencies=no``, ``Before=local-fs.target``, ``WantedBy=local-fs.target``:
  it runs early, before the local file systems that live on its disks.  Those
  mounts say ``x-systemd.requires=blockcrypt-disks.service`` in fstab, which
  orders them after the unit at boot and, because stopping runs in reverse, unmounts
  them before ExecStop detaches the disks at shutdown.
- ``RequiresMountsFor=`` the home, the program and the PIN files' directories.
- ``KillMode=process``: if a detach is refused at shutdown (a file system still
  mounted), the nbdkit servers are not killed under it.
- Keys of the ``local`` provider need the store passphrase: with a credential
  file, ``LoadCredential=blockcrypt-passphrase:FILE`` hands it to the service in
  ``$CREDENTIALS_DIRECTORY`` (``%d``), read through ``--passphrase-file``.  Keys of
  a ``pkcs11`` provider need nothing: the PIN file is named in the catalog.

Pure text; nothing here touches the system.
"""
from __future__ import annotations

from pathlib import Path

UNIT_NAME = "blockcrypt-disks.service"
CREDENTIAL = "blockcrypt-passphrase"
WAIT_DEFAULT_S = 300


def _quote(arg: str) -> str:
    """An argument for an Exec line (systemd's quoting: double quotes, \\ escapes)."""
    if arg and all(c.isalnum() or c in "/._-:=+,@%" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_lines(program: str, home: Path, *, credential: bool, wait_s: int) -> tuple[str, str]:
    base = [program, "--home", str(home)]
    start = base + (["--passphrase-file", f"%d/{CREDENTIAL}"] if credential else []) + [
        "disk", "attach", "--all-persistent", "--wait", str(wait_s)]
    stop = base + ["disk", "detach", "--all"]
    return " ".join(map(_quote, start)), " ".join(map(_quote, stop))


def disks_unit(*, program: str, home: Path, credential_file: Path | None, wait_s: int,
               mounts_for: list[str], environment: dict[str, str]) -> str:
    """The text of blockcrypt-disks.service (see the module doc)."""
    start, stop = exec_lines(program, home, credential=credential_file is not None,
                             wait_s=wait_s)
    needs = sorted({str(home), *mounts_for})
    lines = [
        "# Written by `blockcrypt service install`; run it again after changing options.",
        "[Unit]",
        f"Description=blockcrypt: attach persistent encrypted disks of {home}",
        "DefaultDependencies=no",
        "After=systemd-udevd.service systemd-modules-load.service local-fs-pre.target",
        "Wants=systemd-udevd.service",
        "Before=local-fs.target shutdown.target",
        "Conflicts=shutdown.target",
        f"RequiresMountsFor={' '.join(_quote(p) for p in needs)}",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        *(f"Environment={_quote(f'{k}={v}')}" for k, v in sorted(environment.items())),
        *([f"LoadCredential={CREDENTIAL}:{credential_file}"] if credential_file else []),
        f"ExecStart={start}",
        f"ExecStop={stop}",
        "KillMode=process",
        f"TimeoutStartSec={wait_s + 120}",
        "TimeoutStopSec=300",
        "",
        "[Install]",
        "WantedBy=local-fs.target",
        "",
    ]
    return "\n".join(lines)
