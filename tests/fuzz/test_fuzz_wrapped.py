"""Property-based fuzzing of the wrapped data-key blob parser (issue 8 item 2).

Target: :func:`blockcrypt.kms.envelope.parse_wrapped` and what consumes its
result (:func:`envelope.unwrap`, ``KeyStore.decrypt_data_key``).  Only the
documented exceptions may escape, whatever the input:

- ``parse_wrapped``: BlobFormatError, for any object (bytes-likes of any
  content, other types);
- accepted blobs are canonical: exactly ``blob_size(L)`` bytes, a key id of the
  allowed alphabet, a version >= 1, and the parsed fields re-encode to the same
  bytes;
- a blob that differs from a genuine one in any way never unwraps
  (BlobFormatError or UnwrapError), and through the key store only
  BlobFormatError, UnwrapError, KeyNotFound or KeyStateError escape.

The example count comes from BLOCKCRYPT_FUZZ_EXAMPLES (default 300, for CI;
`make fuzz` runs 20000).
"""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import envelope
from blockcrypt.kms.envelope import blob_size, parse_wrapped
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage.home import Home

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("BLOCKCRYPT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CMK = Secret(bytes(range(32)))
KEY_ID = "0f0e0d0c-0000-4000-8000-000000000001"
CONTEXT = {"domain": "blockcrypt-dk-v1", "container_uid": "ab" * 16, "cipher": "aes-xts-plain64"}
ID_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


def genuine() -> tuple[bytes, bytes]:
    """(blob, dk) wrapped by the real code."""
    dk = envelope.new_data_key()
    blob = envelope.wrap(CMK, KEY_ID, 3, dk, CONTEXT)
    return blob, dk.reveal()


GENUINE, GENUINE_DK = genuine()


def only_blob_format_error(blob) -> envelope.WrappedKey | None:
    try:
        return parse_wrapped(blob)
    except errors.BlobFormatError as e:
        assert e.message.startswith("wrapped data key is malformed: "), e.message
        return None


def assert_canonical(blob: bytes, parsed: envelope.WrappedKey) -> None:
    raw_id = parsed.key_id.encode("ascii")
    # 1: local provider, 2: pkcs11 provider, 3: kmip provider (with the server's uid)
    assert parsed.algorithm in (1, 2, 3)
    assert (parsed.server_ref is not None) == (parsed.algorithm == 3)
    ref = b"" if parsed.server_ref is None else parsed.server_ref.encode("ascii")
    assert len(blob) == blob_size(len(raw_id), len(ref) if parsed.algorithm == 3 else None)
    assert all(c in ID_ALPHABET for c in raw_id) and 1 <= len(raw_id) <= 64
    assert all(0x21 <= c <= 0x7E for c in ref) and len(ref) <= 128
    assert parsed.key_version >= 1 and parsed.format_version == 1
    rebuilt = (b"BCWK" + bytes([1, parsed.algorithm, len(raw_id)]) + raw_id
               + struct.pack(">I", parsed.key_version)
               + (bytes([len(ref)]) + ref if parsed.algorithm == 3 else b"")
               + parsed.nonce + parsed.ciphertext)
    assert rebuilt == blob and parsed.header == blob[:len(parsed.header)]


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(blob):
    parsed = only_blob_format_error(blob)
    if parsed is not None:
        assert_canonical(blob, parsed)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.text(max_size=50), st.lists(st.integers(0, 255)),
                 st.binary(max_size=200).map(bytearray), st.binary(max_size=200).map(memoryview),
                 st.floats(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_any_python_object(obj):
    only_blob_format_error(obj)


@st.composite
def structured(draw) -> bytes:
    """Blobs built field by field, each field valid most of the time (so the
    parser's later checks are reached) or replaced by an arbitrary value."""
    def field(valid, other):
        return draw(st.one_of(st.just(valid), other)) if draw(st.integers(0, 7)) == 0 \
            else valid

    magic = field(b"BCWK", st.binary(min_size=4, max_size=4))
    version = field(1, st.integers(0, 255))
    algorithm = field(1, st.integers(0, 255))
    raw_id = field(draw(st.text(alphabet=ID_ALPHABET.decode(), min_size=1, max_size=64))
                   .encode(), st.binary(max_size=70))
    declared = field(len(raw_id), st.integers(0, 255))
    key_version = field(draw(st.integers(1, 2**32 - 1)), st.integers(0, 2**32 - 1))
    tail = field(draw(st.binary(min_size=92, max_size=92)), st.binary(max_size=120))
    return (magic + bytes([version, algorithm, declared]) + raw_id
            + struct.pack(">I", key_version) + tail)


@FUZZ
@given(structured())
def test_structured_blobs(blob):
    parsed = only_blob_format_error(blob)
    if parsed is not None:
        assert_canonical(blob, parsed)
        with pytest.raises(errors.UnwrapError):     # random ciphertext never authenticates
            envelope.unwrap(CMK, parsed, CONTEXT)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GENUINE) - 1), st.integers(1, 255)),
                min_size=1, max_size=6, unique_by=lambda f: f[0]),
       st.integers(-8, 8), st.integers(0, len(GENUINE)))
def test_mutations_of_a_genuine_blob_never_unwrap(flips, resize, at):
    blob = bytearray(GENUINE)
    for pos, x in flips:
        blob[pos] ^= x
    if resize > 0:
        blob[at:at] = os.urandom(resize)
    elif resize < 0:
        del blob[at:at - resize]
    blob = bytes(blob)
    assert blob != GENUINE
    parsed = only_blob_format_error(blob)
    if parsed is not None:
        assert_canonical(blob, parsed)
        with pytest.raises(errors.UnwrapError):
            envelope.unwrap(CMK, parsed, CONTEXT)


def test_the_genuine_blob_unwraps():
    """The control for the mutation target."""
    with envelope.unwrap(CMK, parse_wrapped(GENUINE), CONTEXT) as dk:
        assert dk.reveal() == GENUINE_DK


@pytest.fixture(scope="module")
def store_blob(tmp_path_factory):
    """A real key store with a key and a DK wrapped by it."""
    home = Home(tmp_path_factory.mktemp("fuzz-store"))
    KeyStore.init(home, Secret(b"fuzz passphrase"))
    store = KeyStore.open(home, lambda: Secret(b"fuzz passphrase"))
    key = store.create_key(alias="fuzz")
    dk, blob = store.generate_data_key(key["id"], CONTEXT)
    try:
        yield store, blob, dk.reveal()
    finally:
        dk.wipe()
        store.close()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 120), st.integers(1, 255)), min_size=1, max_size=4,
                unique_by=lambda f: f[0]),
       st.integers(-3, 3))
def test_mutated_blobs_through_the_key_store(store_blob, flips, resize):
    store, good, dk = store_blob
    blob = bytearray(good)
    for pos, x in flips:
        if pos < len(blob):
            blob[pos] ^= x
    if resize > 0:
        blob += os.urandom(resize)
    elif resize < 0:
        del blob[resize:]
    blob = bytes(blob)
    try:
        got = store.decrypt_data_key(blob, CONTEXT)
    except (errors.BlobFormatError, errors.UnwrapError, errors.KeyNotFound,
            errors.KeyStateError):
        return
    with got:
        # only a blob equal to the genuine one may unwrap (flips past the end were no-ops)
        assert blob == good and got.reveal() == dk
