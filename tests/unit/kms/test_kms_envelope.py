"""The wrapped data-key blob (blockcrypt/kms/envelope.py): layout, binding, tampering, parsing."""
from __future__ import annotations

import json
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import envelope
from blockcrypt.kms.envelope import parse_wrapped

CMK = bytes(range(32))
DK = bytes(range(64, 128))
KEY_ID = "00000000-0000-4000-8000-000000000001"
NONCE = bytes(range(100, 112))
CONTEXT = {"uid": "00112233445566778899aabbccddeeff", "cipher": "aes-xts-plain64"}

# Frozen known-answer blob: key version 3, the inputs above.  If this stops
# unwrapping, the on-disk format changed and every existing disk would break.
FROZEN_BLOB = bytes.fromhex(
    "4243574b01012430303030303030302d303030302d343030302d383030302d30303030303030303030"
    "3031000000036465666768696a6b6c6d6e6f085a9c253dac10d9762b15a3962824b212935459df39a5"
    "25ff88f613a7fefb17f48822a32877fd63959a1254912fa4a06b2aea94543f375f8288d6ad93fcdbf5"
    "f95dc8367fd275e262a939f784b54262")


def build_blob_by_spec(cmk: bytes, key_id: str, version: int, nonce: bytes, dk: bytes,
                       context: dict) -> bytes:
    """An independent implementation of the layout in the envelope module's docstring."""
    raw_id = key_id.encode("ascii")
    header = b"BCWK" + bytes([1, 1, len(raw_id)]) + raw_id + struct.pack(">I", version)
    aad = header + json.dumps(context, sort_keys=True, separators=(",", ":")).encode()
    return header + nonce + AESGCM(cmk).encrypt(nonce, dk, aad)


def test_frozen_blob_matches_the_documented_layout_and_unwraps():
    assert build_blob_by_spec(CMK, KEY_ID, 3, NONCE, DK, CONTEXT) == FROZEN_BLOB
    parsed = parse_wrapped(FROZEN_BLOB)
    assert (parsed.format_version, parsed.algorithm) == (1, 1)
    assert (parsed.key_id, parsed.key_version, parsed.nonce) == (KEY_ID, 3, NONCE)
    assert len(FROZEN_BLOB) == envelope.blob_size(len(KEY_ID)) == 103 + len(KEY_ID)
    with envelope.unwrap(Secret(CMK), parsed, CONTEXT) as dk:
        assert dk == DK


def test_wrap_produces_blobs_an_independent_reader_can_open():
    with Secret(CMK) as cmk, Secret(DK) as dk:
        blob = envelope.wrap(cmk, KEY_ID, 7, dk, CONTEXT)
    parsed = parse_wrapped(blob)
    aad = parsed.header + json.dumps(CONTEXT, sort_keys=True, separators=(",", ":")).encode()
    assert AESGCM(CMK).decrypt(parsed.nonce, parsed.ciphertext, aad) == DK
    assert parsed.key_version == 7


def test_context_key_order_does_not_matter_but_every_entry_does():
    parsed = parse_wrapped(FROZEN_BLOB)
    reordered = dict(reversed(list(CONTEXT.items())))
    with envelope.unwrap(Secret(CMK), parsed, reordered) as dk:
        assert dk == DK
    for bad in ({**CONTEXT, "uid": "ff" * 16}, {"uid": CONTEXT["uid"]},
                {**CONTEXT, "extra": ""}, {}):
        with pytest.raises(errors.UnwrapError):
            envelope.unwrap(Secret(CMK), parsed, bad)


def test_wrong_cmk_fails():
    with pytest.raises(errors.UnwrapError):
        envelope.unwrap(Secret(bytes(32)), parse_wrapped(FROZEN_BLOB), CONTEXT)


def test_every_single_byte_change_is_refused_with_a_documented_error():
    for pos in range(len(FROZEN_BLOB)):
        for delta in (0x01, 0x80):
            blob = bytearray(FROZEN_BLOB)
            blob[pos] ^= delta
            try:
                parsed = parse_wrapped(bytes(blob))
                envelope.unwrap(Secret(CMK), parsed, CONTEXT)
            except (errors.BlobFormatError, errors.UnwrapError):
                continue
            pytest.fail(f"byte {pos} ^ {delta:#x} was accepted")


@pytest.mark.parametrize("blob, reason", [
    (b"", "too short"),
    (b"BCW", "too short"),
    (b"XXXX" + FROZEN_BLOB[4:], "bad magic"),
    (FROZEN_BLOB[:4] + b"\x02" + FROZEN_BLOB[5:], "format version 2"),
    (FROZEN_BLOB[:5] + b"\x09" + FROZEN_BLOB[6:], "algorithm id 9"),
    (FROZEN_BLOB[:6] + b"\x00" + FROZEN_BLOB[7:], "key id length 0"),
    (FROZEN_BLOB[:6] + b"\x41" + FROZEN_BLOB[7:], "key id length 65"),
    (FROZEN_BLOB[:-1], "length"),
    (FROZEN_BLOB + b"\x00", "length"),
    (FROZEN_BLOB[:7] + b"/" + FROZEN_BLOB[8:], "key id has characters"),
    (FROZEN_BLOB[:7 + 36] + b"\0\0\0\0" + FROZEN_BLOB[7 + 40:], "key version 0"),
    ("not bytes", "expected bytes"),
    (None, "expected bytes"),
])
def test_malformed_blobs_raise_blob_format_error(blob, reason):
    with pytest.raises(errors.BlobFormatError, match=reason):
        parse_wrapped(blob)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_random_bytes_raises_only_blob_format_error(data):
    try:
        parse_wrapped(data)
    except errors.BlobFormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(FROZEN_BLOB) - 1), st.integers(1, 255)),
                min_size=1, max_size=4, unique_by=lambda flip: flip[0]),
       st.integers(-3, 3))
def test_mutated_blobs_never_unwrap_and_never_raise_anything_else(flips, resize):
    blob = bytearray(FROZEN_BLOB)
    for pos, x in flips:
        blob[pos] ^= x
    if resize > 0:
        blob += bytes(resize)
    elif resize < 0:
        del blob[resize:]
    with pytest.raises((errors.BlobFormatError, errors.UnwrapError)):
        envelope.unwrap(Secret(CMK), parse_wrapped(bytes(blob)), CONTEXT)


@pytest.mark.parametrize("context", [None, [], {"a": 1}, {1: "a"}, {"": "x"},
                                     {"a": "x" * 5000}])
def test_bad_contexts_are_invalid_input(context):
    with pytest.raises(errors.InvalidInput):
        envelope.canonical_context(context)


def test_data_keys_are_64_bytes_with_differing_halves(monkeypatch):
    keys = [envelope.new_data_key() for _ in range(4)]
    assert all(len(k) == 64 for k in keys)
    assert len({k.reveal() for k in keys}) == 4
    # A generator that first returns equal halves must be retried, never returned.
    real_random = Secret.random
    calls = []

    def fake_random(n):
        calls.append(n)
        return Secret(b"\x07" * n) if len(calls) == 1 else real_random(n)

    monkeypatch.setattr(Secret, "random", staticmethod(fake_random))
    dk = envelope.new_data_key()
    assert len(calls) == 2
    assert dk.view()[:32] != dk.view()[32:]
