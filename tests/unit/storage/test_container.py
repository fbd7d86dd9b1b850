"""The container format (docs/FORMAT.md): one test group per MUST rule, cited by id.

File-handling tests that only need modes, paths and header replacement run on
pyfakefs; sparseness, locking, fsync and cryptsetup use real files.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blockcrypt import errors
from blockcrypt.storage import container
from blockcrypt.storage.container import (
    create_container,
    grow_container,
    read_header,
    write_header,
)
from blockcrypt.storage.header import (
    COPY_OFFSETS,
    COPY_SIZE,
    DATA_ALIGN,
    FORMAT_VERSION,
    MAGIC,
    Header,
    Kind,
    cryptsetup_argv,
    decode_copy,
    encode_copy,
    key_context,
    new_header,
)

from support.cli import REPO
from support.headers import DEFAULTS, PLAIN, build_copy, flip, header_for, slots, write_container
from support.prereq import require_tools
from support.wait import wait_for

MiB = 1 << 20


def enc_header(size_bytes: int = 4 * MiB, sector_size: int = 4096, kind: str = "disk",
               **kw) -> Header:
    h = new_header(kind, size_bytes, sector_size, encrypted=True, cmk_id="key-0123", **kw)
    return h.replace(cmk_version=2, wrapped_dk=os.urandom(120))


def plain_header(size_bytes: int = 4 * MiB, sector_size: int = 4096) -> Header:
    return new_header("disk", size_bytes, sector_size, encrypted=False)


def put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_on_disk(path: Path, offset: int) -> None:
    """Damage one byte whatever it held (a constant written over a random header
    byte leaves it unchanged once in 256 runs)."""
    with open(path, "rb") as f:
        f.seek(offset)
        byte = f.read(1)
    put(path, offset, flip(byte, 0, 0xFF))


def header_area(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(DATA_ALIGN)


@pytest.fixture
def created(tmp_path) -> tuple[Path, Header]:
    path = tmp_path / "disk.bcd"
    return path, create_container(path, enc_header())


@pytest.fixture
def fakefs(fs, monkeypatch):
    """pyfakefs with os.pread/os.pwrite, which pyfakefs 6 does not emulate.

    The shims act on the fake file object directly (pyfakefs's own lseek+write
    path loses an ftruncate'd length), so the code under test runs unchanged.
    """
    def obj(fd):
        return fs.get_open_file(fd).get_object()

    def pread(fd, n, offset):
        f = obj(fd)
        return bytes((f.byte_contents or b"").ljust(f.size, b"\0")[offset:offset + n])

    def pwrite(fd, data, offset):
        f, data = obj(fd), bytes(data)
        buf = bytearray(f.byte_contents or b"")
        buf.extend(bytes(max(f.size, offset + len(data)) - len(buf)))
        buf[offset:offset + len(data)] = data
        f.set_contents(bytes(buf))
        return len(data)

    monkeypatch.setattr(container.os, "pread", pread, raising=False)
    monkeypatch.setattr(container.os, "pwrite", pwrite, raising=False)
    os.makedirs("/home/bc/disks")
    return fs


# --- layout and encoding (F-5, F-6, F-21, §3.2) ------------------------------------

def test_encoding_matches_the_spec_byte_table():
    """F-5/§3.2: encode_copy produces exactly the bytes built from the spec's table."""
    h = header_for(seq=5)
    assert encode_copy(h) == build_copy(seq=5)
    assert decode_copy(build_copy(seq=5)) == h
    p = header_for(**PLAIN)
    assert encode_copy(p) == build_copy(**PLAIN)


def test_f5_framing_offsets():
    """F-5, F-6, F-8: magic at 0, version u16 at 8, SHA-256 of [0,4064) at 4064."""
    raw = encode_copy(enc_header())
    assert len(raw) == COPY_SIZE == 4096
    assert raw[:8] == MAGIC == b"BLKCRYPT"
    assert int.from_bytes(raw[8:10], "little") == FORMAT_VERSION == 1
    assert raw[4064:] == hashlib.sha256(raw[:4064]).digest()


@pytest.mark.parametrize("offset", [0, 8, 9, 10, 11, 12, 16, 24, 40, 48, 56, 57, 100, 500,
                                    2000, 4063, 4064, 4095])
def test_f5_f7_any_flipped_byte_invalidates_the_copy(offset):
    """F-5/F-7: the checksum covers every byte of the copy (and itself)."""
    raw = flip(encode_copy(enc_header()), offset)
    with pytest.raises((errors.ChecksumMismatch, errors.BadMagic)):
        decode_copy(raw)


def test_f21_both_copies_identical_at_their_offsets(created):
    """F-21: copy A at 0, copy B at 512 KiB, byte-identical after creation."""
    path, h = created
    assert COPY_OFFSETS == (0, 524288)
    a, b = slots(path)
    assert a == b == encode_copy(h)


def test_f15_unencrypted_carries_no_key_fields():
    """F-15: after the cipher name an unencrypted copy is all zero up to 4064."""
    raw = encode_copy(plain_header())
    assert raw[56] == 4 and raw[57:61] == b"none"
    assert not any(raw[61:4064])
    h = decode_copy(raw)
    assert (h.cmk_id, h.cmk_version, h.lineage_id, h.wrapped_dk) == (None,) * 4
    with pytest.raises(errors.FormatError):
        decode_copy(build_copy(**PLAIN, key=True))


def test_f16_key_fields_round_trip_any_valid_values():
    """F-16/F-19: key fields at their limits are stored exactly; the blob is opaque."""
    h = enc_header().replace(cmk_id="k" * 255, cmk_version=2**32 - 1,
                             wrapped_dk=bytes(range(256)) * 4)
    assert decode_copy(encode_copy(h)) == h
    h2 = enc_header().replace(cmk_id="clé-ü", wrapped_dk=b"\0")
    assert decode_copy(encode_copy(h2)) == h2


@pytest.mark.parametrize("kw, err", [
    (dict(cmk_id=b"\xff"), errors.MalformedHeader),
    (dict(cmk_id=b"a\x00b"), errors.MalformedHeader),
    (dict(cmk_id=b"a\x7fb"), errors.MalformedHeader),
    (dict(cmk_version=0), errors.MalformedHeader),
    (dict(wrapped=b"w" * 1025), errors.MalformedHeader),
    (dict(wrapped=b"", wrapped_len=0), errors.MalformedHeader),
    (dict(lineage=bytes(16)), errors.MalformedHeader),
    (dict(padding=b"\x00\x00\x07"), errors.MalformedHeader),
])
def test_f16_bad_key_fields_are_refused(kw, err):
    """F-16: lineage non-zero, version >= 1, printable UTF-8 CMK id, 1..1024-byte blob."""
    with pytest.raises(err) as info:
        decode_copy(build_copy(**kw))
    assert type(info.value) is err


@pytest.mark.parametrize("kw, err", [
    (dict(kind=0), errors.MalformedHeader),                        # F-9
    (dict(kind=3), errors.MalformedHeader),                        # F-9
    (dict(flags=0x05), errors.MalformedHeader),                    # F-10
    (dict(sector_size=2048), errors.UnsupportedSectorSize),    # F-11
    (dict(size_bytes=0), errors.BadGeometry),                  # F-12
    (dict(size_bytes=6144), errors.BadGeometry),               # F-12
    (dict(data_offset=2**63), errors.BadGeometry),             # F-13
    (dict(cipher=b"serpent-xts-plain64"), errors.UnknownCipher),   # F-14
    (dict(cipher=b"none"), errors.MalformedHeader),                # F-14 flag contradiction
    (dict(uid=bytes(16)), errors.MalformedHeader),                 # F-17
])
def test_f9_to_f17_field_rules(kw, err):
    """F-9 kind, F-10 flags, F-11 sector size, F-12 size, F-13 overflow, F-14 cipher, F-17 uid."""
    with pytest.raises(err) as info:
        decode_copy(build_copy(**kw))
    assert type(info.value) is err


def test_f13_largest_size_is_accepted_and_one_sector_more_is_not():
    """F-13: data_offset + size_bytes <= 2^63 - 1; largest size 2^63 - 2^20 - sector."""
    largest = 2**63 - MiB - 4096
    assert decode_copy(build_copy(size_bytes=largest)).size_bytes == largest
    with pytest.raises(errors.BadGeometry):
        decode_copy(build_copy(size_bytes=largest + 4096))
    assert new_header("disk", largest, 4096, encrypted=False).size_bytes == largest
    with pytest.raises(errors.InvalidSize):
        new_header("disk", largest + 4096, 4096, encrypted=False)


def test_f17_uid_and_f18_lineage_are_random_and_distinct():
    """F-17: new uid per container; F-18: new lineage per DK, kept when given."""
    headers = [enc_header() for _ in range(20)]
    assert len({h.uid for h in headers}) == 20
    assert len({h.lineage_id for h in headers}) == 20
    assert all(len(h.uid) == 16 and len(h.lineage_id) == 16 for h in headers)
    inherited = enc_header(lineage_id=headers[0].lineage_id)
    assert inherited.lineage_id == headers[0].lineage_id and inherited.uid != headers[0].uid
    assert plain_header().lineage_id is None


# --- new_header validation ---------------------------------------------------------

@pytest.mark.parametrize("size", [0, -4096, 4095, 4097, 2**63, True])
def test_new_header_rejects_bad_sizes(size):
    """F-12/F-13 at creation: InvalidSize before anything is written."""
    with pytest.raises(errors.InvalidSize):
        new_header("disk", size, 4096, encrypted=False)


@pytest.mark.parametrize("sector_size", [0, 256, 1024, 2048, 8192, "4096"])
def test_new_header_rejects_bad_sector_sizes(sector_size):
    """F-11 at creation."""
    with pytest.raises(errors.UnsupportedSectorSize):
        new_header("disk", 8192, sector_size, encrypted=False)


def test_new_header_key_field_rules():
    """F-15: no key fields for unencrypted; an encrypted header names its CMK."""
    with pytest.raises(errors.InvalidInput):
        new_header("disk", 8192, 512, encrypted=False, cmk_id="key-1")
    with pytest.raises(errors.InvalidInput):
        new_header("disk", 8192, 512, encrypted=False, lineage_id=os.urandom(16))
    with pytest.raises(errors.InvalidInput):
        new_header("disk", 8192, 512, encrypted=True)
    with pytest.raises(errors.InvalidInput):
        new_header("volume", 8192, 512, encrypted=False)
    h = new_header(Kind.SNAPSHOT, 8192, 512, encrypted=True, cmk_id="key-1")
    assert (h.kind, h.cipher, h.data_offset, h.seq) == (Kind.SNAPSHOT, "aes-xts-plain64",
                                                        DATA_ALIGN, 0)
    assert h.cmk_version is None and h.wrapped_dk is None     # filled in after wrapping
    with pytest.raises(errors.FormatError):
        encode_copy(h)                                         # not writable until then


# --- key context (F-19, F-20) ------------------------------------------------------

def _serialise(ctx: dict[str, str]) -> bytes:
    return json.dumps(ctx, sort_keys=True, separators=(",", ":")).encode()


def test_f20_key_context_is_exactly_the_bound_fields():
    """F-20: the exact mapping of strings."""
    h = enc_header()
    ctx = key_context(h)
    assert ctx == {
        "domain": "blockcrypt-dk-v1", "container_uid": h.uid.hex(),
        "lineage_id": h.lineage_id.hex(), "cipher": "aes-xts-plain64",
        "sector_size": "4096", "size_bytes": str(4 * MiB), "data_offset": str(MiB),
        "cmk_id": "key-0123"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items())
    with pytest.raises(errors.InvalidInput):
        key_context(plain_header())


def test_f20_unbound_fields_do_not_change_the_context():
    """F-20: wrapped_dk, cmk_version, seq and kind are not bound."""
    h = enc_header()
    for change in (dict(wrapped_dk=b"other"), dict(cmk_version=7), dict(seq=99),
                   dict(kind=Kind.SNAPSHOT)):
        assert key_context(h.replace(**change)) == key_context(h)


@pytest.mark.parametrize("change", [
    dict(uid=b"\x42" * 16), dict(lineage_id=b"\x43" * 16), dict(sector_size=512),
    dict(size_bytes=8 * MiB), dict(data_offset=2 * MiB), dict(cmk_id="key-other"),
])
def test_f19_tampering_a_bound_field_makes_unwrap_fail(change):
    """F-19/F-20/§8: an AES-GCM envelope with the context as AAD (as the key store
    does) no longer opens once any bound header field changes."""
    h = enc_header()
    cmk, nonce, dk = AESGCM.generate_key(256), os.urandom(12), os.urandom(64)
    wrapped = AESGCM(cmk).encrypt(nonce, dk, _serialise(key_context(h)))
    assert AESGCM(cmk).decrypt(nonce, wrapped, _serialise(key_context(h))) == dk
    tampered = h.replace(**change)
    with pytest.raises(InvalidTag):
        AESGCM(cmk).decrypt(nonce, wrapped, _serialise(key_context(tampered)))


def test_f19_transplanted_wrapped_dk_fails_in_another_container():
    """F-19: disk A's wrapped DK moved into disk B's header does not unwrap."""
    a, b = enc_header(), enc_header()
    cmk, nonce = AESGCM.generate_key(256), os.urandom(12)
    wrapped = AESGCM(cmk).encrypt(nonce, os.urandom(64), _serialise(key_context(a)))
    with pytest.raises(InvalidTag):
        AESGCM(cmk).decrypt(nonce, wrapped, _serialise(key_context(b.replace(
            wrapped_dk=wrapped))))


# --- creation (F-1, F-2, F-3, F-4, F-28) -------------------------------------------

def test_f1_f2_file_length_and_data_offset(created):
    """F-1: length is data_offset + size_bytes; F-2: data_offset is 1 MiB."""
    path, h = created
    assert h.data_offset == DATA_ALIGN == MiB
    assert path.stat().st_size == h.data_offset + h.size_bytes
    assert read_header(path) == h and h.seq == 0


def test_f3_sparse_one_tib_container_is_instant(tmp_path, monkeypatch):
    """F-3: a 1 TiB container takes no space and no time; the data area is a hole."""
    path = tmp_path / "big.bcd"
    # "no time" without a stopwatch: creating writes the two header copies and
    # nothing else, whatever the size (the length comes from ftruncate).
    writes = []
    real_pwrite = container._pwrite
    def recording_pwrite(fd, data, offset):
        writes.append((offset, len(data)))
        real_pwrite(fd, data, offset)
    monkeypatch.setattr(container, "_pwrite", recording_pwrite)
    h = create_container(path, enc_header(size_bytes=1 << 40))
    st = path.stat()
    assert st.st_size == (1 << 40) + MiB
    assert st.st_blocks * 512 <= 256 * 1024, st.st_blocks
    assert writes == [(offset, COPY_SIZE) for offset in COPY_OFFSETS]
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:       # no data after the header area
            os.lseek(fd, MiB, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    assert read_header(path) == h


def test_f4_reserved_header_area_is_zero_and_ignored(created):
    """F-4: bytes outside the copies are zero when written, and never interpreted."""
    path, h = created
    area = header_area(path)
    assert not any(area[COPY_SIZE:COPY_OFFSETS[1]])
    assert not any(area[COPY_OFFSETS[1] + COPY_SIZE:])
    put(path, 10000, b"junk" * 100)
    put(path, COPY_OFFSETS[1] + COPY_SIZE + 5, b"\xff" * 64)
    before = header_area(path)
    assert read_header(path) == h
    assert header_area(path) == before            # not "repaired" either


def test_f28_mode_0600_under_permissive_umask_fakefs(fakefs):
    """F-28: 0600 whatever the caller's umask (pyfakefs)."""
    old = os.umask(0)
    try:
        create_container("/home/bc/disks/a.bcd", plain_header(size_bytes=64 * 1024))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat("/home/bc/disks/a.bcd").st_mode) == 0o600
    assert os.umask(old) == old                 # umask restored


def test_f28_mode_0600_real_file(tmp_path):
    """F-28 on a real file system."""
    old = os.umask(0o002)
    try:
        h = create_container(tmp_path / "a.bcd", plain_header())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bcd").stat().st_mode) == 0o600
    write_header(tmp_path / "a.bcd", h)
    read_header(tmp_path / "a.bcd")
    assert stat.S_IMODE((tmp_path / "a.bcd").stat().st_mode) == 0o600   # updates keep it


def test_f28_existing_path_is_never_replaced_fakefs(fakefs):
    """F-28: O_EXCL: an existing file is refused and left as it was."""
    Path("/home/bc/disks/a.bcd").write_bytes(b"precious")
    with pytest.raises(errors.AlreadyExists):
        create_container("/home/bc/disks/a.bcd", plain_header(size_bytes=64 * 1024))
    assert Path("/home/bc/disks/a.bcd").read_bytes() == b"precious"


def test_f28_symlink_is_not_followed(tmp_path):
    """F-28: a planted symlink is refused and its target not created."""
    target = tmp_path / "elsewhere"
    (tmp_path / "a.bcd").symlink_to(target)
    with pytest.raises(errors.AlreadyExists):
        create_container(tmp_path / "a.bcd", plain_header())
    assert not target.exists()


def test_f28_missing_directory_is_a_clean_error_fakefs(fakefs):
    """F-28: a missing parent directory gives a BlockcryptError, not an OSError."""
    with pytest.raises(errors.NotFound):
        create_container("/home/bc/nowhere/a.bcd", plain_header(size_bytes=64 * 1024))


def test_f28_failed_creation_removes_the_partial_file(tmp_path, monkeypatch):
    """F-28: on failure (here ENOSPC while writing copy B) the file is removed."""
    real = container._pwrite
    def failing(fd, data, offset):
        if offset == COPY_OFFSETS[1]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)
    monkeypatch.setattr(container, "_pwrite", failing)
    with pytest.raises(errors.NoSpace):
        create_container(tmp_path / "a.bcd", plain_header())
    assert not (tmp_path / "a.bcd").exists()


