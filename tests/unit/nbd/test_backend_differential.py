"""The compiled request path against the Python reference path, request for request.

Two copies of one disk (same size, sector size and data key) are served by
DiskBackend: one by the compiled path (blockcrypt.crypto._datapath.Disk, the
GIL released), one by the reference path (engine="reference": PythonSectors
and pyca's XTS, one cipher object per sector).  More than 10,000 random
requests (reads, writes, zeroes with and without deallocation, trims; any
offset and length, including lengths past the C scratch chunk) run in batches
of 1, 2, 4 or 8: on the compiled disk a batch runs concurrently from a thread
pool, on the reference disk one request after the other.  Requests of a batch
never touch the same bytes, but often the same sectors, so concurrent
read-modify-writes of one sector are exercised; the result must not depend on
the order.  Every read must return what the reference returns, and the two
files must end byte for byte identical, ciphertext and holes included.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blockcrypt.crypto.secret import Secret
from blockcrypt.nbd.backend import DiskBackend
from blockcrypt.storage import container

KiB = 1024
CASES = {(512, True): 4000, (4096, True): 4000, (512, False): 1000, (4096, False): 1000}
assert sum(CASES.values()) >= 10_000


def _pair(tmp_path: Path, sector_size: int, encrypted: bool, size_bytes: int):
    dk = os.urandom(64) if encrypted else None
    backends = []
    for engine in ("compiled", "reference"):
        path = tmp_path / f"{engine}.bcd"
        if encrypted:
            header = container.new_header("disk", size_bytes, sector_size, encrypted=True,
                                          cmk_id="key-test", cmk_version=1, wrapped_dk=b"w")
        else:
            header = container.new_header("disk", size_bytes, sector_size, encrypted=False)
        container.create_container(path, header)
        backends.append(DiskBackend(path, Secret(dk) if dk else None, read_only=False,
                                    discard=True, engine=engine))
    assert [b.engine_name for b in backends] == ["compiled", "python"]
    return backends


def _random_op(rng: random.Random, size: int, ss: int) -> tuple:
    kind = rng.choices(["read", "write", "zero", "trim"], [40, 40, 14, 6])[0]
    shape = rng.random()
    if shape < 0.6:                                  # small, any alignment
        count = rng.randint(0, 3 * ss + 100)
        offset = rng.randrange(0, size - count + 1)
    elif shape < 0.9:                                # whole sectors
        n = rng.randint(1, 16)
        count = n * ss
        offset = rng.randrange(0, size // ss - n + 1) * ss
    else:                                            # large, past the C scratch chunk
        count = rng.randint(200 * KiB, min(size, 300 * KiB))
        offset = rng.randrange(0, size - count + 1)
    if kind == "write":
        return kind, offset, count, rng.randbytes(count)
    if kind == "zero":
        return kind, offset, count, rng.random() < 0.5
    return kind, offset, count, None


def _run(b: DiskBackend, op: tuple):
    kind, offset, count, arg = op
    if kind == "read":
        buf = bytearray(count)
        b.pread_into(buf, offset)
        return bytes(buf)
    if kind == "write":
        b.pwrite(arg, offset, fua=False)
    elif kind == "zero":
        b.zero(count, offset, may_trim=arg, fua=False)
    else:
        b.trim(count, offset, fua=False)
    return None


def _disjoint_batch(rng: random.Random, k: int, size: int, ss: int) -> list[tuple]:
    batch: list[tuple] = []
    for _ in range(8 * k):
        if len(batch) == k:
            break
        op = _random_op(rng, size, ss)
        start, end = op[1], op[1] + op[2]
        if all(end <= o[1] or o[1] + o[2] <= start for o in batch):
            batch.append(op)
    return batch


def _data_area(b: DiskBackend) -> bytes:
    with open(b.path, "rb") as f:
        f.seek(b.header.data_offset)
        return f.read(b.size_bytes)


@pytest.mark.parametrize("sector_size,encrypted", list(CASES),
                         ids=[f"{ss}-{'enc' if e else 'plain'}" for ss, e in CASES])
def test_compiled_path_equals_reference_path(tmp_path, sector_size, encrypted):
    size = 1024 * KiB
    rng = random.Random(sector_size * 2 + encrypted)
    fast, ref = _pair(tmp_path, sector_size, encrypted, size)
    cases = 0
    with fast, ref, ThreadPoolExecutor(max_workers=8) as pool:
        batches = 0
        while cases < CASES[sector_size, encrypted]:
            k = rng.choice([1, 1, 2, 4, 8])
            batch = _disjoint_batch(rng, k, size, sector_size)
            got = list(pool.map(lambda op: _run(fast, op), batch))    # concurrently
            want = [_run(ref, op) for op in batch]                      # one by one
            for op, g, w in zip(batch, got, want):
                assert g == w, f"{op[0]} of {op[2]} bytes at {op[1]} differs (case {cases})"
            cases += len(batch)
            batches += 1
            if batches % 200 == 0:
                assert _data_area(fast) == _data_area(ref), f"after {cases} cases"
        whole = [bytearray(size), bytearray(size)]
        fast.pread_into(whole[0], 0)
        ref.pread_into(whole[1], 0)
        assert whole[0] == whole[1]
        assert _data_area(fast) == _data_area(ref)
        # the same holes: deallocation ran on the same sectors
        assert fast.extents(size, 0) == ref.extents(size, 0)
    assert cases >= CASES[sector_size, encrypted]
