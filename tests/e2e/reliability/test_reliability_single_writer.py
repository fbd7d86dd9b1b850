"""At most one writing server per container (docs/RELIABILITY.md §3): the nbdkit plugin
takes an exclusive whole-file flock for read-write (shared for read-only), so a second
server on the same container file is refused (issue 12, guarantees with no test)."""
from __future__ import annotations

import pytest

from blockcrypt.storage.container import create_container
from blockcrypt.storage.header import Kind, new_header

from support.nbdkit import serve_container
from support.prereq import require_tools

pytestmark = [pytest.mark.e2e]

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    require_tools("nbdkit")
    path = tmp_path / "d.bcd"
    create_container(path, new_header(Kind.DISK, 16 * MiB, 4096, encrypted=False))
    return path


def _refused(path, *, readonly: bool) -> str:
    with pytest.raises(RuntimeError) as e:
        with serve_container(path, readonly=readonly, start_timeout=20):
            pass
    return str(e.value)


def test_a_second_writing_server_on_the_same_container_is_refused(disk):
    with serve_container(disk) as first:
        h = first.connect()
        h.pwrite(b"\x42" * 4096, 0)
        h.flush()
        assert "in use by another server" in _refused(disk, readonly=False)
        assert "in use by another server" in _refused(disk, readonly=True)
        assert h.pread(4096, 0) == b"\x42" * 4096        # the first one still serves
    with serve_container(disk) as again:                # released when it stopped
        assert again.connect().pread(4096, 0) == b"\x42" * 4096


def test_read_only_servers_share_but_keep_a_writer_out(disk):
    with serve_container(disk, readonly=True), serve_container(disk, readonly=True):
        assert "in use by another server" in _refused(disk, readonly=False)