def test_f28_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    """F-28: fsync of the file after both copies, then of its directory."""
    synced = []
    real_fsync = os.fsync
    def spy(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat.S_ISDIR(st.st_mode) else st.st_size)
        real_fsync(fd)
    monkeypatch.setattr(container.os, "fsync", spy)
    h = create_container(tmp_path / "a.bcd", plain_header())
    assert synced == [h.file_size_bytes, "dir"]


# --- selection and repair (F-1, F-6, F-7, F-8, F-22, F-23, F-24) --------------------

@pytest.mark.parametrize("slot", [0, 1])
def test_f24_damaged_copy_is_repaired_on_disk(created, slot):
    """F-22/F-24: either copy damaged -> the other wins and rewrites it."""
    path, h = created
    good = encode_copy(h)
    flip_on_disk(path, COPY_OFFSETS[slot] + 77)
    assert slots(path)[slot] != good
    assert read_header(path) == h
    assert slots(path) == (good, good)


def test_f24_repair_false_leaves_the_file_alone(created):
    """F-24: repair=False reads the winner without writing."""
    path, h = created
    put(path, COPY_OFFSETS[0], b"\0" * 16)
    before = header_area(path)
    assert read_header(path, repair=False) == h
    assert header_area(path) == before


def test_f24_read_only_file_is_read_without_repair_fakefs(fakefs):
    """F-24: a reader that cannot write returns the winner and does not repair
    (pyfakefs, as an unprivileged user; root could write anyway)."""
    from pyfakefs import helpers
    path = "/home/bc/disks/ro.bcd"
    uid = helpers.get_uid()
    h = create_container(path, plain_header(size_bytes=64 * 1024))
    os.chown(path, 1000, 1000)
    helpers.set_uid(1000)
    try:
        with open(path, "r+b") as f:
            f.write(b"\0" * 8)                      # kill copy A's magic
        os.chmod(path, 0o400)
        assert read_header(path) == h
        assert Path(path).read_bytes()[:8] == b"\0" * 8
    finally:
        helpers.set_uid(uid)
    os.chmod(path, 0o600)
    assert read_header(path) == h                  # writable: repaired
    assert Path(path).read_bytes()[:8] == MAGIC


