"""Hostile NBD requests against the plugin (issue 8, item 8).

libnbd with strict mode off sends what a careless or malicious client would:
unaligned, zero-length, out-of-bounds, past-the-end and oversized requests,
unknown flags.  libnbd itself refuses requests above 64 MiB, so a minimal raw
NBD client (below) sends those, unknown command types and garbage.  Every
request is either served correctly (checked against a shadow copy) or fails
with the right errno, and the server keeps serving: the disk content equals the
shadow at the end, over a fresh connection.
"""
from __future__ import annotations

import errno
import os
import random
import socket
import struct

import pytest

from blockcrypt.storage import container

from support.nbdkit import import_libnbd, serve_container
from support.prereq import require, require_tools

KiB, MiB = 1024, 1024 * 1024
SIZE = 80 * MiB          # room for requests above the advertised 32 MiB maximum
NBD_MAX_REQUEST = 64 * MiB

pytestmark = pytest.mark.e2e


@pytest.fixture(params=[512, 4096], ids=lambda ss: f"ss{ss}")
def served(request, tmp_path):
    """An encrypted disk with random content in its first MiBs, served; yields
    (server, shadow, sector_size)."""
    require_tools("nbdkit")
    require(import_libnbd() is not None, "python3-libnbd not installed")
    ss = request.param
    path = tmp_path / "d.bcd"
    header = container.new_header("disk", SIZE, ss, encrypted=True, cmk_id="key-test",
                                  cmk_version=1, wrapped_dk=b"w")
    container.create_container(path, header)
    dk = os.urandom(64)
    shadow = bytearray(SIZE)
    shadow[:2 * MiB] = os.urandom(2 * MiB)
    shadow[SIZE - 64 * KiB:] = os.urandom(64 * KiB)
    with serve_container(path, dk) as srv:
        h = srv.connect()
        h.pwrite(bytes(shadow[:2 * MiB]), 0)
        h.pwrite(bytes(shadow[SIZE - 64 * KiB:]), SIZE - 64 * KiB)
        h.flush()
        h.shutdown()
        yield srv, shadow, ss
        assert srv.proc.poll() is None, "nbdkit died:\n" + srv.log_text()
        check = srv.connect()
        assert check.pread(2 * MiB, 0) == shadow[:2 * MiB]
        assert check.pread(64 * KiB, SIZE - 64 * KiB) == shadow[SIZE - 64 * KiB:]
        check.shutdown()


def outcome(call):
    """None on success, else the errno of the libnbd error."""
    nbd = import_libnbd()
    try:
        call()
    except nbd.Error as e:
        assert e.errnum, f"error without errno: {e}"
        return e.errnum
    return None


def test_unaligned_requests_are_served_correctly(served):
    srv, shadow, ss = served
    h = srv.connect(strict=False)
    rnd = random.Random(ss)
    cases = [(1, 0), (1, ss - 1), (2, ss - 1), (ss + 2, ss - 1), (3 * ss, 1), (1, SIZE - 1),
             (ss + 1, SIZE - ss - 1), (7, 2 * MiB - 3)]
    cases += [(rnd.randrange(1, 5 * ss), rnd.randrange(0, 2 * MiB)) for _ in range(150)]
    for i, (count, offset) in enumerate(cases):
        kind = i % 3
        if kind == 0:
            data = rnd.randbytes(count)
            assert outcome(lambda: h.pwrite(data, offset)) is None
            shadow[offset:offset + count] = data
        elif kind == 1:
            assert outcome(lambda: h.zero(count, offset)) is None
            shadow[offset:offset + count] = bytes(count)
        assert h.pread(count, offset) == shadow[offset:offset + count], (count, offset)
    assert h.pread(2 * MiB, 0) == shadow[:2 * MiB]
    h.shutdown()


def test_zero_length_requests(served):
    """Zero-length requests fail cleanly (or succeed as no-ops) and change nothing."""
    srv, shadow, ss = served
    h = srv.connect(strict=False)
    for offset in (0, ss - 1, 12345, SIZE - 1, SIZE, SIZE + 1):
        for name, call in [("pread", lambda: h.pread(0, offset)),
                           ("pwrite", lambda: h.pwrite(b"", offset)),
                           ("zero", lambda: h.zero(0, offset)),
                           ("trim", lambda: h.trim(0, offset)),
                           ("flush", lambda: h.flush()),
                           ("block_status", lambda: h.block_status(0, offset,
                                                                   lambda *a: 0))]:
            err = outcome(call)
            assert err in (None, errno.EINVAL, errno.ENOSPC), (name, offset, err)
        assert h.pread(16, 0) == shadow[:16]
    h.shutdown()


