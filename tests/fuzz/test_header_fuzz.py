"""Property-based fuzzing of the header parser (issue 8 item 2; FORMAT.md §7).

Only the documented exceptions (FormatError subclasses) may escape the parser,
whatever the input: random bytes, random bytes behind a valid magic and
checksum, and mutations (byte flips, extreme integers in the fields) of valid
copies, with and without a recomputed checksum.  Accepted copies must be
canonical (re-encoding gives the same bytes), and read_header on files built
from mutated copies must either refuse with a FormatError or return the
highest-seq valid copy and repair the other.

The example count comes from BLOCKCRYPT_FUZZ_EXAMPLES (default 300, for CI;
`make fuzz` runs 20000).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockcrypt import errors
from blockcrypt.storage.container import (
    BODY_SIZE,
    COPY_OFFSETS,
    COPY_SIZE,
    DATA_ALIGN,
    MAGIC,
    Header,
    Kind,
    decode_copy,
    encode_copy,
    read_header,
)

from support.headers import slots, write_container

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("BLOCKCRYPT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Offsets and widths of the fixed integer fields (FORMAT.md §3.2), plus the
# first bytes of the key section of a copy with the 15-byte cipher name.
FIELDS = [(8, 2), (10, 1), (11, 1), (12, 4), (16, 8), (40, 8), (48, 8), (56, 1),
          (72, 16), (88, 4), (92, 1), (93, 2)]
EXTREMES = [0, 1, 2, 255, 256, 511, 512, 4096, 2**16 - 1, 2**20, 2**31, 2**32 - 1,
            2**63 - 2**20, 2**63 - 1, 2**63, 2**64 - 2**20, 2**64 - 1]


def with_checksum(body: bytes) -> bytes:
    body = body[:BODY_SIZE].ljust(BODY_SIZE, b"\0")
    return body + hashlib.sha256(body).digest()


@st.composite
def headers(draw) -> Header:
    """Any valid header (the whole space the format allows, at its limits too)."""
    sector_size = draw(st.sampled_from([512, 4096]))
    data_offset = DATA_ALIGN * draw(st.integers(1, 2**20))
    max_sectors = (2**63 - 1 - data_offset) // sector_size
    size_bytes = sector_size * draw(st.one_of(st.integers(1, 2**20),
                                              st.integers(1, max_sectors)))
    uid = draw(st.binary(min_size=16, max_size=16).filter(any))
    common = dict(kind=draw(st.sampled_from(list(Kind))), uid=uid, size_bytes=size_bytes,
                  sector_size=sector_size, data_offset=data_offset,
                  seq=draw(st.integers(0, 2**64 - 1)))
    if not draw(st.booleans()):
        return Header(encrypted=False, cipher="none", cmk_id=None, cmk_version=None,
                      lineage_id=None, wrapped_dk=None, **common)
    cmk_id = draw(st.text(min_size=1, max_size=60).filter(
        lambda s: s.isprintable() and len(s.encode()) <= 255))
    return Header(encrypted=True, cipher="aes-xts-plain64", cmk_id=cmk_id,
                  cmk_version=draw(st.integers(1, 2**32 - 1)),
                  lineage_id=draw(st.binary(min_size=16, max_size=16).filter(any)),
                  wrapped_dk=draw(st.binary(min_size=1, max_size=1024)), **common)


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    """raw with random byte edits and extreme field values; checksum fixed or not."""
    b = bytearray(raw)
    for _ in range(draw(st.integers(0, 4))):
        off, width = draw(st.sampled_from(FIELDS))
        value = draw(st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1)))
        b[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    for _ in range(draw(st.integers(0, 6))):
        off = draw(st.one_of(st.integers(8, 400), st.integers(0, COPY_SIZE - 1)))
        b[off] = draw(st.integers(0, 255))
    if draw(st.sampled_from([False] * 9 + [True])):
        b = b[:draw(st.integers(0, COPY_SIZE))]
    if len(b) == COPY_SIZE and draw(st.sampled_from([True, True, True, False])):
        b = bytearray(with_checksum(bytes(b[:BODY_SIZE])))
    return bytes(b)


def parse(raw: bytes) -> Header | None:
    """decode_copy; None when refused with a documented error (anything else escapes)."""
    try:
        return decode_copy(raw, path="fuzz")
    except errors.FormatError as exc:
        assert exc.exit_code in range(60, 70)
        assert str(exc).startswith("fuzz")
        return None


@FUZZ
@given(st.binary(min_size=0, max_size=COPY_SIZE + 100))
def test_random_bytes(raw):
    assert parse(raw) is None or len(raw) == COPY_SIZE


@FUZZ
@given(st.binary(min_size=0, max_size=BODY_SIZE - 10), st.booleans())
def test_random_body_behind_valid_magic_version_and_checksum(tail, version_one):
    header = parse(with_checksum(MAGIC + (b"\x01\x00" if version_one else b"") + tail))
    if header is not None:
        assert encode_copy(header) == with_checksum(MAGIC + b"\x01\x00" + tail)


@FUZZ
@given(headers())
def test_valid_headers_round_trip(header):
    raw = encode_copy(header)
    assert len(raw) == COPY_SIZE and decode_copy(raw) == header


@FUZZ
@given(st.data())
def test_mutations_of_a_valid_copy(data):
    raw = encode_copy(data.draw(headers()))
    bad = data.draw(mutated(raw))
    header = parse(bad)
    if header is not None:                      # accepted copies are canonical
        assert encode_copy(header) == bad


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(data=st.data())
def test_read_header_on_files_of_mutated_copies(scratch, data):
    base = data.draw(headers())
    small = base.replace(size_bytes=base.sector_size * data.draw(st.integers(1, 64)),
                         data_offset=DATA_ALIGN * data.draw(st.integers(1, 2)))
    copies = []
    for _ in COPY_OFFSETS:
        h = small.replace(seq=data.draw(st.integers(0, 2**64 - 1)))
        raw = encode_copy(h)
        copies.append(data.draw(st.one_of(st.just(raw), mutated(raw))))
    end = small.data_offset + small.size_bytes
    file_size = data.draw(st.sampled_from([end, end + 4096, end - 1, DATA_ALIGN,
                                           COPY_OFFSETS[1] + 10, 5000, 3, 0]))
    path = scratch / "f.bcd"
    path.unlink(missing_ok=True)
    write_container(path, copies[0], copies[1], file_size)
    before = path.read_bytes()
    try:
        got = read_header(path)
    except errors.FormatError:
        assert path.read_bytes() == before          # refused: never written
        return
    valid = [h for h in (parse(c) for c in copies) if h is not None]
    assert got in valid and got.seq == max(h.seq for h in valid)
    a, b = slots(path)
    assert a == b == encode_copy(got)
    assert path.stat().st_size == file_size >= got.data_offset + got.size_bytes