def test_f22_highest_seq_wins_and_stale_copy_is_repaired(tmp_path):
    """F-22/F-24: swapped copies with different seq: the newer wins wherever it is."""
    for newer_slot in (0, 1):
        path = tmp_path / f"s{newer_slot}.bcd"
        new, old = build_copy(seq=11, cmk_version=4), build_copy(seq=10)
        pair = (new, old) if newer_slot == 0 else (old, new)
        write_container(path, *pair, file_size=MiB + DEFAULTS["size_bytes"])
        assert read_header(path) == header_for(seq=11, cmk_version=4)
        assert slots(path) == (new, new)


def test_f22_equal_seq_copy_a_wins(tmp_path):
    """F-22: on equal seq copy A wins."""
    path = tmp_path / "t.bcd"
    write_container(path, build_copy(seq=3, cmk_version=5), build_copy(seq=3, cmk_version=6),
                    file_size=MiB + DEFAULTS["size_bytes"])
    assert read_header(path).cmk_version == 5


@pytest.mark.parametrize("a, b, err", [
    (flip(build_copy(), 0), flip(build_copy(), 1), errors.BadMagic),             # F-6
    (flip(build_copy(), 99), flip(build_copy(), 999), errors.ChecksumMismatch),  # F-7
    (build_copy(version=2), build_copy(version=2), errors.UnknownVersion),      # F-8
    (build_copy(sector_size=1024), flip(build_copy(), 99), errors.UnsupportedSectorSize),
    (build_copy(cipher=b"rot13"), build_copy(cipher=b"rot13"), errors.UnknownCipher),
    (build_copy(data_offset=4096), build_copy(data_offset=4096), errors.BadGeometry),  # F-2
])
def test_f22_refusals_choose_the_specific_error(tmp_path, a, b, err):
    """F-22/§7: no valid copy -> the specific error; the file is not written."""
    path = tmp_path / "r.bcd"
    write_container(path, a, b, file_size=MiB + DEFAULTS["size_bytes"])
    before = path.read_bytes()
    with pytest.raises(errors.FormatError) as info:
        read_header(path)
    assert type(info.value) is err and info.value.exit_code == err.exit_code
    assert path.read_bytes() == before


