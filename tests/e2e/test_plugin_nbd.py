"""The nbdkit plugin: end to end through real nbdkit and real NBD clients
(nbdinfo, nbdcopy, libnbd), plus the adapter's error mapping and key handling
checked in-process with a stand-in ``nbdkit`` module."""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import subprocess

import pytest

from blockcrypt.storage import container

from support.nbdkit import PLUGIN, import_libnbd, plugin_env, run_nbdkit, serve_container
from support.prereq import require, require_tools
from support.wait import wait_for

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture
def nbd_tools():
    require_tools("nbdkit", "nbdinfo", "nbdcopy")
    require(import_libnbd() is not None, "python3-libnbd not installed")


def e2e(test):
    return pytest.mark.e2e(pytest.mark.usefixtures("nbd_tools")(test))


def make_disk(path, size_bytes, sector_size=4096, encrypted=True):
    if encrypted:
        header = container.new_header("disk", size_bytes, sector_size, encrypted=True,
                                      cmk_id="key-test", cmk_version=1, wrapped_dk=b"w")
        dk = os.urandom(64)
    else:
        header = container.new_header("disk", size_bytes, sector_size, encrypted=False)
        dk = None
    return container.create_container(path, header), dk


def nbdinfo(uri: str) -> dict:
    cp = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True,
                        timeout=60, check=True)
    return json.loads(cp.stdout)["exports"][0]


def data_area(path, header) -> bytes:
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        return f.read(header.size_bytes)


@e2e
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_nbdinfo_shows_geometry_and_capabilities(tmp_path, sector_size):
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 64 * MiB, sector_size)
    with serve_container(path, dk) as srv:
        info = nbdinfo(srv.uri)
    assert info["export-size"] == 64 * MiB
    assert info["block_size_minimum"] == 1
    assert info["block_size_preferred"] == sector_size
    assert info["block_size_maximum"] >= 1 * MiB
    for cap in ("can_flush", "can_fua", "can_multi_conn", "can_zero"):
        assert info[cap] is True, cap
    assert info["can_trim"] is False                  # discard not enabled
    assert info["is_read_only"] is False
    assert "base:allocation" in info["contexts"]


