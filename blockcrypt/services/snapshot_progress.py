"""Snapshots being taken: one marker file per disk, for refusal and progress.

Owns ``run/.snapshots/<disk id>.json`` (a name no disk can have: names never
start with '.'; the folder is removed with its last marker), created with ``O_EXCL`` by ``snapshot create`` before it copies
anything and removed when it ends, whatever the outcome.  It records the
snapshot's name, the disk's, the creator's pid and start time, and the bytes
copied so far (rewritten atomically as the copy advances).  A second
``snapshot create`` of the same disk finds the marker of a live creator and is
refused; a marker whose creator is gone (kill -9) is stale and removed.
``snapshot show`` / ``list`` report live markers as snapshots in state
``copying`` with a percentage.  Beside a marker, ``<disk id>.sock`` is the
hand-over socket of a detached disk's copy (:mod:`.snapshot_detached`),
removed with a stale marker.  Nothing here is needed for crash safety: the
catalog row and the staged file are (see :mod:`.snapshots`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import errors
from ..system import fsfreeze, proc, quiesce
from .runtime import SNAPSHOTS_DIR

DIR_NAME = SNAPSHOTS_DIR
# how often the marker is rewritten while a copy advances
UPDATE_INTERVAL_S = 0.5


class SnapshotMarker:
    """The marker of one snapshot create in progress (a context manager)."""

    def __init__(self, run_dir: Path, disk_id: str, disk_name: str, snap_name: str):
        self.dir = run_dir / DIR_NAME
        self.path = self.dir / f"{disk_id}.json"
        pid = os.getpid()
        self.info = {"name": snap_name, "disk_name": disk_name, "disk_id": disk_id,
                     "pid": pid, "start_time": proc.process_start_time(pid),
                     "done_bytes": 0, "total_bytes": 0}
        self._last = 0.0

    def __enter__(self) -> SnapshotMarker:
        for _ in range(5):
            try:
                if self._claim():
                    return self
            except FileNotFoundError:
                continue            # the folder was removed empty meanwhile: again
            except OSError as exc:  # a full home (NoSpace: HomeFull at the boundary)
                _remove_if_empty(self.dir)
                raise errors.storage_error(self.path, exc, "snapshot marker") from None
        raise errors.StateError(detail=f"another snapshot of disk "
                                f"{self.info['disk_name']!r} is starting; retry")

    def _claim(self) -> bool:
        """Create the marker; False if a stale one was cleared (try again)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.info))
            try:
                os.link(tmp, self.path)          # whole, or not at all; never replaces
                return True
            except FileExistsError:
                other = _read(self.path)
                if other is not None and _live(other):
                    raise errors.StateError(
                        detail=f"disk {other['disk_name']!r} already has a snapshot "
                               f"being taken ({other['name']!r}, {_percent(other)}% "
                               f"copied); wait for it (`blockcrypt snapshot show "
                               f"{other['name']}`) and retry") from None
                _clear_stale(self.path, other)
                return False
        finally:
            _unlink(tmp)

    def note(self, **fields) -> None:
        """Record fields now (``frozen``: mount points to thaw if we die)."""
        self.info.update(fields)
        self._write()

    def progress(self, done_bytes: int, total_bytes: int) -> None:
        """Record progress (at most every UPDATE_INTERVAL_S, and at the end)."""
        now = time.monotonic()
        if now - self._last < UPDATE_INTERVAL_S and done_bytes < total_bytes:
            return
        self._last = now
        self.info.update(done_bytes=done_bytes, total_bytes=total_bytes)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.info))
            os.replace(tmp, self.path)
        except OSError:
            _unlink(tmp)                     # progress display only: never fail the copy

    def __exit__(self, *exc) -> None:
        _unlink(self.path)
        _remove_if_empty(self.dir)


def in_progress(run_dir: Path) -> list[dict]:
    """Snapshots being taken by live processes: name, disk, state, percent."""
    out = []
    d = run_dir / DIR_NAME
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        info = _read(p)
        if info is None:
            continue
        if not _live(info):
            _clear_stale(p, info)
            continue
        out.append({"name": info["name"], "disk_name": info["disk_name"],
                    "disk_id": info["disk_id"], "state": "copying",
                    "percent": _percent(info), "done_bytes": info["done_bytes"],
                    "total_bytes": info["total_bytes"]})
    return out


def _clear_stale(path: Path, info: dict | None) -> None:
    """A marker whose creator is gone (kill -9): thaw what it froze, remove it."""
    info = info or {}
    if info.get("frozen") and info.get("control_socket"):
        quiesce.nudge_resume(info["control_socket"])   # a thaw writes: I/O must flow
    for mp in info.get("frozen") or ():
        fsfreeze.thaw(mp)
    _unlink(path.with_suffix(".sock"))    # a detached copy's hand-over socket
    _unlink(path)
    _remove_if_empty(path.parent)


def _percent(info: dict) -> int:
    total = info.get("total_bytes") or 0
    return int(100 * info.get("done_bytes", 0) / total) if total else 0


def _live(info: dict) -> bool:
    return proc.process_alive(info.get("pid"), info.get("start_time"))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove_if_empty(d: Path) -> None:
    """The folder goes when its last marker does: run/ holds only attached disks."""
    try:
        d.rmdir()
    except OSError:
        pass                    # not empty (another create), or already gone


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
