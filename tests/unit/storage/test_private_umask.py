"""storage.home.private_umask: the process umask is restored even when threads overlap."""
from __future__ import annotations

import os
import threading

from blockcrypt.storage.home import private_umask


def current_umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_overlapping_threads_restore_the_callers_umask():
    """A enters, B enters, A leaves, B leaves: the umask is 0077 while either is inside
    and the caller's afterwards (a per-thread save/restore left 0077 for good)."""
    old = os.umask(0o022)
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen: dict[str, int] = {}

        def a():
            with private_umask():
                a_in.set()
                assert b_in.wait(10)
            a_out.set()

        def b():
            assert a_in.wait(10)
            with private_umask():
                b_in.set()
                assert a_out.wait(10)
                seen["b after a left"] = current_umask()

        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == {"b after a left": 0o077}
        assert current_umask() == 0o022
    finally:
        os.umask(old)


def test_nested_use_in_one_thread():
    old = os.umask(0o027)
    try:
        with private_umask():
            with private_umask():
                assert current_umask() == 0o077
            assert current_umask() == 0o077
        assert current_umask() == 0o027
    finally:
        os.umask(old)