def test_f8_newer_version_in_one_copy_refuses_and_is_not_repaired(created):
    """F-8: a valid-checksum copy of version 2 refuses the container even though
    the other copy is valid, and nothing is overwritten (no silent downgrade)."""
    path, h = created
    put(path, COPY_OFFSETS[1], build_copy(version=2, seq=50))
    before = header_area(path)
    with pytest.raises(errors.UnknownVersion) as info:
        read_header(path)
    assert "version 2" in str(info.value)
    assert header_area(path) == before
    with pytest.raises(errors.UnknownVersion):
        write_header(path, h)
    assert header_area(path) == before


def test_f1_f23_truncated_file_is_refused_without_fallback(created):
    """F-1/F-23: a file shorter than data_offset + size_bytes is refused."""
    path, h = created
    os.truncate(path, h.file_size_bytes - 4096)
    with pytest.raises(errors.Truncated) as info:
        read_header(path)
    assert str(h.file_size_bytes) in str(info.value)


def test_f1_bytes_past_the_data_area_are_ignored(created):
    """F-1: a longer file (e.g. a grow interrupted after the extend) is valid."""
    path, h = created
    os.truncate(path, h.file_size_bytes + 3 * MiB)
    assert read_header(path) == h


@pytest.mark.parametrize("content, err", [
    (b"", errors.Truncated), (b"BLK", errors.Truncated), (b"not a container", errors.BadMagic),
    (bytes(3 * MiB), errors.BadMagic),
])
def test_f22_small_and_foreign_files(tmp_path, content, err):
    """F-22: empty / magic-prefix files are truncated containers; others bad magic."""
    path = tmp_path / "x.bcd"
    path.write_bytes(content)
    with pytest.raises(errors.FormatError) as info:
        read_header(path)
    assert type(info.value) is err


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(errors.NotFound):
        read_header(tmp_path / "nope.bcd")


