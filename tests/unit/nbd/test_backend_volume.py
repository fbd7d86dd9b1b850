"""DiskBackend over the storage seam: any Volume serves, not only a container file.

An in-memory Volume stands in for a second store (the Ceph RBD one to come):
the backend encrypts, reads, zeroes, discards and reports extents through the
Volume methods alone.  Also the constructor's ownership rules: the backend
closes the volume it was given, on close and when the constructor fails.
"""
from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.nbd.backend import DiskBackend
from blockcrypt.storage import container
from blockcrypt.storage.volume import FileVolume, Volume

KiB = 1024


class MemoryVolume(Volume):
    """A data area in a bytearray; deallocated ranges are tracked as holes."""

    def __init__(self, header: container.Header, *, read_only: bool = False):
        self.name = "memory:test"
        self.header = header
        self.read_only = read_only
        self.data = bytearray(header.size_bytes)
        self.holes: set[int] = set()               # deallocated 512-byte blocks
        self.calls: list[str] = []
        self.closed = 0

    def pread_into(self, view, offset):
        self.calls.append("pread")
        view[:] = self.data[offset:offset + len(view)]

    def pwrite(self, view, offset):
        self.calls.append("pwrite")
        self.data[offset:offset + len(view)] = view
        self.holes -= set(range(offset // 512, -(-(offset + len(view)) // 512)))

    def flush(self):
        self.calls.append("flush")

    def deallocate(self, offset, length):
        self.calls.append("deallocate")
        self.data[offset:offset + length] = bytes(length)
        self.holes |= set(range(offset // 512, (offset + length) // 512))

    def extents(self, offset, count, max_runs):
        out = []
        for pos in range(offset, offset + count, 512):
            hole = pos // 512 in self.holes
            if out and out[-1][2] == hole:
                out[-1] = (out[-1][0], out[-1][1] + 512, hole)
            else:
                out.append((pos, 512, hole))
        return out[:max_runs]

    def close(self):
        self.closed += 1


def encrypted_header(size_bytes: int, sector_size: int) -> container.Header:
    return container.new_header("disk", size_bytes, sector_size, encrypted=True,
                                cmk_id="key-test", cmk_version=1, wrapped_dk=b"w")


@pytest.mark.parametrize("sector_size", (512, 4096))
def test_backend_serves_any_volume(sector_size):
    dk = os.urandom(64)
    vol = MemoryVolume(encrypted_header(256 * KiB, sector_size))
    shadow = bytearray(256 * KiB)
    rng = random.Random(sector_size)
    with DiskBackend(vol, Secret(dk), discard=True) as b:
        assert (b.volume, b.path, b.read_only) == (vol, "memory:test", False)
        for _ in range(60):
            offset = rng.randrange(0, 250 * KiB)
            data = rng.randbytes(rng.randrange(1, 6 * KiB))
            b.pwrite(data, offset, fua=rng.random() < 0.2)
            shadow[offset:offset + len(data)] = data
        buf = bytearray(len(shadow))
        b.pread_into(buf, 0)
        assert buf == shadow
        # What the volume stores is XTS ciphertext of sector i under tweak i*(ss/512).
        i = 7
        shadow[i * sector_size:(i + 1) * sector_size] = rng.randbytes(sector_size)
        b.pwrite(shadow[i * sector_size:(i + 1) * sector_size], i * sector_size, fua=False)
        stored = bytes(vol.data[i * sector_size:(i + 1) * sector_size])
        tweak = (i * (sector_size // 512)).to_bytes(16, "little")
        dec = Cipher(algorithms.AES(dk), modes.XTS(tweak)).decryptor()
        assert dec.update(stored) + dec.finalize() == shadow[i * sector_size:(i + 1) * sector_size]
        # zero with may_trim deallocates whole sectors through the volume
        b.zero(8 * sector_size, 16 * sector_size, may_trim=True, fua=True)
        shadow[16 * sector_size:24 * sector_size] = bytes(8 * sector_size)
        assert "deallocate" in vol.calls and "flush" in vol.calls
        b.pread_into(buf, 0)
        assert buf == shadow
        assert (16 * sector_size, 8 * sector_size, True) in b.extents(b.size_bytes, 0)
    assert vol.closed == 1


def test_backend_closes_the_volume_when_it_cannot_serve_it():
    vol = MemoryVolume(encrypted_header(64 * KiB, 4096))
    with pytest.raises(errors.InvalidKeyMaterial):
        DiskBackend(vol, None, discard=False)          # encrypted, no key
    assert vol.closed == 1
    vol = MemoryVolume(encrypted_header(64 * KiB, 4096), read_only=True)
    with pytest.raises(ValueError, match="read_only"):
        DiskBackend(vol, Secret(os.urandom(64)), read_only=False, discard=False)
    assert vol.closed == 1
    with DiskBackend(vol, Secret(os.urandom(64)), read_only=True, discard=False) as b:
        assert b.read_only
        with pytest.raises(OSError):
            b.pwrite(b"x", 0, fua=False)


def test_a_path_needs_read_only_and_opens_a_file_volume(tmp_path):
    path = tmp_path / "v.bcd"
    container.create_container(path, encrypted_header(64 * KiB, 4096))
    with pytest.raises(TypeError, match="read_only"):
        DiskBackend(path, Secret(os.urandom(64)), discard=False)
    with DiskBackend(path, Secret(os.urandom(64)), read_only=True, discard=False) as b:
        assert isinstance(b.volume, FileVolume) and b.volume.read_only
        assert b.volume.fd >= 0
    assert b.volume.fd == -1                            # closed with the backend
