"""services.snapshot_progress.SnapshotMarker: claiming the marker on a full home is an
error of the tree (NoSpace, which the boundary words as HomeFull) and leaves no folder.
The real full-home path is tests/e2e/reliability/test_reliability_full_home.py."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.services.snapshot_progress import DIR_NAME, SnapshotMarker


def test_a_full_home_while_claiming_is_nospace_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(errors.NoSpace):
        with SnapshotMarker(tmp_path, "d" * 32, "db", "snap1"):
            pass
    assert list(tmp_path.iterdir()) == []            # no marker, no .snapshots folder
    assert not (tmp_path / DIR_NAME).exists()


def test_marker_claimed_and_removed(tmp_path):
    with SnapshotMarker(tmp_path, "e" * 32, "db", "snap1") as m:
        assert m.path.is_file() and m.path.parent.name == DIR_NAME
    assert list(tmp_path.iterdir()) == []
