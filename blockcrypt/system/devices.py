"""Mounts and block devices, read from ``/proc/self/mountinfo`` and ``/sys``.

Owns: the queries detach and stale cleanup use to decide whether a device is in
use (mounted, held by dm/md, claimed exclusively), which loop devices a fuse file
backs, and which ``/dev/nbdN`` are free.  It runs no programs (that is
:mod:`blockcrypt.system.proc`) and changes nothing.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[tuple[str, str]]:
    """(major:minor, mount point) for every mount visible to this process."""
    out = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            out.append((fields[2], _unescape_mount(fields[4])))
    return out


def is_mountpoint(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(mp == target for _, mp in mountinfo())


def block_device_ids(device: str) -> dict[str, str]:
    """{'/dev/loop0': '7:0', '/dev/loop0p1': '259:0', ...}: the device and its partitions."""
    name = os.path.basename(device)
    sys_dir = Path("/sys/class/block") / name
    out = {}
    try:
        out[device] = (sys_dir / "dev").read_text().strip()
    except OSError:
        return out
    for part in sorted(sys_dir.glob(name + "*")):
        try:
            out["/dev/" + part.name] = (part / "dev").read_text().strip()
        except OSError:
            pass
    return out


def device_mounts(device: str) -> list[tuple[str, str]]:
    """(device or partition, mount point) for every mount of device or its partitions."""
    ids = block_device_ids(device)
    by_id = {v: k for k, v in ids.items()}
    return [(by_id[mm], mp) for mm, mp in mountinfo() if mm in by_id]


def device_holders(device: str) -> list[str]:
    """Kernel devices stacked on device or its partitions (dm-crypt, LVM, md)."""
    holders = []
    for dev in block_device_ids(device):
        d = Path("/sys/class/block") / os.path.basename(dev) / "holders"
        try:
            holders += sorted(p.name for p in d.iterdir())
        except OSError:
            pass
    return holders


def open_exclusively_busy(device: str) -> bool:
    """True if the kernel reports device busy for an exclusive open (O_EXCL on
    a block device fails with EBUSY while it is mounted - in any mount
    namespace - or claimed by another exclusive user)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        return e.errno == errno.EBUSY
    os.close(fd)
    return False


def loop_devices_backed_by(path: Path) -> list[str]:
    """Loop devices whose backing file is path (read from /sys, no losetup)."""
    target = os.path.realpath(path)
    found = []
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = bf.read_text().rstrip("\n")
        except OSError:
            continue
        if backing.endswith(" (deleted)"):
            backing = backing[: -len(" (deleted)")]
        if backing == target or backing == str(path):
            found.append("/dev/" + bf.parent.parent.name)
    return sorted(found)


def free_nbd_devices() -> list[str]:
    """/dev/nbdN devices not connected to a server (no /sys/block/nbdN/pid, size 0)."""
    free = []
    for d in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0)):
        if (d / "pid").exists():
            continue
        try:
            if int((d / "size").read_text().strip() or "0") != 0:
                continue
        except (OSError, ValueError):
            continue
        if Path("/dev", d.name).exists():
            free.append("/dev/" + d.name)
    return free
