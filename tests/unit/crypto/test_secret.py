import ctypes
import os
import pickle

import pytest

from blockcrypt.crypto.secret import Secret, disable_core_dumps

from support.prereq import require


def test_repr_and_str_redact():
    s = Secret(b"\x01\x02hunter2")
    for text in (repr(s), str(s), f"{s}", repr([s])):
        assert "hunter2" not in text and "redacted" in text


def test_wipe_zeroes_the_buffer_in_place():
    s = Secret(b"A" * 64)
    buf = s._buf  # the very bytearray the secret lives in
    s.wipe()
    assert bytes(buf) == bytes(64)
    assert s.wiped
    with pytest.raises(ValueError):
        s.view()
    s.wipe()  # idempotent


def test_context_manager_wipes():
    with Secret(b"B" * 32) as s:
        buf = s._buf
        assert s.view().tobytes() == b"B" * 32
    assert bytes(buf) == bytes(32)


def test_equality_constant_time_and_unhashable():
    assert Secret(b"abc") == b"abc"
    assert Secret(b"abc") == Secret(b"abc")
    assert not (Secret(b"abc") == b"abd")
    with pytest.raises(TypeError):
        hash(Secret(b"x"))


def test_cannot_pickle():
    with pytest.raises(TypeError):
        pickle.dumps(Secret(b"x"))


def test_random_and_lengths():
    a, b = Secret.random(64), Secret.random(64)
    assert len(a) == 64 and a != b.view()


def test_read_exact_fd_from_pipe():
    r, w = os.pipe()
    os.write(w, b"k" * 40)
    os.write(w, b"k" * 24)
    os.close(w)
    s = Secret.read_exact_fd(r, 64)
    assert s == b"k" * 64
    os.close(r)


def test_read_exact_fd_short_raises_without_content():
    r, w = os.pipe()
    os.write(w, b"secretbytes")
    os.close(w)
    with pytest.raises(EOFError) as ei:
        Secret.read_exact_fd(r, 64)
    assert b"secretbytes".decode() not in str(ei.value)
    os.close(r)


def test_memory_is_locked_when_allowed():
    require(os.geteuid() == 0, "only root may always mlock (no RLIMIT_MEMLOCK)")
    s = Secret.random(64)
    assert s._locked  # root may always mlock


def test_disable_core_dumps_sets_not_dumpable(tmp_path):
    # Run in a child so the test process stays dumpable.
    pid = os.fork()
    if pid == 0:
        disable_core_dumps()
        libc = ctypes.CDLL(None)
        os._exit(0 if libc.prctl(3, 0, 0, 0, 0) == 0 else 1)  # PR_GET_DUMPABLE
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _locked_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


def test_wiping_one_secret_keeps_page_neighbours_locked():
    """mlock does not nest: wiping one secret must not unlock another on the same page."""
    require(os.geteuid() == 0, "mlock accounting needs an unlimited RLIMIT_MEMLOCK (root)")
    from blockcrypt.crypto import secret as mod
    secrets = [Secret.random(64) for _ in range(32)]  # small: many share pages
    shared = [s for s in secrets
              if any(set(mod._pages(s._buf)) & set(mod._pages(t._buf))
                     for t in secrets if t is not s)]
    assert shared, "expected some secrets to share a page"
    victim, keep = shared[0], [s for s in secrets if s is not shared[0]]
    victim.wipe()
    for s in keep:
        for p in mod._pages(s._buf):
            assert mod._page_locks.get(p, 0) >= 1
    assert _locked_kib() > 0
    for s in keep:
        s.wipe()


def test_wipe_from_a_finalizer_inside_the_page_lock_section_does_not_deadlock():
    """The garbage collector can run a finalizer (a Secret's __del__, or that of
    an object holding one) while the same thread holds the page-lock mutex inside
    Secret._lock.  Such a wipe must not block on that non-reentrant mutex (it
    once hung a whole test run): it zeroes the bytes at once and leaves the
    munlock accounting to the next holder of the mutex."""
    import threading

    from blockcrypt.crypto import secret as mod
    victim = Secret(b"k" * 64)
    buf = victim._buf
    pages = mod._pages(buf)
    counts = {p: mod._page_locks.get(p, 0) for p in pages}
    locked = victim._locked             # False where RLIMIT_MEMLOCK forbids mlock
    done = threading.Event()

    def inside_the_critical_section():
        with mod._page_locks_mutex:     # as Secret._lock holds it when GC strikes
            victim.wipe()
        done.set()

    t = threading.Thread(target=inside_the_critical_section, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "wipe blocked on the page-lock mutex its own thread holds"
    assert victim.wiped and bytes(buf) == bytes(64)
    Secret(b"n" * 16).wipe()            # the next holder settles the queued pages
    assert not mod._pending_unlocks
    if locked:
        for p in pages:
            assert mod._page_locks.get(p, 0) == counts[p] - 1


def vm_flags_at(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    region = None
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                region = start <= address < end
            elif first == "VmFlags:" and region:
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_locked_pages_are_left_out_of_core_dumps():
    """A locked secret's pages are also MADV_DONTDUMP ("dd" in smaps), and "lo"."""
    require(os.geteuid() == 0, "only root may always mlock (no RLIMIT_MEMLOCK)")
    import ctypes
    s = Secret.random(64)
    addr = ctypes.addressof((ctypes.c_char * 64).from_buffer(s._buf))
    assert {"lo", "dd"} <= vm_flags_at(addr)
    s.wipe()
