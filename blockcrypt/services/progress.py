"""Progress of the long copies, for the CLI's display.

``reporting(fn)`` routes the ``(done_bytes, total_bytes)`` of every container copy
made within it to ``fn``: snapshot create, disk create --from-snapshot, snapshot
export and disk reset all copy through :mod:`blockcrypt.storage.fastcopy`, whose
copy loop reports, so no service passes a callback along.  (``disk copy`` copies
files with rsync, which draws its own progress: :mod:`.copy`.)
"""
from __future__ import annotations

from ..storage.fastcopy import ProgressFn, reporting

__all__ = ["ProgressFn", "reporting"]
