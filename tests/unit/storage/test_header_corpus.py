"""Crafted-header corpus (issue 8 item 1; docs/FORMAT.md §3, §4, §7).

Every case is a container file built byte by byte from the spec's tables (not
with the code under test) and carries a declared expectation: either the
header that must win (and both copies must hold its bytes afterwards: the
damaged or stale copy was repaired on disk), or the exact FormatError subclass
that must refuse the file (and the file must be left untouched).  Any other
outcome, including any other exception, fails the case.

The builders (``build_copy``, ``header_for``) live in tests/support/headers.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from blockcrypt import errors
from blockcrypt.storage.container import read_header

from support.headers import (
    COPY_B_OFFSET,
    COPY_SIZE,
    DATA_END,
    PLAIN,
    SIZE,
    MiB,
    build_copy,
    flip,
    header_for,
    slots,
    write_container,
)

# --- the corpus -------------------------------------------------------------------

@dataclass
class Case:
    name: str
    a: bytes | None
    b: bytes | None
    expect: type[errors.FormatError] | dict    # error class, or build params of the winner
    file_size: int = DATA_END
    rules: str = ""


GOOD = dict(seq=7)
GOOD_RAW = build_copy(**GOOD)

# Ways to make a single copy invalid (the other copy then wins and repairs it).
_single: list[tuple[str, Callable[[], bytes]]] = [
    ("magic-byte0", lambda: flip(GOOD_RAW, 0)),
    ("magic-byte7", lambda: flip(GOOD_RAW, 7)),
    ("checksum-first-byte", lambda: flip(GOOD_RAW, 4064)),
    ("checksum-last-byte", lambda: flip(GOOD_RAW, 4095)),
    ("zeroed-copy", lambda: bytes(COPY_SIZE)),
    ("garbage-copy", lambda: bytes((i * 131 + 17) % 256 for i in range(COPY_SIZE))),
    ("half-written-copy", lambda: GOOD_RAW[:2048] + bytes(2048)),
    ("torn-at-512", lambda: build_copy(seq=8, size_bytes=2 * SIZE)[:512] + GOOD_RAW[512:]),
    ("valid-checksum-sector-1000", lambda: build_copy(seq=9, sector_size=1000)),
    ("valid-checksum-size-0", lambda: build_copy(seq=9, size_bytes=0)),
    ("valid-checksum-offset-4096", lambda: build_copy(seq=9, data_offset=4096)),
    ("valid-checksum-cipher-cbc", lambda: build_copy(seq=9, cipher=b"aes-cbc-essiv")),
    ("valid-checksum-kind-9", lambda: build_copy(seq=9, kind=9)),
    ("valid-checksum-flags-0x80", lambda: build_copy(seq=9, flags=0x81)),
    ("valid-checksum-cmk-id-len-0", lambda: build_copy(seq=9, cmk_id=b"", cmk_id_len=0)),
    ("valid-checksum-padding", lambda: build_copy(seq=9, padding=b"\0\x01")),
] + [
    # a bit flip in each field, checksum not recomputed
    (f"flip-at-{off}", (lambda off=off: flip(GOOD_RAW, off)))
    for off in (8, 10, 11, 12, 16, 24, 40, 48, 56, 57, 72, 80, 90, 100, 200, 3000, 4063)
]

CASES: list[Case] = []
for _name, _bad in _single:
    CASES.append(Case(f"A-{_name}-B-good", _bad(), GOOD_RAW, GOOD, rules="F-22 F-24"))
    CASES.append(Case(f"A-good-B-{_name}", GOOD_RAW, _bad(), GOOD, rules="F-22 F-24"))

# Both copies invalid in the same way, checksum valid: the specific error.
_both: list[tuple[str, dict, type[errors.FormatError]]] = []
for _ss in (0, 1, 511, 1024, 2048, 8192, 65536, 2**32 - 1):
    _both.append((f"sector-size-{_ss}", dict(sector_size=_ss), errors.UnsupportedSectorSize))
for _sz in (0, 512, 4097, 2**64 - 4096):
    _both.append((f"size-{_sz}", dict(size_bytes=_sz), errors.BadGeometry))
for _off in (0, 4096, 512 * 1024, MiB + 4096, MiB + 512, 2**64 - MiB):
    _both.append((f"data-offset-{_off}", dict(data_offset=_off), errors.BadGeometry))
_both += [
    ("overflow-sum-2^63", dict(size_bytes=2**63 - MiB), errors.BadGeometry),
    ("overflow-offset-2^63", dict(data_offset=2**63, size_bytes=4096), errors.BadGeometry),
    ("overflow-both-max", dict(data_offset=2**64 - MiB, size_bytes=2**64 - 4096),
     errors.BadGeometry),
    ("cipher-essiv", dict(cipher=b"aes-cbc-essiv:sha256"), errors.UnknownCipher),
    ("cipher-uppercase", dict(cipher=b"AES-XTS-PLAIN64"), errors.UnknownCipher),
    ("cipher-prefix", dict(cipher=b"aes-xts-plain"), errors.UnknownCipher),
    ("cipher-non-ascii", dict(cipher=b"aes-\xff\xfe"), errors.UnknownCipher),
    ("cipher-len-0", dict(cipher=b"", cipher_len=0), errors.MalformedHeader),
    ("cipher-len-33", dict(cipher=b"x" * 33), errors.MalformedHeader),
    ("cipher-none-but-encrypted", dict(cipher=b"none"), errors.MalformedHeader),
    ("cipher-xts-but-unencrypted", dict(flags=0), errors.MalformedHeader),
    ("kind-0", dict(kind=0), errors.MalformedHeader),
    ("kind-3", dict(kind=3), errors.MalformedHeader),
    ("kind-255", dict(kind=255), errors.MalformedHeader),
    ("flags-0x02", dict(flags=0x03), errors.MalformedHeader),
    ("flags-0xff", dict(flags=0xFF), errors.MalformedHeader),
    ("cmk-id-non-utf8", dict(cmk_id=b"key-\xff\xfe"), errors.MalformedHeader),
    ("cmk-id-control-char", dict(cmk_id=b"key\n1"), errors.MalformedHeader),
    ("cmk-id-len-0", dict(cmk_id=b"", cmk_id_len=0), errors.MalformedHeader),
    ("cmk-version-0", dict(cmk_version=0), errors.MalformedHeader),
    ("wrapped-len-0", dict(wrapped=b"", wrapped_len=0), errors.MalformedHeader),
    ("wrapped-len-1025", dict(wrapped=b"w" * 1025), errors.MalformedHeader),
    ("wrapped-len-65535-past-copy", dict(wrapped_len=65535), errors.MalformedHeader),
    ("lineage-all-zero", dict(lineage=bytes(16)), errors.MalformedHeader),
    ("uid-all-zero", dict(uid=bytes(16)), errors.MalformedHeader),
    ("unencrypted-with-key-fields", dict(PLAIN, key=True), errors.MalformedHeader),
    ("unencrypted-nonzero-padding", dict(PLAIN, padding=b"\x01"), errors.MalformedHeader),
    ("nonzero-last-body-byte", dict(padding=bytes(4063 - 57 - 15 - 21 - 8 - 2 - 120)
                                    + b"\x01"), errors.MalformedHeader),
    ("data-area-past-file-end", dict(data_offset=1 << 40), errors.Truncated),
    ("size-past-file-end", dict(size_bytes=1 << 40), errors.Truncated),
]
for _v in (0, 2, 3, 255, 65535):
    _both.append((f"version-{_v}", dict(version=_v), errors.UnknownVersion))
for _name, _kw, _err in _both:
    CASES.append(Case(f"both-{_name}", build_copy(**_kw), build_copy(**_kw), _err,
                      rules="F-8..F-17 F-22 F-23"))

CASES += [
    Case("both-checksum-bad", flip(GOOD_RAW, 100), flip(GOOD_RAW, 200),
         errors.ChecksumMismatch, rules="F-7"),
    Case("both-magic-bad", flip(GOOD_RAW, 0), flip(GOOD_RAW, 3), errors.BadMagic,
         rules="F-6"),
    Case("A-magic-bad-B-checksum-bad", flip(GOOD_RAW, 0), flip(GOOD_RAW, 4080),
         errors.ChecksumMismatch, rules="F-22"),
    Case("both-zero-holes", None, None, errors.BadMagic, rules="F-22"),
    Case("A-field-error-B-checksum-bad", build_copy(sector_size=1024),
         flip(GOOD_RAW, 50), errors.UnsupportedSectorSize, rules="F-22"),
    Case("A-checksum-bad-B-field-error", flip(GOOD_RAW, 50), build_copy(cipher=b"rot13"),
         errors.UnknownCipher, rules="F-22"),
    # F-8: one copy of a newer version refuses even though the other copy is valid
    Case("A-version-2-B-good", build_copy(version=2, seq=8), GOOD_RAW,
         errors.UnknownVersion, rules="F-8"),
    Case("A-good-B-version-2", GOOD_RAW, build_copy(version=2, seq=8),
         errors.UnknownVersion, rules="F-8"),
    Case("A-version-2-older-seq-B-good", build_copy(version=2, seq=1), GOOD_RAW,
         errors.UnknownVersion, rules="F-8"),
    # sequence numbers and swapped copies (F-22)
    Case("A-seq5-B-seq6", build_copy(seq=5), build_copy(seq=6, size_bytes=2 * SIZE),
         dict(seq=6, size_bytes=2 * SIZE), file_size=MiB + 2 * SIZE, rules="F-22"),
    Case("A-seq6-B-seq5", build_copy(seq=6, size_bytes=2 * SIZE), build_copy(seq=5),
         dict(seq=6, size_bytes=2 * SIZE), file_size=MiB + 2 * SIZE, rules="F-22"),
    Case("A-seq5-B-seq6-damaged", build_copy(seq=5), flip(build_copy(seq=6), 30),
         dict(seq=5), rules="F-22 F-26"),
    Case("A-seq6-damaged-B-seq5", flip(build_copy(seq=6), 30), build_copy(seq=5),
         dict(seq=5), rules="F-22 F-26"),
    Case("A-seq-max-B-seq-0", build_copy(seq=2**64 - 1), build_copy(seq=0),
         dict(seq=2**64 - 1), rules="F-22"),
    Case("A-seq-0-B-seq-max", build_copy(seq=0), build_copy(seq=2**64 - 1),
         dict(seq=2**64 - 1), rules="F-22"),
    Case("equal-seq-different-content-A-wins", build_copy(seq=4, uid=b"\xaa" * 16),
         build_copy(seq=4, uid=b"\xbb" * 16), dict(seq=4, uid=b"\xaa" * 16), rules="F-22"),
    Case("B-newer-other-uid-and-cmk", GOOD_RAW,
         build_copy(seq=8, uid=b"\xcc" * 16, cmk_id=b"key-other", cmk_version=9),
         dict(seq=8, uid=b"\xcc" * 16, cmk_id=b"key-other", cmk_version=9), rules="F-22"),
    Case("A-only", GOOD_RAW, None, GOOD, rules="F-24"),
    Case("B-only", None, GOOD_RAW, GOOD, rules="F-24"),
    Case("snapshot-kind", build_copy(kind=2), build_copy(kind=2), dict(kind=2)),
    Case("sector-512", build_copy(sector_size=512, size_bytes=512 * 3),
         build_copy(sector_size=512, size_bytes=512 * 3),
         dict(sector_size=512, size_bytes=512 * 3), file_size=MiB + 512 * 3),
    Case("data-offset-2MiB", build_copy(data_offset=2 * MiB), None,
         dict(data_offset=2 * MiB), file_size=2 * MiB + SIZE, rules="F-2"),
    Case("unencrypted-good", build_copy(**PLAIN), build_copy(**PLAIN), dict(PLAIN)),
    Case("unencrypted-A-damaged", flip(build_copy(**PLAIN), 40), build_copy(**PLAIN),
         dict(PLAIN), rules="F-24"),
    Case("unencrypted-B-zeroed", build_copy(**PLAIN), bytes(COPY_SIZE), dict(PLAIN)),
    # F-23: the winner does not fit; never fall back to an older copy that would
    Case("newer-copy-does-not-fit", build_copy(seq=9, size_bytes=2 * SIZE), GOOD_RAW,
         errors.Truncated, rules="F-23"),
    # F-1: longer files are fine
    Case("file-longer-than-data-end", GOOD_RAW, GOOD_RAW, GOOD, file_size=DATA_END + MiB,
         rules="F-1"),
    Case("file-exactly-data-end", GOOD_RAW, GOOD_RAW, GOOD, file_size=DATA_END, rules="F-1"),
]

# Truncation at many offsets (F-1, F-22): every cut below DATA_END refuses.
for _cut in (0, 1, 7, 8, 9, 100, 4095, 4096, 4097, 65536, COPY_B_OFFSET - 1, COPY_B_OFFSET,
             COPY_B_OFFSET + 1, COPY_B_OFFSET + 4095, COPY_B_OFFSET + 4096, MiB - 1, MiB,
             DATA_END - 4096, DATA_END - 1):
    CASES.append(Case(f"truncated-at-{_cut}", GOOD_RAW, GOOD_RAW, errors.Truncated,
                      file_size=_cut, rules="F-1 F-22"))
for _cut in (100, COPY_B_OFFSET + 100, MiB + 100):
    CASES.append(Case(f"damaged-A-truncated-at-{_cut}", flip(GOOD_RAW, 60), GOOD_RAW,
                      errors.Truncated, file_size=_cut, rules="F-22"))
CASES += [
    Case("tiny-text-file", b"hello\n", None, errors.BadMagic, file_size=6, rules="F-22"),
    Case("tiny-magic-prefix", b"BLKC", None, errors.Truncated, file_size=4, rules="F-22"),
    Case("tiny-magic-then-junk", b"BLKCRYPT-junk", None, errors.Truncated, file_size=13,
         rules="F-22"),
]


def test_corpus_is_large_enough():
    """Issue 8 item 1: at least 60 crafted headers, both outcomes represented."""
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
    assert sum(isinstance(c.expect, dict) for c in CASES) >= 20
    assert sum(not isinstance(c.expect, dict) for c in CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_corpus_case(case: Case, tmp_path):
    path = tmp_path / "c.bcd"
    write_container(path, case.a, case.b, case.file_size)
    before = path.read_bytes()

    if isinstance(case.expect, dict):
        header = read_header(path)
        assert header == header_for(**case.expect)
        winner = build_copy(**case.expect)
        assert slots(path) == (winner, winner), "the other copy was not repaired (F-24)"
        assert path.stat().st_size == len(before)
        assert read_header(path, repair=False) == header
    else:
        with pytest.raises(errors.FormatError) as info:
            read_header(path)
        assert type(info.value) is case.expect, info.value
        assert info.value.exit_code == case.expect.exit_code
        assert str(path) in str(info.value)
        assert path.read_bytes() == before, "a refused container was written (F-24)"


def test_directory_is_refused(tmp_path):
    """A path that is not a regular file is a FormatError, not an OSError."""
    with pytest.raises(errors.FormatError) as info:
        read_header(tmp_path)
    assert type(info.value) is errors.FormatError
