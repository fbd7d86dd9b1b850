"""Copy-before-write (blockcrypt.nbd.cow) in-process: the copy is the instant
it started, whatever the writes and the copier do meanwhile; holes stay holes;
the control socket protocol end to end with the real client."""
from __future__ import annotations

import os
import threading
import time

import pytest

from blockcrypt import errors
from blockcrypt.nbd import cow
from blockcrypt.nbd.cow import CowCopy, CowServer
from blockcrypt.storage import chunkcopy
from blockcrypt.storage.chunkcopy import CowCopy as StorageCowCopy
from blockcrypt.system.cowclient import CowSession, HandoffListener

CHUNK = 64 * 1024


def _file(path, size, data_at=()):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    for off, data in data_at:
        os.pwrite(fd, data, off)
    return fd


def test_writes_racing_the_copier_never_reach_the_copy(tmp_path):
    size = 64 * CHUNK
    src = _file(tmp_path / "src", size, [(i * CHUNK, os.urandom(CHUNK)) for i in range(0, 64, 2)])
    before = os.pread(src, size, 0)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    copy = CowCopy(src, dst, chunk_bytes=CHUNK)

    def writer(seed: int) -> None:
        for i in range(200):
            off = (seed * 7919 + i * 104729) % (size - 5000)
            copy.before_write(off, 5000)         # what DiskBackend does before a write
            os.pwrite(src, os.urandom(5000), off)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    copy.run()
    for t in threads:
        t.join()
    assert copy.error is None and all(copy.copied)
    assert copy.before_write_chunks > 0
    assert os.pread(os.open(tmp_path / "dst", os.O_RDONLY), size + 1, 0) == before
    copy.close()
    os.close(src)


def test_holes_stay_holes(tmp_path):
    size = 256 * CHUNK
    src = _file(tmp_path / "src", size, [(10 * CHUNK, b"x" * CHUNK)])
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    copy = CowCopy(src, dst, chunk_bytes=CHUNK)
    copy.before_write(100 * CHUNK, 10)       # a write into a hole copies nothing
    copy.run()
    st = os.stat(tmp_path / "dst")
    assert st.st_size == size and st.st_blocks * 512 <= 2 * CHUNK
    copy.close()


class _Backend:
    def __init__(self, fd):
        self.fd, self.cow = fd, None

    def source_fd(self):
        return self.fd

    def set_cow(self, cow):
        self.cow = cow

    def current_cow(self):
        return self.cow


def test_protocol_start_wait_and_abandon(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkcopy, "_TEST_DELAY_S", 0.1)     # the copier reaches the end in 0.7 s
    last = 7 * 1024 * 1024
    src = _file(tmp_path / "src", 8 * 1024 * 1024, [(last, b"old" * 1000)])
    backend = _Backend(src)
    server = CowServer(str(tmp_path / "cow.sock"), backend)
    try:
        dst = os.open(tmp_path / "snap", os.O_RDWR | os.O_CREAT, 0o600)
        with CowSession.connect(tmp_path / "cow.sock", "disk 'd'") as s:
            s.start(dst)
            assert backend.cow is not None            # writes now copy first
            backend.cow.before_write(last, 10)
            os.pwrite(src, b"new", last)
            seen = []
            assert s.wait(lambda done, total: seen.append((done, total))) == 1024 * 1024
        assert backend.cow is None and seen[-1][0] == seen[-1][1]
        assert os.pread(dst, 3, last) == b"old"
        os.close(dst)
        # a client that goes away mid-copy: the server stops and is ready again
        with CowSession.connect(tmp_path / "cow.sock", "disk 'd'") as s:
            dst2 = os.open(tmp_path / "snap2", os.O_RDWR | os.O_CREAT, 0o600)
            s.start(dst2)
            os.close(dst2)
        with CowSession.connect(tmp_path / "cow.sock", "disk 'd'") as s:
            with pytest.raises(errors.StateError, match="snapshot copy of disk 'd' failed"):
                s.sock.sendall(b"X")                  # not a start request
                s.start(os.open(tmp_path / "snap", os.O_RDONLY))
    finally:
        server.close()
    assert CowSession.connect(tmp_path / "cow.sock", "disk 'd'") is None


def test_hand_over_of_a_detached_copy_to_a_starting_server(tmp_path, monkeypatch):
    """snapshot create copies part of a detached disk, a server starts and takes
    the copy over (nbd.cow.take_over): the server's writes copy first, the
    chunks the CLI copied are not copied again, the result is the instant."""
    monkeypatch.setattr(chunkcopy, "_TEST_DELAY_S", 0.05)
    size = 32 * CHUNK
    path = tmp_path / "src"
    src = _file(path, size, [(i * CHUNK, os.urandom(CHUNK)) for i in range(32)])
    before = os.pread(src, size, 0)
    dst = os.open(tmp_path / "snap", os.O_RDWR | os.O_CREAT, 0o600)
    mine = StorageCowCopy(src, dst, chunk_bytes=CHUNK)
    for index in range(8):
        mine.step(index)                                  # the CLI's part
    sock = str(tmp_path / "h.sock")
    listener = HandoffListener(sock)
    assert listener.poll(src) is None                     # nobody asks yet
    # a server of another file (the disk was reset meanwhile) is told no
    other = _Backend(_file(tmp_path / "other", size))
    box = {}
    t = threading.Thread(target=lambda: box.update(r=cow.take_over(sock, other)))
    t.start()
    wait_until = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < wait_until:
        listener.poll(src)
    t.join()
    assert box["r"] is None and other.cow is None
    # the server of this very file takes the copy over
    backend = _Backend(os.open(path, os.O_RDWR))
    t = threading.Thread(target=lambda: box.update(r=cow.take_over(sock, backend)))
    t.start()
    conn = None
    while conn is None:
        conn = listener.poll(src)
    session = CowSession.hand_over(conn, "disk 'd'", dst, mine.size_bytes, CHUNK,
                                   bytes(mine.copied))
    listener.close()
    mine.close()
    t.join()
    assert box["r"] is not None and backend.cow is not None
    assert list(backend.cow.copied[:8]) == [1] * 8
    for index in (3, 20, 31):                             # writes while it copies
        backend.cow.before_write(index * CHUNK + 100, 10)
        os.pwrite(backend.fd, b"new data", index * CHUNK + 100)
    with session:
        assert session.wait() == 2 * CHUNK                # 20 and 31: copied first
    box["r"].join()
    assert backend.cow is None
    assert os.pread(os.open(tmp_path / "snap", os.O_RDONLY), size + 1, 0) == before
    # once the creator is gone, a starting server serves without copying
    assert cow.take_over(sock, backend) is None