def test_out_of_bounds_and_past_the_end(served):
    srv, shadow, ss = served
    nbd = import_libnbd()
    h = srv.connect(strict=False)
    big = [SIZE, SIZE + 1, SIZE + ss, 2**63 - 1, 2**63, 2**64 - ss, 2**64 - 1]
    reads = [(ss, SIZE - ss + 1), (2, SIZE - 1), (ss, SIZE - 10),
             (NBD_MAX_REQUEST, SIZE - NBD_MAX_REQUEST + 1)]
    reads += [(1, o) for o in big] + [(ss, o) for o in big]
    for count, offset in reads:
        assert outcome(lambda: h.pread(count, offset)) == errno.EINVAL, (count, offset)
        assert outcome(lambda: h.block_status(count, offset, lambda *a: 0)) == errno.EINVAL
        assert outcome(lambda: h.cache(count, offset)) in (errno.EINVAL, errno.EOPNOTSUPP)
    for count, offset in reads:
        data = b"\xa5" * min(count, 1 * MiB)
        for name, call in [("pwrite", lambda: h.pwrite(data, offset)),
                           ("pwrite+fua", lambda: h.pwrite(data, offset, nbd.CMD_FLAG_FUA)),
                           ("zero", lambda: h.zero(count, offset)),
                           ("trim", lambda: h.trim(count, offset))]:
            if name.startswith("pwrite") and len(data) != count:
                continue
            err = outcome(call)
            # NBD: writes past the end SHOULD be ENOSPC; nbdkit may say EINVAL.
            assert err in (errno.EINVAL, errno.ENOSPC), (name, count, offset, err)
    # The sectors at the end were not partially overwritten.
    assert h.pread(64 * KiB, SIZE - 64 * KiB) == shadow[SIZE - 64 * KiB:]
    h.shutdown()


def test_unknown_flags_and_unsupported_commands(served):
    srv, shadow, ss = served
    nbd = import_libnbd()
    h = srv.connect(strict=False)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_FLAGS & ~nbd.STRICT_COMMANDS)
    assert outcome(lambda: h.pwrite(b"x" * 100, 0, 1 << 10)) == errno.EINVAL
    assert outcome(lambda: h.pread(100, 0, 1 << 9)) == errno.EINVAL
    assert outcome(lambda: h.trim(4096, 0)) == errno.EINVAL      # discard off: no trim
    assert h.pread(4096, 0) == shadow[:4096]
    h.shutdown()


def test_requests_above_the_advertised_maximum(served):
    """The plugin advertises 32 MiB; nbdkit accepts up to 64 MiB: such requests
    are served correctly, exactly at the protocol maximum too."""
    srv, shadow, ss = served
    h = srv.connect(strict=False)
    assert h.get_block_size(import_libnbd().SIZE_MAXIMUM) < 48 * MiB
    data = os.urandom(48 * MiB + 3)
    offset = SIZE - len(data) - 64 * KiB - 5
    assert outcome(lambda: h.pwrite(data, offset)) is None
    shadow[offset:offset + len(data)] = data
    assert h.pread(NBD_MAX_REQUEST, SIZE - NBD_MAX_REQUEST) == shadow[SIZE - NBD_MAX_REQUEST:]
    assert outcome(lambda: h.zero(NBD_MAX_REQUEST + 1 * MiB, 1 * MiB)) is None  # no payload
    shadow[1 * MiB:NBD_MAX_REQUEST + 2 * MiB] = bytes(NBD_MAX_REQUEST + 1 * MiB)
    assert h.pread(NBD_MAX_REQUEST, 1 * MiB) == shadow[1 * MiB:NBD_MAX_REQUEST + 1 * MiB]
    h.shutdown()


# -- a raw NBD client, for what libnbd refuses to send -----------------------------------

NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE = 0, 1


class RawNbd:
    """Fixed-newstyle handshake with NBD_OPT_EXPORT_NAME: simple replies only."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        assert self.recv(16) == b"NBDMAGICIHAVEOPT"
        self.recv(2)                                        # handshake flags
        self.sock.sendall(struct.pack(">I", 3))             # FIXED_NEWSTYLE | NO_ZEROES
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))   # EXPORT_NAME ""
        self.size, self.flags = struct.unpack(">QH", self.recv(10))

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError(f"server closed the connection after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def request(self, cmd: int, offset: int, length: int, flags: int = 0,
                payload: bytes = b"", cookie: int = 7) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie,
                                      offset, length) + payload)

    def reply(self, cookie: int = 7) -> int:
        magic, err, got_cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC and got_cookie == cookie
        return err

    def close(self) -> None:
        self.sock.close()


NBD_EINVAL, NBD_ENOMEM, NBD_EOVERFLOW = 22, 12, 75


def test_raw_oversized_unknown_and_garbage_requests(served):
    srv, shadow, ss = served
    c = RawNbd(srv.socket)
    assert c.size == SIZE
    # Above the protocol maximum: refused (nbdkit says ENOMEM) or the
    # connection is dropped; never served.
    for length in (NBD_MAX_REQUEST + 1, 1 << 31, 2**32 - 1):
        c.request(NBD_CMD_READ, 0, length)
        assert c.reply() in (NBD_EINVAL, NBD_ENOMEM, NBD_EOVERFLOW)
    payload = b"\x5a" * (NBD_MAX_REQUEST + 4096)
    c.request(NBD_CMD_WRITE, 0, len(payload), payload=payload)
    assert c.reply() in (NBD_EINVAL, NBD_ENOMEM, NBD_EOVERFLOW)
    # Unknown command: EINVAL, and the connection goes on.
    c.request(42, 0, 4096)
    assert c.reply() == NBD_EINVAL
    c.request(NBD_CMD_READ, 0, 4096)
    assert c.reply() == 0 and c.recv(4096) == shadow[:4096]
    c.close()
    # Garbage instead of a request: nbdkit drops that connection, nobody else's.
    g = RawNbd(srv.socket)
    g.sock.sendall(b"\xde\xad\xbe\xef" * 7)
    with pytest.raises((EOFError, ConnectionError)):
        g.reply()
    g.close()
    c = RawNbd(srv.socket)
    c.request(NBD_CMD_READ, 0, 4096)
    assert c.reply() == 0 and c.recv(4096) == shadow[:4096]
    c.close()