# --- updates and crash safety (F-25, F-26, F-27) ----------------------------------

def test_f25_write_header_increments_seq_and_stores_both_copies(created):
    """F-25: seq = winner + 1, identical bytes in both slots."""
    path, h = created
    for expected_seq in (1, 2, 3):
        stored = write_header(path, h.replace(kind=Kind.SNAPSHOT, seq=1234))
        assert stored.seq == expected_seq and stored.kind == Kind.SNAPSHOT
        assert read_header(path) == stored
        assert slots(path) == (encode_copy(stored),) * 2


def test_f25_non_winning_slot_is_written_first(created, monkeypatch):
    """F-25: write + fsync the slot that did not win, then the winner's slot."""
    path, h = created
    steps = []
    monkeypatch.setattr(container, "_fault_hook", steps.append)
    write_header(path, h)                       # tie -> A wins -> B first
    assert steps == ["write:B", "fsync:B", "write:A", "fsync:A"]
    steps.clear()
    put(path, COPY_OFFSETS[0], build_copy(seq=0))   # A now stale (older seq): B wins
    write_header(path, h)
    assert steps == ["write:A", "fsync:A", "write:B", "fsync:B"]


def test_f25_seq_never_wraps(tmp_path):
    """F-25: at seq 2^64 - 1 the update is refused, the header unchanged."""
    path = tmp_path / "m.bcd"
    raw = build_copy(seq=2**64 - 1)
    write_container(path, raw, raw, file_size=MiB + DEFAULTS["size_bytes"])
    with pytest.raises(errors.BadGeometry):
        write_header(path, header_for())
    assert slots(path) == (raw, raw)


def test_f25_update_must_fit_the_file(created):
    """F-25/F-1: a header whose data area would not fit is refused (grow first)."""
    path, h = created
    before = header_area(path)
    with pytest.raises(errors.BadGeometry):
        write_header(path, h.replace(size_bytes=h.size_bytes * 2))
    with pytest.raises(errors.UnknownCipher):
        write_header(path, h.replace(cipher="aes-cbc"))
    assert header_area(path) == before


class Crash(Exception):
    pass


