"""The point-in-time copy of a detached disk, without holding the disk for the copy.

Owns the step of ``snapshot create`` for a disk that no server writes (detached,
or attached read-only): the instant is fixed under a shared lock of the container
(which no read-write server can hold meanwhile) in milliseconds, and the data is
copied after the lock is released, so ``disk attach`` never waits for the copy:

- reflink (XFS, btrfs): ``FICLONE`` under the lock; done;
- otherwise, under the lock: the snapshot file is created, the chunk holding the
  header copies is copied (a resize or header restore that follows changes
  only that chunk and the file's length, and the copy is of the length at the
  instant), and the hand-over socket ``run/.snapshots/<disk id>.sock`` starts
  listening; then the lock is released and this process copies the rest
  chunk by chunk (:class:`~blockcrypt.storage.chunkcopy.CowCopy`, holes stay
  holes).  Between two chunks it answers a server that started meanwhile
  (:class:`~blockcrypt.system.cowclient.HandoffListener`; the plugin asks before
  it serves its first request, :func:`blockcrypt.nbd.cow.take_over`): it hands
  over the snapshot file and the chunks already copied, and from then on waits
  for the server to finish exactly as for an attached disk (every write of the
  server copies the old chunk first).

Why this is safe: a read-write server exists only with the container's
exclusive lock, taken after our shared lock is released, i.e. after the socket
listens; the server asks before any write and does not serve if we do not
answer (its start fails after a timeout; the disk stays attachable).  A killed
``snapshot create`` closes the socket: the server serves without copying, and
the unpublished snapshot file is removed by the next command.  A killed server
makes ``snapshot create`` fail with nothing published.  Writes are never
delayed beyond one chunk copy, and nothing here writes the container.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .. import errors
from ..storage import fastcopy
from ..storage.chunkcopy import CowCopy
from ..storage.header import DATA_ALIGN
from ..storage.home import create_private_file
from ..system.cowclient import CowSession, HandoffListener
from ..testing.crashpoints import crashpoint

COPY_BEFORE_WRITE = "copy-before-write"


class BackgroundCopy:
    """A detached disk's snapshot whose instant is fixed, to be copied by :meth:`run`."""

    def __init__(self, copy: CowCopy, listener: HandoffListener, dst: Path, what: str):
        self.copy = copy
        self.listener = listener
        self.dst = dst
        self.what = what

    def run(self, progress: Callable[[int, int], None]) -> tuple[str, int]:
        """Copy the rest (or hand it to a server that starts); returns (method,
        bytes a server's writes copied first).  Durable when it returns."""
        copy = self.copy
        try:
            crashpoint("snapshot.background")
            for index in range(copy.chunks):
                conn = self.listener.poll(copy.src_fd)
                if conn is not None:
                    return COPY_BEFORE_WRITE, self._hand_over(conn, progress)
                copy.step(index)
                progress(copy.done_bytes, copy.size_bytes)
            os.fsync(copy.dst_fd)
            return COPY_BEFORE_WRITE, 0
        except OSError as exc:
            raise errors.storage_error(self.dst, exc) from None
        finally:
            self.close()

    def _hand_over(self, conn, progress: Callable[[int, int], None]) -> int:
        copy = self.copy
        with CowSession.hand_over(conn, self.what, copy.dst_fd, copy.size_bytes,
                                  copy.chunk_bytes, bytes(copy.copied)) as session:
            self.close()                 # the copy is the server's now
            crashpoint("snapshot.handed-over")
            return session.wait(progress)

    def close(self) -> None:
        self.listener.close()
        self.copy.close()


def fix_instant(lock, dst: Path, handoff: str, what: str) -> str | BackgroundCopy | None:
    """Under the shared lock ``lock`` (held): reflink the container to the new
    file dst (returns ``"reflink"``), or fix the instant for a
    :class:`BackgroundCopy` to be run once the lock is released.  None when this
    store's containers are not files: the caller copies under the lock."""
    src_fd = getattr(lock, "fd", None)
    if not isinstance(src_fd, int):
        return None
    dst_fd = create_private_file(dst)
    try:
        if fastcopy.try_reflink(src_fd, dst_fd):
            size_bytes = os.fstat(dst_fd).st_size
            fastcopy.progress_fn()(size_bytes, size_bytes)
            os.fsync(dst_fd)
            os.close(dst_fd)
            return fastcopy.REFLINK
        copy = CowCopy(src_fd, dst_fd)       # owns dst_fd from here on
    except BaseException:
        os.close(dst_fd)
        raise
    try:
        for index in range(min(copy.chunks, -(-DATA_ALIGN // copy.chunk_bytes))):
            copy.copy_chunk(index)           # the header copies (F-21) as of the instant
        listener = HandoffListener(handoff)
    except BaseException:
        copy.close()
        raise
    crashpoint("snapshot.locked")
    return BackgroundCopy(copy, listener, dst, what)