@e2e
def test_nbdcopy_256mib_at_an_unaligned_offset_reads_back(tmp_path):
    """256 MiB of random data written with nbdcopy at an unaligned offset (via
    nbdkit's offset filter over the plugin), read back with nbdcopy: same
    SHA-256, zeros around it, and the container holds no plaintext there."""
    path = tmp_path / "big.bcd"
    size, offset, length = 272 * MiB, 1 * MiB + 12345, 256 * MiB
    header, dk = make_disk(path, size)
    src = tmp_path / "src.bin"
    sha = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(length // (16 * MiB)):
            chunk = os.urandom(16 * MiB)
            sha.update(chunk)
            f.write(chunk)
    with serve_container(path, dk, filters=("offset",),
                         filter_args=(f"offset={offset}", f"range={length}")) as srv:
        subprocess.run(["nbdcopy", "--flush", str(src), srv.uri], check=True, timeout=300)
    src.unlink()
    with serve_container(path, dk, readonly=True) as srv:
        p = subprocess.Popen(["nbdcopy", srv.uri, "-"], stdout=subprocess.PIPE)
        got = hashlib.sha256()
        pos = 0
        while chunk := p.stdout.read(4 * MiB):
            lo, hi = max(pos, offset), min(pos + len(chunk), offset + length)
            if lo < hi:
                got.update(chunk[lo - pos:hi - pos])
            if pos < offset:
                assert not any(chunk[:offset - pos]), "bytes before the offset are not zero"
            if pos + len(chunk) > offset + length:
                assert not any(chunk[max(0, offset + length - pos):]), "tail not zero"
            pos += len(chunk)
        assert p.wait(60) == 0
    assert pos == size
    assert got.hexdigest() == sha.hexdigest()


@e2e
@pytest.mark.parametrize("encrypted,sector_size", [(True, 512), (True, 4096), (False, 4096)])
def test_unaligned_io_over_several_connections_matches_shadow(tmp_path, encrypted,
                                                              sector_size):
    """Random unaligned pwrite/zero/pread (some with FUA) over three connections."""
    nbd = import_libnbd()
    path = tmp_path / "d.bcd"
    size = 4 * MiB
    header, dk = make_disk(path, size, sector_size, encrypted)
    shadow = bytearray(size)
    rnd = random.Random(99)
    with serve_container(path, dk, discard=True) as srv:
        handles = [srv.connect() for _ in range(3)]
        for _ in range(400):
            h = rnd.choice(handles)
            offset = rnd.randrange(size)
            count = rnd.randrange(1, min(size - offset, 3 * sector_size + 77) + 1)
            op = rnd.random()
            if op < 0.45:
                data = rnd.randbytes(count)
                h.pwrite(data, offset, nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0)
                shadow[offset:offset + count] = data
            elif op < 0.6:
                flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
                h.zero(count, offset, flags)
                shadow[offset:offset + count] = bytes(count)
            elif op < 0.65:
                h.trim(count, offset)
                shadow[offset:offset + count] = bytes(count)
            else:
                assert h.pread(count, offset) == shadow[offset:offset + count]
        handles[0].flush()
        assert handles[1].pread(size, 0) == shadow
        for h in handles:
            h.shutdown()
    raw = data_area(path, header)
    if encrypted:
        assert raw != bytes(shadow)
    else:
        assert raw == bytes(shadow)


def _block_status(h, count, offset):
    """[(offset, length, flags)] from base:allocation."""
    out = []

    def cb(metacontext, off, entries, err):
        pos = off
        for length, flags in zip(entries[0::2], entries[1::2]):
            out.append((pos, length, flags))
            pos += length
        return 0

    h.block_status(count, offset, cb)
    return out


@e2e
def test_extents_show_holes_on_a_fresh_disk_and_data_after_writes(tmp_path):
    nbd = import_libnbd()
    path = tmp_path / "d.bcd"
    size = 16 * MiB
    header, dk = make_disk(path, size)
    hole_zero = nbd.STATE_HOLE | nbd.STATE_ZERO
    with serve_container(path, dk) as srv:
        h = nbd.NBD()
        srv.handles.append(h)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(str(srv.socket))
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        assert _block_status(h, size, 0) == [(0, size, hole_zero)]
        h.pwrite(os.urandom(1 * MiB), 4 * MiB)
        ext = _block_status(h, size, 0)
        assert ext[0] == (0, 4 * MiB, hole_zero)
        data = [(o, n) for o, n, f in ext if not f & nbd.STATE_HOLE]
        assert data and data[0][0] == 4 * MiB and sum(n for _, n in data) >= 1 * MiB
        assert sum(n for _, n in data) < 2 * MiB
        h.shutdown()
    # nbdinfo --map agrees
    with serve_container(path, dk) as srv:
        cp = subprocess.run(["nbdinfo", "--map", "--json", srv.uri], capture_output=True,
                            text=True, check=True, timeout=60)
    entries = json.loads(cp.stdout)
    assert entries[0]["offset"] == 0 and entries[0]["type"] == 3
    assert any(e["type"] == 0 and e["offset"] == 4 * MiB for e in entries)


def _forms(dk: bytes) -> list[bytes]:
    return [dk, dk.hex().encode(), dk.hex().upper().encode(), base64.b64encode(dk),
            dk[:32], dk[32:]]


@e2e
def test_data_key_is_nowhere_in_cmdline_environ_or_verbose_log(tmp_path):
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 8 * MiB)
    with serve_container(path, dk, verbose=True) as srv:
        h = srv.connect(strict=False)
        h.pwrite(b"hello" * 1000, 777)
        assert h.pread(5000, 777) == b"hello" * 1000
        with pytest.raises(import_libnbd().Error):
            h.pread(10, 8 * MiB)                     # out of range: logged by nbdkit
        pid = srv.proc.pid
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        environ = open(f"/proc/{pid}/environ", "rb").read()
        h.shutdown()
        log = srv.log.read_bytes()
    assert b"keyfd=" in cmdline and b"config key=keyfd" in log   # the log is really verbose
    for form in _forms(dk):
        assert form not in cmdline
        assert form not in environ
        assert form not in log
    assert all(form not in path.read_bytes() for form in _forms(dk))


