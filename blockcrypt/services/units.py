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
- Disks that need the network (on a Ceph store, or under a KMIP key) are attached
  by a second unit, ``blockcrypt-netdisks.service``, ordered like a ``_netdev``
  volume: ``After=network-online.target`` (which it wants), ``Before=remote-fs.target``,
  ``WantedBy=remote-fs.target``; each unit's ExecStart/ExecStop names its half
  (``--local`` / ``--network``).  Their mounts say ``_netdev`` and
  ``x-systemd.requires=blockcrypt-netdisks.service``.  Before local-fs.target the
  network is not up, so one unit for both would wait out ``--wait`` at every boot.
  A Ceph store that does not answer yet is retried like a key provider.
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
NET_UNIT_NAME = "blockcrypt-netdisks.service"
CREDENTIAL = "blockcrypt-passphrase"
WAIT_DEFAULT_S = 300


def _quote(arg: str) -> str:
    """An argument for an Exec line (systemd's quoting: double quotes, \\ escapes)."""
    if arg and all(c.isalnum() or c in "/._-:=+,@%" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_lines(program: str, home: Path, *, credential: bool, wait_s: int,
               network: bool = False) -> tuple[str, str]:
    base = [program, "--home", str(home)]
    which = "--network" if network else "--local"
    start = base + (["--passphrase-file", f"%d/{CREDENTIAL}"] if credential else []) + [
        "disk", "attach", "--all-persistent", which, "--wait", str(wait_s)]
    stop = base + ["disk", "detach", "--all", which]
    return " ".join(map(_quote, start)), " ".join(map(_quote, stop))


def _ordering(network: bool) -> list[str]:
    if network:     # like a `_netdev` volume: with the network, for remote-fs.target
        return ["After=network-online.target remote-fs-pre.target " + UNIT_NAME,
                "Wants=network-online.target",
                "Before=remote-fs.target"]
    return ["DefaultDependencies=no",
            "After=systemd-udevd.service systemd-modules-load.service local-fs-pre.target",
            "Wants=systemd-udevd.service",
            "Before=local-fs.target shutdown.target",
            "Conflicts=shutdown.target"]


def disks_unit(*, program: str, home: Path, credential_file: Path | None, wait_s: int,
               mounts_for: list[str], environment: dict[str, str],
               network: bool = False) -> str:
    """The text of blockcrypt-disks.service, or with ``network`` of
    blockcrypt-netdisks.service (see the module doc)."""
    start, stop = exec_lines(program, home, credential=credential_file is not None,
                             wait_s=wait_s, network=network)
    needs = sorted({str(home), *mounts_for})
    what = "that need the network (Ceph stores, KMIP keys)" if network else \
        "that need no network"
    lines = [
        "# Written by `blockcrypt service install`; run it again after changing options.",
        "[Unit]",
        f"Description=blockcrypt: attach persistent encrypted disks {what} of {home}",
        *_ordering(network),
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
        f"WantedBy={'remote-fs.target' if network else 'local-fs.target'}",
        "",
    ]
    return "\n".join(lines)