def _states_of_one_update(path: Path, old: Header, new_header_: Header):
    """Every on-disk state an update can leave: a crash before each step, and each
    slot write torn at many byte offsets (old bytes after the cut)."""
    base = path.read_bytes()
    steps: list[str] = []
    container._fault_hook = steps.append          # the real order of this update
    try:
        write_header(path, new_header_)
    finally:
        container._fault_hook = None
    new_raw = encode_copy(new_header_.replace(seq=old.seq + 1))
    for crash_at in steps:
        def hook(step, crash_at=crash_at):
            if step == crash_at:
                raise Crash(step)
        path.write_bytes(base)
        container._fault_hook = hook
        try:
            with pytest.raises(Crash):
                write_header(path, new_header_)
        finally:
            container._fault_hook = None
        yield f"crash-before-{crash_at}", path.read_bytes()
    written = [s.split(":")[1] for s in steps if s.startswith("write:")]
    for i, slot_name in enumerate(written):
        for cut in (0, 1, 8, 100, 511, 512, 2048, 4063, 4064, 4095):
            state = bytearray(base)
            for done in written[:i]:
                off = COPY_OFFSETS["AB".index(done)]
                state[off:off + COPY_SIZE] = new_raw
            off = COPY_OFFSETS["AB".index(slot_name)]
            state[off:off + cut] = new_raw[:cut]
            yield f"torn-{slot_name}-at-{cut}", bytes(state)


@pytest.mark.parametrize("damaged_before", [None, 0, 1])
def test_f26_crash_at_every_step_leaves_a_valid_copy(tmp_path, damaged_before):
    """F-26: after a crash between any two writes, or a torn write, the container
    reads as the old or the new header, never neither; a later read repairs it.
    Also from starting states where one copy was already damaged."""
    path = tmp_path / "c.bcd"
    old = create_container(path, enc_header(size_bytes=64 * 1024))
    if damaged_before is not None:
        flip_on_disk(path, COPY_OFFSETS[damaged_before] + 300)
    new = old.replace(cmk_version=9, wrapped_dk=b"rewrapped")
    allowed = {old.replace(seq=0), new.replace(seq=1)}
    seen = set()
    for name, state in _states_of_one_update(path, old, new):
        path.write_bytes(state)
        got = read_header(path, repair=False)
        assert got in allowed, name
        seen.add(got.seq)
        assert read_header(path) == got, name            # repair keeps the winner
        assert slots(path)[0] == slots(path)[1], name
    assert seen == {0, 1}


def test_f26_completed_update_survives(created):
    """F-26: after the last fsync the new header is in both copies."""
    path, h = created
    stored = write_header(path, h.replace(cmk_version=8))
    assert slots(path) == (encode_copy(stored),) * 2


def test_f25_atomic_header_replace_fakefs(fakefs):
    """F-25/F-26 on pyfakefs: an interrupted update keeps the old header readable,
    the next update completes."""
    path = "/home/bc/disks/u.bcd"
    h = create_container(path, enc_header(size_bytes=64 * 1024))
    def crash(step):
        if step == "write:A":
            raise Crash(step)
    container._fault_hook = crash
    try:
        with pytest.raises(Crash):
            write_header(path, h.replace(cmk_version=5))
    finally:
        container._fault_hook = None
    assert read_header(path) == h.replace(cmk_version=5, seq=1)   # B was complete
    assert write_header(path, h.replace(cmk_version=6)).seq == 2
    assert read_header(path).cmk_version == 6


def _ofd_lock(fd: int, exclusive: bool, start: int = 0, length: int = DATA_ALIGN) -> None:
    lock = struct.pack("@hhqqi4x", fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, 0,
                       start, length, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)


