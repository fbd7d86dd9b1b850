"""blockcrypt.storage.file_store: the Store contract on real files.

Create, read and rewrite headers, clone, export, the publish/doom/remove
protocol, the whole-file lock the services wait on, and recovery of what a
killed process leaves (a temp file, a doomed file).
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.storage import catalog, db, fastcopy, publish
from blockcrypt.storage.file_store import FileLock, FileStore
from blockcrypt.storage.header import Header, Kind, new_header
from blockcrypt.storage.store import ContainerLock, Store
from blockcrypt.system import proc

from support.wait import wait_for

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def store(tmp_path) -> FileStore:
    for sub in ("disks", "snapshots"):
        (tmp_path / sub).mkdir()
    return FileStore(tmp_path)


def _header(**kw) -> Header:
    return new_header(Kind.DISK, SIZE, 4096, encrypted=False, **kw)


def _new(store: FileStore, ref: str = "disks/x.bcd") -> tuple[Path, Header]:
    final = store.locate(ref)
    staged = store.staging(final)
    header = store.create(staged, _header())
    assert store.publish(staged, final) is True
    return final, header


def _dead_owner() -> tuple[int, int]:
    """(pid, start time) of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = wait_for(lambda: proc.process_start_time(p.pid), what="child start time")
    finally:
        p.kill()
        p.wait()
    assert not proc.process_alive(p.pid, start)
    return p.pid, start


def _insert_disk(conn, disk_id: str) -> None:
    with db.write_txn(conn):
        catalog.insert_disk(conn, id=disk_id, name=f"d{disk_id[:6]}",
                            path=f"disks/{disk_id}.bcd", size_bytes=SIZE, sector_size=4096,
                            encrypted=0, cmk_id=None, lineage_id=None, discard=0,
                            source_snapshot_id=None, created_at="2026-01-01T00:00:00Z")


def test_store_is_abstract_and_file_store_implements_it(tmp_path):
    with pytest.raises(TypeError):
        Store()                                   # type: ignore[abstract]
    assert isinstance(FileStore(tmp_path), Store)
    assert FileStore(tmp_path).locate("disks/a.bcd") == tmp_path / "disks" / "a.bcd"
    assert FileStore(tmp_path).new_ref("snapshots", "ab12") == "snapshots/ab12.bcd"


def test_staging_name_is_the_publish_protocols_temp_name(store):
    final = store.locate("disks/abc.bcd")
    staged = store.staging(final)
    pid = os.getpid()
    assert staged == publish.tmp_name(final, pid, proc.process_start_time(pid))
    assert staged.name == f"abc.bcd{publish.TMP_MARK}{pid}-{proc.process_start_time(pid)}"


def test_create_read_write_header_exists_allocated(store):
    final = store.locate("disks/x.bcd")
    assert not store.exists(final) and store.allocated_bytes(final) == 0
    staged = store.staging(final)
    stored = store.create(staged, _header())
    assert stored.seq == 0
    assert os.stat(staged).st_mode & 0o777 == 0o600
    assert os.path.getsize(staged) == stored.file_size_bytes
    with pytest.raises(errors.AlreadyExists):
        store.create(staged, _header())
    assert store.publish(staged, final) is True
    assert store.exists(final) and not staged.exists()
    assert store.read_header(final) == stored
    # sparse: two header copies, not the 4 MiB data area
    assert 0 < store.allocated_bytes(final) < SIZE
    new = store.write_header(final, stored.replace(seq=99))
    assert new.seq == 1 and store.read_header(final, repair=False) == new


def test_read_header_of_missing_container_is_not_found(store):
    with pytest.raises(errors.NotFound):
        store.read_header(store.locate("disks/missing.bcd"))


def test_reserve_grows_for_a_larger_header(store):
    final, header = _new(store)
    bigger = header.replace(size_bytes=2 * SIZE)
    store.reserve(final, bigger)
    assert os.path.getsize(final) == bigger.file_size_bytes
    assert store.write_header(final, bigger).size_bytes == 2 * SIZE