@e2e
def test_readonly_refuses_writes(tmp_path):
    nbd = import_libnbd()
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 8 * MiB)
    with serve_container(path, dk) as srv:
        h = srv.connect()
        h.pwrite(b"original" * 512, 0)
        h.flush()
        h.shutdown()
    before = path.read_bytes()
    with serve_container(path, dk, readonly=True, discard=True) as srv:
        assert nbdinfo(srv.uri)["is_read_only"] is True
        h = srv.connect(strict=False)
        for call in (lambda: h.pwrite(b"x" * 4096, 0),
                     lambda: h.zero(4096, 0),
                     lambda: h.trim(4096, 0)):
            with pytest.raises(nbd.Error) as exc:
                call()
            # EROFS travels as NBD_EPERM (the protocol has no EROFS)
            assert exc.value.errnum in (errno.EPERM, errno.EROFS), exc.value
        assert h.pread(4096, 0) == b"original" * 512
        h.shutdown()
    assert path.read_bytes() == before


@e2e
def test_fast_zero_only_when_it_is_a_hole_punch(tmp_path):
    nbd = import_libnbd()
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 16 * MiB)
    with serve_container(path, dk) as srv:                     # no discard
        h = srv.connect()
        h.pwrite(b"\x11" * 8192, 0)
        with pytest.raises(nbd.Error) as exc:
            h.zero(8192, 0, nbd.CMD_FLAG_FAST_ZERO)
        assert exc.value.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP)
        assert h.pread(8192, 0) == b"\x11" * 8192              # untouched
    with serve_container(path, dk, discard=True) as srv:
        h = srv.connect()
        h.zero(8192, 0, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(8192, 0) == bytes(8192)
        with pytest.raises(nbd.Error):                          # may not punch: not fast
            h.zero(8192, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)


@e2e
def test_discard_advertises_trim_and_deallocates(tmp_path):
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 16 * MiB)
    with serve_container(path, dk, discard=True) as srv:
        assert nbdinfo(srv.uri)["can_trim"] is True
        h = srv.connect()
        h.pwrite(os.urandom(4 * MiB), 0)
        h.flush()
        allocated = os.stat(path).st_blocks * 512
        h.trim(3 * MiB, 1000)
        h.flush()
        assert h.pread(3 * MiB, 1000) == bytes(3 * MiB)
        assert h.pread(1000, 0) != bytes(1000)
        h.shutdown()
    assert os.stat(path).st_blocks * 512 <= allocated - 2 * MiB


@e2e
def test_config_refusals(tmp_path):
    enc, plain = tmp_path / "e.bcd", tmp_path / "p.bcd"
    _, dk = make_disk(enc, 8 * MiB)
    make_disk(plain, 8 * MiB, encrypted=False)

    def refused(cp, *needles):
        text = cp.stderr.decode(errors="replace")
        assert cp.returncode != 0, text
        for n in needles:
            assert n in text, text
        assert dk.hex() not in text
        return text

    ok = run_nbdkit(enc, dk=dk)
    assert ok.returncode == 0, ok.stderr.decode()
    text = refused(run_nbdkit(enc, "secretish=0123abcd", dk=dk), "unknown parameter",
                   "secretish")
    assert "0123abcd" not in text                  # the value is never echoed
    refused(run_nbdkit(enc, "readonly=maybe", dk=dk), "readonly")
    refused(run_nbdkit(enc, "keyfd=notanumber"), "keyfd")
    refused(run_nbdkit(enc), "no data key")                    # encrypted, no key
    refused(run_nbdkit(plain, dk=dk), "not encrypted")         # plain, key given
    refused(run_nbdkit(enc, dk=dk[:40]), "data key")           # short key
    refused(run_nbdkit(enc, dk=bytes(32) * 2), "halves")       # weak key
    refused(run_nbdkit(tmp_path / "missing.bcd", dk=dk), "missing.bcd")
    # no file= at all
    cp = subprocess.run(["nbdkit", "-U", "-", "--run", "true", "python", str(PLUGIN)],
                        capture_output=True, env=plugin_env(), timeout=30)
    refused(cp, "file=")


# -- the adapter in-process, with a stand-in nbdkit module (error mapping, key handling) --