def _blocked_on(path: Path) -> bool:
    """Whether some lock request on path's inode is waiting (a "->" line in /proc/locks)."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return any(" -> " in line and line.split()[6].endswith(f":{ino}")
                   for line in f if len(line.split()) > 6)


@pytest.mark.parametrize("op", ["read", "write"])
def test_f27_header_access_waits_for_an_update_in_flight(created, op):
    """F-25/F-27: readers and writers wait while another open file description
    holds the exclusive header lock, and proceed once it is released."""
    path, h = created
    fd = os.open(path, os.O_RDWR)
    _ofd_lock(fd, exclusive=True)
    result = []
    call = (lambda: read_header(path)) if op == "read" else (lambda: write_header(path, h))
    t = threading.Thread(target=lambda: result.append(call()))
    try:
        t.start()
        # the kernel lists the call as a waiter on our lock (/proc/locks "->")
        wait_for(lambda: _blocked_on(path), timeout_s=30,
                 what="header access to wait for the header lock")
        assert not result, "header access did not wait for the header lock"
    finally:
        os.close(fd)                               # releases the OFD lock
    t.join(30)
    assert len(result) == 1 and result[0].uid == h.uid


def test_f27_readers_hold_a_shared_header_lock(created, monkeypatch):
    """F-27: while read_header reads the copies, an exclusive lock is refused
    (checked from inside the read) and a shared one is not."""
    path, h = created
    probes = []
    real_pread = container._pread
    def probing_pread(fd, length, offset):
        other = os.open(path, os.O_RDWR)
        try:
            _ofd_lock(other, exclusive=False)        # shared + shared: fine
            with pytest.raises(BlockingIOError):
                _ofd_lock(other, exclusive=True)
            probes.append(offset)
        finally:
            os.close(other)
        return real_pread(fd, length, offset)
    monkeypatch.setattr(container, "_pread", probing_pread)
    assert read_header(path, repair=False) == h
    assert probes == list(COPY_OFFSETS)


def test_f27_a_serving_flock_does_not_block_header_reads(created):
    """F-27: the whole-file flock a server holds (backend.py) is independent of
    the header lock: the header of a served disk reads and updates at once."""
    path, h = created
    server_fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(server_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = []
        t = threading.Thread(target=lambda: result.append(read_header(path)))
        t.start()
        t.join(5)
        assert result == [h]
    finally:
        os.close(server_fd)


# --- growth (F-29) -----------------------------------------------------------------

def test_f29_grow_extends_sparse_then_updates_header(created):
    """F-29: larger file, new size and wrapped DK, old data area untouched."""
    path, h = created
    put(path, h.data_offset + 4096, b"ciphertext" * 10)
    grown = grow_container(path, h.size_bytes + (1 << 30), wrapped_dk=b"rewrapped-dk")
    assert grown.size_bytes == h.size_bytes + (1 << 30) and grown.seq == 1
    assert grown.wrapped_dk == b"rewrapped-dk" and grown.uid == h.uid
    assert path.stat().st_size == grown.file_size_bytes
    assert path.stat().st_blocks * 512 < 1 * MiB
    assert read_header(path) == grown
    with open(path, "rb") as f:
        f.seek(h.data_offset + 4096)
        assert f.read(100) == b"ciphertext" * 10


def test_f29_grow_refusals(created, tmp_path):
    """F-29: never shrink; sector multiple; encrypted needs the re-wrapped DK."""
    path, h = created
    with pytest.raises(errors.InvalidSize):
        grow_container(path, h.size_bytes - 4096, wrapped_dk=b"x")
    with pytest.raises(errors.InvalidSize):
        grow_container(path, h.size_bytes + 512, wrapped_dk=b"x")
    with pytest.raises(errors.InvalidInput):
        grow_container(path, h.size_bytes * 2)
    plain = tmp_path / "p.bcd"
    ph = create_container(plain, plain_header())
    with pytest.raises(errors.InvalidInput):
        grow_container(plain, ph.size_bytes * 2, wrapped_dk=b"x")
    assert grow_container(plain, ph.size_bytes * 2).size_bytes == ph.size_bytes * 2


def test_f29_crash_between_extend_and_header_keeps_old_header(created, monkeypatch):
    """F-29/F-1: interrupted growth leaves a longer file with the old, valid header."""
    path, h = created
    def crash(step):
        raise Crash(step)
    monkeypatch.setattr(container, "_fault_hook", crash)
    with pytest.raises(Crash):
        grow_container(path, h.size_bytes * 4, wrapped_dk=b"new")
    monkeypatch.setattr(container, "_fault_hook", None)
    assert path.stat().st_size == h.data_offset + h.size_bytes * 4
    assert read_header(path) == h


# --- dm-crypt interoperability (§6) ------------------------------------------------

@pytest.mark.parametrize("sector_size", [512, 4096])
def test_cryptsetup_command_matches_the_spec_and_parses(tmp_path, sector_size):
    """§6/F-31: offset in 512-byte units, skip 0 (IV starts at the data area),
    no --iv-large-sectors; cryptsetup accepts the arguments (--test-args)."""
    h = enc_header(sector_size=sector_size)
    argv = cryptsetup_argv(h, tmp_path / "d.bcd", "/run/DK.bin", "bcrecover")
    opts = dict(zip(argv[2:-2:2], argv[3:-2:2]))
    assert argv[:2] == ["cryptsetup", "open"] and argv[-2:] == [str(tmp_path / "d.bcd"),
                                                                 "bcrecover"]
    assert opts["--offset"] == str(h.data_offset // 512) == "2048"
    assert opts["--skip"] == "0" and opts["--sector-size"] == str(sector_size)
    assert opts["--cipher"] == "aes-xts-plain64" and opts["--key-size"] == "512"
    assert "--iv-large-sectors" not in argv
    spec = (REPO / "docs" / "FORMAT.md").read_text()
    for flag in ("--type plain", "--cipher aes-xts-plain64", "--key-size 512", "--skip 0",
                 "--keyfile-size 64", "--readonly"):
        assert flag in spec
    require_tools("cryptsetup")
    (tmp_path / "d.bcd").write_bytes(b"")
    cp = subprocess.run(argv[:1] + ["--test-args"] + argv[1:], capture_output=True,
                        text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr


# --- the spec and the tests stay in step -------------------------------------------

# Data-area rules (FORMAT.md §5) belong to the cipher and backend tests.
DATA_AREA_RULES = {f"F-{n}" for n in range(30, 35)}


def test_every_container_rule_is_cited_by_a_test():
    """Each MUST rule of FORMAT.md §2-§4 and §10 is cited by a container test."""
    spec = (REPO / "docs" / "FORMAT.md").read_text()
    rules = set(re.findall(r"\*\*(F-\d+)\*\*", spec))
    assert DATA_AREA_RULES < rules and len(rules) >= 30
    cited = set()
    # the RBD rules (FORMAT.md §10) are tested against the session's Ceph cluster
    for path in [Path(__file__).parent / "test_container.py",
                 Path(__file__).parent / "test_header_corpus.py",
                 REPO / "tests" / "e2e" / "test_rbd.py"]:
        text = path.read_text()
        cited |= set(re.findall(r"F-\d+", text))
        for lo, hi in re.findall(r"F-(\d+)\.\.F-(\d+)", text):
            cited |= {f"F-{i}" for i in range(int(lo), int(hi) + 1)}
    missing = sorted(rules - DATA_AREA_RULES - cited, key=lambda r: int(r[2:]))
    assert not missing, f"rules without a test: {missing}"


# --- header backup files (F-35, F-36, F-37) ----------------------------------------

def test_f35_backup_is_one_header_copy_and_round_trips(tmp_path, created):
    """F-35: magic, version, padding, then the copy exactly as the container stores it."""
    from blockcrypt.storage import header_backup
    path, h = created
    backup = tmp_path / "hdr.bak"
    header_backup.write(backup, read_header(path))
    raw = backup.read_bytes()
    assert len(raw) == header_backup.SIZE == 16 + COPY_SIZE
    assert raw[:8] == b"BCHDRBAK" and raw[8:10] == b"\x01\x00" and raw[10:16] == bytes(6)
    assert raw[16:] == slots(path)[0]          # the public fields and the wrapped DK only
    assert header_backup.read(backup) == read_header(path)


@pytest.mark.parametrize("damage", ["short", "long", "magic", "version", "padding", "copy"])
def test_f35_a_bad_backup_is_refused(tmp_path, created, damage):
    from blockcrypt.storage import header_backup
    path, h = created
    raw = bytearray(header_backup.encode(read_header(path)))
    if damage == "short":
        raw = raw[:-1]
    elif damage == "long":
        raw += b"\0"
    elif damage == "magic":
        raw[0] ^= 1
    elif damage == "version":
        raw[8] = 2
    elif damage == "padding":
        raw[12] = 1
    else:
        raw[16 + 300] ^= 1
    backup = tmp_path / "bad.bak"
    backup.write_bytes(bytes(raw))
    with pytest.raises(errors.InvalidHeaderBackup) as e:
        header_backup.read(backup)
    assert str(backup) in e.value.message


def test_f36_backup_file_is_private_exclusive_and_never_follows_a_symlink(tmp_path, created):
    from blockcrypt.storage import header_backup
    path, h = created
    backup = tmp_path / "hdr.bak"
    header_backup.write(backup, h)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    with pytest.raises(errors.AlreadyExists):
        header_backup.write(backup, h)
    link = tmp_path / "link.bak"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(errors.AlreadyExists):
        header_backup.write(link, h)
    assert not (tmp_path / "target").exists()


def test_f37_restore_repairs_a_container_whose_copies_are_both_damaged(created):
    path, h = created
    saved = read_header(path)
    for off in COPY_OFFSETS:
        put(path, off + 300, b"\x55\xaa")
    with pytest.raises(errors.ChecksumMismatch):
        read_header(path)
    stored = container.restore_header(path, saved)
    assert read_header(path) == stored == saved.replace(seq=saved.seq + 1)
    assert slots(path) == (encode_copy(stored),) * 2


def test_f37_restored_header_wins_over_newer_valid_copies(created):
    path, h = created
    saved = read_header(path)
    for _ in range(3):
        write_header(path, h.replace(cmk_version=7))
    stored = container.restore_header(path, saved)
    assert stored.seq == 4 and read_header(path) == stored and stored.cmk_version == 2


def test_f37_restore_refuses_an_unknown_version(tmp_path):
    path = tmp_path / "v2.bcd"
    raw = build_copy(version=2)
    write_container(path, raw, raw, file_size=MiB + DEFAULTS["size_bytes"])
    with pytest.raises(errors.UnknownVersion):
        container.restore_header(path, header_for())
    assert slots(path) == (raw, raw)


def test_f37_restore_is_crash_safe(created):
    """F-37 with F-26: a crash before any step leaves the old or the restored header."""
    path, h = created
    saved = read_header(path)
    for off in COPY_OFFSETS:
        put(path, off + 300, b"\x55")
    base = path.read_bytes()
    steps: list[str] = []
    container._fault_hook = steps.append
    try:
        container.restore_header(path, saved)
    finally:
        container._fault_hook = None
    assert steps == ["write:B", "fsync:B", "write:A", "fsync:A"]
    for crash_at in steps:
        path.write_bytes(base)

        def hook(step, crash_at=crash_at):
            if step == crash_at:
                raise Crash(step)
        container._fault_hook = hook
        try:
            with pytest.raises(Crash):
                container.restore_header(path, saved)
        finally:
            container._fault_hook = None
        if crash_at == "write:B":
            with pytest.raises(errors.ChecksumMismatch):
                read_header(path)                 # the old (damaged) state, untouched
        else:
            assert read_header(path) == saved.replace(seq=saved.seq + 1)


@pytest.mark.parametrize("step", ["write:B", "fsync:B", "write:A", "fsync:A"])
def test_f29_grow_interrupted_at_each_step_leaves_old_or_new_size(created, step):
    """F-29/F-26: a grow stopped before any header write step leaves a valid header of
    the old or the new size, never a mix; the next grow completes it."""
    path, h = created
    target = h.size_bytes + 64 * MiB

    def crash(name):
        if name == step:
            raise Crash(name)
    container._fault_hook = crash
    try:
        with pytest.raises(Crash):
            grow_container(path, target, wrapped_dk=b"rewrapped-dk")
    finally:
        container._fault_hook = None
    assert path.stat().st_size == h.data_offset + target       # extended before the header
    got = read_header(path)
    if step == "write:B":                   # nothing written: the old header, whole
        assert got == h
    else:                                   # B, the non-winning slot, holds the new one
        assert got.size_bytes == target and got.wrapped_dk == b"rewrapped-dk"
        assert got.seq == h.seq + 1
    done = grow_container(path, target, wrapped_dk=b"rewrapped-dk")
    assert slots(path) == (encode_copy(done),) * 2 and done.size_bytes == target