def test_clone_from_a_path_and_from_a_lock_copies_the_bytes(store):
    final, header = _new(store)
    with open(final, "r+b") as f:
        f.seek(header.data_offset + 8192)
        f.write(b"payload" * 100)
    copy1 = store.staging(store.locate("snapshots/c1.bcd"))
    assert store.clone(final, copy1) in (fastcopy.REFLINK, fastcopy.SPARSE)
    assert copy1.read_bytes() == final.read_bytes()
    copy2 = store.staging(store.locate("snapshots/c2.bcd"))
    with store.locked(final, exclusive=False) as lock:
        assert lock.held
        assert store.clone(lock, copy2) in (fastcopy.REFLINK, fastcopy.SPARSE)
    assert copy2.read_bytes() == final.read_bytes()
    with pytest.raises(errors.AlreadyExists):
        store.clone(final, copy2)
    with pytest.raises(errors.NotFound):
        store.clone(store.locate("disks/missing.bcd"), store.staging(store.locate("disks/z.bcd")))


def test_clone_refuses_another_stores_lock(store):
    class Foreign(ContainerLock):
        held, exclusive = True, False
    with pytest.raises(TypeError):
        store.clone(Foreign(), store.staging(store.locate("snapshots/c.bcd")))


def test_export_writes_the_data_area_atomically(store, tmp_path):
    final, header = _new(store)
    with open(final, "r+b") as f:
        f.seek(header.data_offset)
        f.write(b"first sector")
    dest = tmp_path / "out.img"
    store.export(final, dest, offset=header.data_offset, length=header.size_bytes)
    data = dest.read_bytes()
    assert len(data) == SIZE and data.startswith(b"first sector")
    with pytest.raises(errors.AlreadyExists):
        store.export(final, dest, offset=header.data_offset, length=header.size_bytes)


def test_publish_after_doom_finds_nothing(store):
    """A delete that commits between a create's row and its rename takes the temp file."""
    final = store.locate("disks/y.bcd")
    staged = store.staging(final)
    store.create(staged, _header())
    assert store.pending(final)
    doomed = store.doom(final)
    assert doomed.name == "y.bcd" + publish.DELETED_MARK and doomed.exists()
    assert not store.pending(final)
    assert store.publish(staged, final) is False and not final.exists()
    store.remove(doomed)
    assert not doomed.exists()
    store.remove(doomed)                    # idempotent


def test_doom_and_remove_a_published_container(store):
    final, _ = _new(store)
    doomed = store.doom(final)
    assert not final.exists() and doomed.exists()
    store.remove(doomed)
    assert list(final.parent.iterdir()) == []
    # no file at all (left to the operator): doom still returns where it would be
    assert store.doom(final) == doomed and not doomed.exists()


def test_swap_replaces_and_discard_removes(store):
    final, header = _new(store)
    staged = store.staging(final)
    replacement = store.create(staged, _header(uid=header.uid))
    with open(staged, "r+b") as f:
        f.seek(replacement.data_offset)
        f.write(b"new")
    store.swap(staged, final)
    assert not staged.exists()
    with open(final, "rb") as f:
        f.seek(replacement.data_offset)
        assert f.read(3) == b"new"
    other = store.staging(store.locate("disks/other.bcd"))
    store.create(other, _header())
    store.discard(other)
    assert not other.exists()
    store.discard(other)                    # missing: no-op


# -- locking -------------------------------------------------------------------------