class FakeNbdkit:
    """Just what the plugin uses of nbdkit's module; records set_error()."""

    THREAD_MODEL_PARALLEL = 3
    FUA_NATIVE = 2
    CACHE_NONE = 0
    FLAG_MAY_TRIM, FLAG_FUA, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8
    EXTENT_HOLE, EXTENT_ZERO = 1, 2

    def __init__(self):
        self.errors: list[int] = []

    def set_error(self, err: int) -> None:
        self.errors.append(err)


@pytest.fixture
def plugin(monkeypatch):
    """A fresh copy of the plugin module loaded against FakeNbdkit."""
    import importlib.util
    import sys

    from blockcrypt.crypto import secret
    fake = FakeNbdkit()
    dumpable_calls = []
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    monkeypatch.setattr(secret, "disable_core_dumps", lambda: dumpable_calls.append(1))
    spec = importlib.util.spec_from_file_location("blockcrypt_plugin_under_test", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.fake, mod.dumpable_calls = fake, dumpable_calls
    yield mod
    mod.cleanup()


def _start(mod, path, dk: bytes | None, *params):
    mod.config("file", str(path))
    if dk is not None:
        r, w = os.pipe()
        os.write(w, dk)
        os.close(w)
        mod.config("keyfd", str(r))
    for p in params:
        mod.config(*p.split("=", 1))
    mod.config_complete()
    if dk is not None:
        with pytest.raises(OSError) as exc:          # the descriptor was closed
            os.fstat(r)
        assert exc.value.errno == errno.EBADF
    key_copy = mod._dk
    mod.get_ready()
    return key_copy


def test_adapter_reads_the_key_once_and_wipes_it(plugin, tmp_path):
    path = tmp_path / "d.bcd"
    _, dk = make_disk(path, 1 * MiB)
    assert plugin.dumpable_calls == [1]               # non-dumpable from load on
    key_copy = _start(plugin, path, dk)
    assert key_copy is not None and key_copy.wiped    # the cipher holds its own copy
    assert plugin._dk is None
    h = plugin.open(False)
    plugin.pwrite(h, memoryview(b"abc" * 1000), 5, plugin.fake.FLAG_FUA)
    buf = bytearray(3000)
    plugin.pread(h, memoryview(buf), 5, 0)
    assert buf == b"abc" * 1000
    assert plugin.thread_model() == FakeNbdkit.THREAD_MODEL_PARALLEL
    assert plugin.block_size(h) == (1, 4096, plugin.MAX_REQUEST_BYTES)
    assert plugin.can_write(h) and not plugin.can_trim(h) and plugin.can_multi_conn(h)
    plugin.cleanup()
    assert plugin._backend is None


def test_adapter_maps_errors_to_errnos_without_key_bytes(plugin, tmp_path):
    path = tmp_path / "d.bcd"
    _, dk = make_disk(path, 1 * MiB)
    _start(plugin, path, dk, "readonly=true")
    h = plugin.open(True)
    cases = [(lambda: plugin.pwrite(h, b"x", 0, 0), errno.EROFS),
             (lambda: plugin.zero(h, 10, 0, 0), errno.EROFS),
             (lambda: plugin.pread(h, bytearray(10), 1 * MiB - 5, 0), errno.EINVAL),
             (lambda: plugin.extents(h, 10, 1 * MiB, 0), errno.EINVAL),
             (lambda: plugin.zero(h, 10, 0, FakeNbdkit.FLAG_FAST_ZERO), errno.ENOTSUP)]
    for call, expected in cases:
        plugin.fake.errors.clear()
        with pytest.raises(RuntimeError) as exc:
            call()
        assert plugin.fake.errors == [expected]
        assert exc.value.__cause__ is None and exc.value.__suppress_context__
        assert dk.hex() not in str(exc.value) and repr(dk) not in str(exc.value)
    assert not plugin.can_write(h)
    assert plugin.extents(h, 1 * MiB, 0, 0) == [(0, 1 * MiB, 3)]


def test_adapter_config_validation(plugin):
    with pytest.raises(ValueError, match="unknown parameter 'key'") as exc:
        plugin.config("key", "00112233")
    assert "00112233" not in str(exc.value)
    for key, value in [("readonly", "perhaps"), ("discard", ""), ("keyfd", "-1"),
                       ("keyfd", "three")]:
        with pytest.raises(ValueError, match=key):
            plugin.config(key, value)
    with pytest.raises(ValueError, match="file="):
        plugin.config_complete()
    r, w = os.pipe()
    os.write(w, b"short")
    os.close(w)
    plugin.config("file", "/nonexistent")
    plugin.config("keyfd", str(r))
    with pytest.raises(RuntimeError, match="cannot read the data key"):
        plugin.config_complete()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@e2e
@pytest.mark.parametrize("threads", [4, 1])     # 1: requests run on the connection thread
def test_pinned_thread_states_released_when_connections_close(tmp_path, threads):
    """The plugin keeps each nbdkit worker thread's Python thread state across
    requests (``_ThreadStates``: no state created and destroyed per request)
    and must drop them when the connection closes.  Many short connections,
    each with concurrent requests on several worker threads: every close
    reports the states it released, the data stays right, and the server's
    memory does not grow with the number of connections (a leak would be
    ~70 KiB per connection: 4 states with their frame stacks)."""
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 16 * MiB, 4096)
    nbd = import_libnbd()
    rng = random.Random(7)
    expect = {}
    with serve_container(path, dk, verbose=True, threads=threads) as srv:
        def one_connection():
            h = nbd.NBD()
            h.connect_unix(str(srv.socket))
            cookies = []
            # Distinct offsets: the order of overlapping writes in flight is undefined.
            for off in rng.sample(range(0, 16 * MiB, 4096), 16):   # in flight together
                data = rng.randbytes(4096)
                expect[off] = data
                cookies.append(h.aio_pwrite(data, off))
            while h.aio_in_flight() > 0:
                h.poll(-1)
            assert all(h.aio_command_completed(c) for c in cookies)
            for off in rng.sample(sorted(expect), min(8, len(expect))):
                assert h.pread(4096, off) == expect[off]
            h.shutdown()

        for _ in range(20):
            one_connection()
        pid = srv.proc.pid
        rss_before = _rss_kib(pid)
        for _ in range(200):
            one_connection()
        rss_after = _rss_kib(pid)

        def closes() -> list[tuple[str, str]]:
            return re.findall(r"connection closed, (\d+) pinned thread state\(s\) "
                              r"released, (-?\d+) live", srv.log_text())

        # The log is written as nbdkit closes each connection: wait until it
        # names all 220.
        try:
            wait_for(lambda: len(closes()) >= 220, 10.0, "220 connection-closed log lines")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{srv.log_text()[-2000:]}") from None
        found = closes()
        released = [int(n) for n, _ in found]
        live = [int(n) for _, n in found]
    assert len(released) == 220, srv.log_text()[-2000:]
    assert all(1 <= n <= threads for n in released), released
    # The interpreter's thread states: the main thread's and the closing
    # connection thread's (nbdkit's PyGILState_Ensure), not one per request
    # or per connection ever served: a leak would pass 3 within a few closes.
    # (CI once saw 3 at the first close and 2 from then on, under load; the
    # third state's owner is not known, so the count may fall, never rise.)
    assert max(live) <= 3 and live[-1] <= live[0], live
    if threads > 1:                     # concurrent requests used several worker threads
        assert sum(n > 1 for n in released) > 100, released
    assert rss_after - rss_before < 6 * 1024, (rss_before, rss_after)


@e2e
def test_without_the_extension_the_python_path_serves_and_warns_once(tmp_path):
    """If the compiled data path cannot be loaded (here: pointed at a file that
    is not an extension), nbdkit still serves the disk correctly through the
    pure-Python path and its log says so once, loudly, with the way out."""
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 8 * MiB, 512)
    data = os.urandom(MiB + 1000)
    with serve_container(path, dk, extra_env={
            "BLOCKCRYPT_TESTONLY_DATAPATH_SO": str(tmp_path / "no-such-extension")}) as srv:
        h = srv.connect()
        for i in range(4):                                    # several requests
            h.pwrite(data, 4096 * i + 7)
        assert h.pread(len(data), 4096 * 3 + 7) == data
        h.shutdown()
        log = srv.log_text()
    assert log.count("WARNING") == 1, log
    assert "pure-Python reference engine" in log and "make install" in log
    assert "no-such-extension" in log                         # the reason is named
    raw = data_area(path, header)
    assert data[:4096] not in raw                             # still encrypted at rest
