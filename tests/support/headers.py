"""Header copies built byte by byte from docs/FORMAT.md's tables (§3.2), not
with the code under test: the corpus, the container tests and the fuzzer use them."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from blockcrypt.storage.container import Header, Kind

# --- a header copy from the spec's byte tables (FORMAT.md §3.2) ------------------

COPY_A_OFFSET = 0
COPY_B_OFFSET = 512 * 1024
COPY_SIZE = 4096
BODY_SIZE = 4064
MiB = 1 << 20
UID = bytes(range(1, 17))
LINEAGE = bytes(range(101, 117))
WRAPPED = bytes((i * 7 + 3) % 256 for i in range(120))
SIZE = 64 * 1024
DATA_END = MiB + SIZE          # file length of the default container

DEFAULTS = dict(magic=b"BLKCRYPT", version=1, kind=1, flags=1, sector_size=4096, seq=1,
                uid=UID, size_bytes=SIZE, data_offset=MiB, cipher=b"aes-xts-plain64",
                cipher_len=None, key=None, lineage=LINEAGE, cmk_version=3,
                cmk_id=b"key-0123", cmk_id_len=None, wrapped=WRAPPED, wrapped_len=None,
                padding=b"", fix_checksum=True)
PLAIN = dict(flags=0, cipher=b"none")   # an unencrypted container


def build_copy(**kw) -> bytes:
    """4096 bytes of one copy; any field may be set to any in-range raw value.

    key: write the key section (default: when flags bit 0 is set).  *_len: a
    length byte that disagrees with the data.  padding: bytes right after the
    last field.  fix_checksum=False stores a zero checksum.
    """
    p = {**DEFAULTS, **kw}
    key = bool(p["flags"] & 1) if p["key"] is None else p["key"]
    cipher_len = len(p["cipher"]) if p["cipher_len"] is None else p["cipher_len"]
    body = struct.pack("<8sHBBIQ16sQQB", p["magic"], p["version"], p["kind"], p["flags"],
                       p["sector_size"], p["seq"], p["uid"], p["size_bytes"],
                       p["data_offset"], cipher_len) + p["cipher"]
    if key:
        cmk_len = len(p["cmk_id"]) if p["cmk_id_len"] is None else p["cmk_id_len"]
        w_len = len(p["wrapped"]) if p["wrapped_len"] is None else p["wrapped_len"]
        body += (p["lineage"] + struct.pack("<IB", p["cmk_version"], cmk_len) + p["cmk_id"]
                 + struct.pack("<H", w_len) + p["wrapped"])
    body = (body + p["padding"])[:BODY_SIZE].ljust(BODY_SIZE, b"\0")
    checksum = hashlib.sha256(body).digest() if p["fix_checksum"] else bytes(32)
    return body + checksum


def header_for(**kw) -> Header:
    """The Header a valid build_copy(**kw) must parse to."""
    p = {**DEFAULTS, **kw}
    enc = bool(p["flags"] & 1)
    return Header(kind=Kind.DISK if p["kind"] == 1 else Kind.SNAPSHOT, uid=p["uid"],
                  size_bytes=p["size_bytes"], sector_size=p["sector_size"], encrypted=enc,
                  cipher=p["cipher"].decode(), data_offset=p["data_offset"],
                  cmk_id=p["cmk_id"].decode() if enc else None,
                  cmk_version=p["cmk_version"] if enc else None,
                  lineage_id=p["lineage"] if enc else None,
                  wrapped_dk=p["wrapped"] if enc else None, seq=p["seq"])


def flip(raw: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(raw)
    b[offset] ^= mask
    return bytes(b)


def write_container(path: Path, a: bytes | None, b: bytes | None, file_size: int) -> None:
    """A sparse file of file_size bytes with the given bytes at the copy slots."""
    with open(path, "wb") as f:
        f.truncate(max(file_size, COPY_B_OFFSET + COPY_SIZE))
        if a is not None:
            f.seek(COPY_A_OFFSET)
            f.write(a)
        if b is not None:
            f.seek(COPY_B_OFFSET)
            f.write(b)
        f.truncate(file_size)


def slots(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    return (data[COPY_A_OFFSET:COPY_A_OFFSET + COPY_SIZE],
            data[COPY_B_OFFSET:COPY_B_OFFSET + COPY_SIZE])