def _hold(path: Path, op: int) -> int:
    """An independent open file description holding flock op (as a server would)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    fcntl.flock(fd, op | fcntl.LOCK_NB)
    return fd


def test_lock_contention_with_a_server(store):
    final, _ = _new(store)
    server = _hold(final, fcntl.LOCK_EX)      # a read-write server
    try:
        with store.locked(final, exclusive=False) as lock:
            assert isinstance(lock, FileLock)
            assert not lock.held and not lock.exclusive
        with store.locked(final, exclusive=True) as lock:
            assert not lock.held and lock.exclusive
    finally:
        os.close(server)
    reader = _hold(final, fcntl.LOCK_SH)      # a read-only server
    try:
        with store.locked(final, exclusive=False) as lock:
            assert lock.held                  # shared with shared
        with store.locked(final, exclusive=True) as lock:
            assert not lock.held
    finally:
        os.close(reader)
    with store.locked(final, exclusive=True) as lock:
        assert lock.held
        # while we hold it, a server cannot start
        fd = os.open(final, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    # released on leaving the block
    os.close(_hold(final, fcntl.LOCK_EX))


def test_locked_waits_until_the_holder_lets_go(store):
    final, _ = _new(store)
    holder = _hold(final, fcntl.LOCK_EX)
    result: list[bool] = []
    started = threading.Event()

    def waiter():
        started.set()
        with store.locked(final, exclusive=True, timeout_s=60) as lock:
            result.append(lock.held)

    t = threading.Thread(target=waiter)
    t.start()
    try:
        assert started.wait(30)
        assert result == []                  # cannot have the lock while we hold it
    finally:
        os.close(holder)
    t.join(60)
    assert not t.is_alive() and result == [True]


def test_locked_missing_container_is_not_found(store):
    with pytest.raises(errors.NotFound), \
            store.locked(store.locate("disks/missing.bcd"), exclusive=False):
        pass


# -- recovery ------------------------------------------------------------------------

def test_recover_temp_files_of_a_dead_creator(store, conn):
    pid, start = _dead_owner()
    d = store.root / "disks"
    committed, uncommitted, replaced = "a" * 32, "b" * 32, "c" * 32
    for obj in (committed, uncommitted, replaced):
        store.create(publish.tmp_name(d / f"{obj}.bcd", pid, start), _header())
    _insert_disk(conn, committed)
    _insert_disk(conn, replaced)
    store.create(d / f"{replaced}.bcd", _header())        # a reset that never swapped
    mine = store.staging(d / f"{'d' * 32}.bcd")             # a create in progress (alive)
    store.create(mine, _header())
    actions = store.recover(conn, "disks")
    assert sorted(actions) == sorted([
        f"completed creation of {committed}.bcd",
        f"removed unfinished {uncommitted}.bcd{publish.TMP_MARK}{pid}-{start}",
        f"removed unfinished replacement {replaced}.bcd{publish.TMP_MARK}{pid}-{start}",
    ])
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f"{committed}.bcd", f"{replaced}.bcd", mine.name])
    assert store.recover(conn, "disks") == []


def test_recover_doomed_files(store, conn):
    d = store.root / "disks"
    kept, gone = "e" * 32, "f" * 32
    for obj in (kept, gone):
        final = d / f"{obj}.bcd"
        staged = store.staging(final)
        store.create(staged, _header())
        store.publish(staged, final)
        store.doom(final)
    _insert_disk(conn, kept)                # its delete never committed
    actions = store.recover(conn, "disks")
    assert sorted(actions) == sorted([f"restored {kept}.bcd (delete did not commit)",
                                      f"removed deleted {gone}.bcd{publish.DELETED_MARK}"])
    assert [p.name for p in d.iterdir()] == [f"{kept}.bcd"]


def test_recover_leaves_foreign_names_and_missing_dirs(store, conn, tmp_path):
    odd = store.root / "snapshots" / f"{'a' * 32}.bcd{publish.TMP_MARK}not-a-pid"
    odd.write_bytes(b"")
    assert store.recover(conn, "snapshots") == []
    assert odd.exists()
    assert FileStore(tmp_path / "nowhere").recover(conn, "disks") == []


@pytest.mark.parametrize("ref", ["../victim", "/etc/passwd", "disks/../blockcrypt.db",
                                 "disks/../../victim", "disks", "", "run/x/disk.bcd",
                                 "disks/sub/x.bcd"])
def test_locate_refuses_a_reference_outside_the_container_folders(tmp_path, ref):
    """Issue 12 item 6: a catalog path is followed only inside disks/ or snapshots/."""
    with pytest.raises(errors.CatalogTampered) as e:
        FileStore(tmp_path).locate(ref, owner="disk 'db'")
    assert "disk 'db'" in e.value.message and "restore blockcrypt.db" in e.value.message


def test_locate_refuses_a_symlink_leading_out_of_the_home(tmp_path):
    (tmp_path / "disks").mkdir()
    (tmp_path / "disks" / "a.bcd").symlink_to("/etc/hostname")
    with pytest.raises(errors.CatalogTampered):
        FileStore(tmp_path).locate("disks/a.bcd")
