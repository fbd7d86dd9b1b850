"""``disk copy``: copy the files of one disk's file system onto another's.

The supported way to move data between an unencrypted and an encrypted disk,
or between CMKs: blockcrypt never converts a disk in place.  Owns the sequence
attach, (mkfs,) mount, ``rsync -aHAX``, unmount, detach; attaching and
detaching are :class:`~blockcrypt.services.attach.Attachments`' job, and no
container or key is touched here.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors
from ..storage.home import ensure_private_dir
from ..system import commands, proc
from . import runtime

if TYPE_CHECKING:
    from .disks import DiskService


def fs_type(device: str) -> str | None:
    """The file system type on device (blkid), None if it has none."""
    argv = commands.blkid_type_argv(device)
    cp = proc.run(argv, check=False)
    if cp.returncode == 2:          # nothing found
        return None
    if cp.returncode != 0:
        raise errors.CommandFailed(cmd=" ".join(argv), rc=cp.returncode,
                                   stderr=cp.stderr.decode(errors="replace").strip())
    return cp.stdout.decode().strip() or None


def copy_files(disks: DiskService, src_name: str, dst_name: str, *,
               progress: bool = False) -> dict:
    """Copy the files of SRC's file system onto DST's, both disks detached.

    SRC is attached read-only and mounted read-only; DST is attached read-write
    and gets a file system of SRC's type if it has none.  ``rsync -aHAX``
    copies (hard links, ACLs, extended attributes), with rsync's progress line
    (bytes, percentage, rate, ETA) on stderr when ``progress``.  Both are
    unmounted and detached afterwards, also on failure.  Refused (DiskAttached)
    if either disk is in use.
    """
    runtime.require_root("blockcrypt disk copy")
    runtime.require_tools("rsync", "blkid", "mount", "umount")
    if src_name == dst_name:
        raise errors.InvalidInput(detail=f"disk copy needs two different disks, got "
                                         f"{src_name!r} twice")
    disks.recover_files()
    for d in (disks.disk_row(src_name), disks.disk_row(dst_name)):
        disks.attachments.require_free(d)
    ensure_private_dir(disks.home.run_dir)
    work = Path(tempfile.mkdtemp(prefix="copy-", dir=disks.home.run_dir))
    attached: list[str] = []
    mounted: list[Path] = []
    try:
        src_dev = disks.attach(src_name, read_only=True)["device"]
        attached.append(src_name)
        dst_dev = disks.attach(dst_name)["device"]
        attached.append(dst_name)
        fstype = fs_type(src_dev)
        if fstype is None:
            raise errors.InvalidInput(detail=f"disk {src_name!r} has no file system to "
                                             "copy (nothing recognised by blkid)")
        dst_type = fs_type(dst_dev)
        if dst_type is None:
            proc.run(commands.mkfs_argv(fstype, dst_dev), timeout_s=None)
        for dev, sub, ro in ((src_dev, "src", True), (dst_dev, "dst", False)):
            mnt = work / sub
            mnt.mkdir()
            proc.run(commands.mount_argv(dev, mnt, read_only=ro))
            mounted.append(mnt)
        argv = commands.rsync_argv(mounted[0], mounted[1], progress=progress)
        if progress:
            proc.run_visible(argv, stdout_to_stderr=True)   # our stdout is the result
        else:
            proc.run(argv, timeout_s=None)
    finally:
        problems = []
        for mnt in reversed(mounted):
            cp = proc.run(commands.umount_argv(mnt), check=False)
            if cp.returncode != 0:
                problems.append(f"umount {mnt}: {cp.stderr.decode(errors='replace')}")
        for name in reversed(attached):
            try:
                disks.detach(name)
            except errors.BlockcryptError as e:
                problems.append(e.message)
        if not problems:
            shutil.rmtree(work, ignore_errors=True)
    if problems:
        raise errors.EnvironmentProblem(detail="disk copy finished but cleaning up "
                                        "failed: " + "; ".join(problems))
    return {"source": src_name, "destination": dst_name, "file_system": fstype,
            "made_file_system": dst_type is None}
