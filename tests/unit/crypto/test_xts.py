"""Tests of the AES-256-XTS sector cipher (blockcrypt/crypto/xts/).

Known answers come from IEEE 1619-2007 Annex B and NIST CAVP XTSGenAES256
(files under tests/data/xts/, sources in their headers).  The cipher is also
checked against pyca's XTS per sector, against the openssl command line (its
AES-256-ECB composed with the IEEE 1619 equations written out in plain Python,
because OpenSSL 3.0's `openssl enc` refuses XTS), and the fast engine against
the reference engine on thousands of random requests, in place, from several
threads, and across wipe().
"""
from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from blockcrypt import errors
from blockcrypt.constants import SECTOR_SIZES
from blockcrypt.crypto import xts
from blockcrypt.crypto.secret import Secret
from blockcrypt.crypto.xts import evp

from support.cli import REPO
from support.prereq import require_tools

DATA = REPO / "tests" / "data" / "xts"


def _records(path: Path) -> list[dict[str, str]]:
    """Parse a CAVP-style file: blank-line separated `Name = value` records."""
    out = []
    for block in path.read_text().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line.startswith("#") or " = " not in line:
                continue
            name, value = line.split(" = ", 1)
            fields[name.strip()] = value.strip()
        if fields:
            out.append(fields)
    return out


IEEE = _records(DATA / "ieee1619-2007-annexB-aes256.txt")
NIST = [r for r in _records(DATA / "XTSGenAES256-excerpt.rsp")
        if int(r["DataUnitLen"]) % 128 == 0]


def pyca_sector(key: bytes, tweak: int, data: bytes, encrypt: bool = True) -> bytes:
    """One data unit with pyca's XTS: the independent per-sector reference."""
    cipher = Cipher(algorithms.AES(key), modes.XTS(tweak.to_bytes(16, "little")))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


def pyca_buffer(key: bytes, sector_size: int, sector_index: int, data: bytes,
                encrypt: bool = True) -> bytes:
    step = sector_size // 512
    return b"".join(
        pyca_sector(key, (sector_index + n) * step, data[off:off + sector_size], encrypt)
        for n, off in enumerate(range(0, len(data), sector_size)))


def random_key() -> Secret:
    return Secret.random(xts.KEY_BYTES)


# -- known answers ---------------------------------------------------------------

def test_vector_files_are_complete():
    assert [r["Vector"] for r in IEEE] == ["10", "11", "12", "13", "14"]
    assert len(NIST) >= 8
    assert {int(r["DataUnitLen"]) for r in NIST} == {256, 384}


@pytest.mark.parametrize("vec", IEEE, ids=lambda r: f"ieee-{r['Vector']}")
def test_ieee1619_annex_b(vec):
    key = bytes.fromhex(vec["Key"])
    seq_no = int(vec["DataUnitSeqNo"], 16)
    pt, ct = bytes.fromhex(vec["PT"]), bytes.fromhex(vec["CT"])
    tweak16 = seq_no.to_bytes(16, "little")
    assert xts.xts_encrypt_unit(key, tweak16, pt) == ct
    assert xts.xts_decrypt_unit(key, tweak16, ct) == pt
    # The same vectors through the sector API, both engines: a 512-byte sector's
    # index IS its data unit sequence number (plain64).
    for engine in ("openssl", "reference"):
        c = xts.XtsCipher(Secret(key), 512, engine=engine)
        assert bytes(c.encrypt(pt, seq_no)) == ct
        assert bytes(c.decrypt(ct, seq_no)) == pt
        # ... as the second sector of a two-sector request (per-sector path),
        two = c.encrypt(bytes(512) + pt, seq_no - 1)
        assert bytes(two[512:]) == ct
        # ... and as sector 25 of a request long enough for the bulk path.
        many = bytearray(os.urandom((xts.BULK_MIN_SECTORS + 12) * 512))
        many[25 * 512:26 * 512] = pt
        c.encrypt_into(many, many, seq_no - 25)
        assert bytes(many[25 * 512:26 * 512]) == ct
        c.decrypt_into(many, many, seq_no - 25)
        assert bytes(many[25 * 512:26 * 512]) == pt


@pytest.mark.parametrize("vec", NIST, ids=lambda r: f"nist-{r['COUNT']}")
def test_nist_xtsgenaes256(vec):
    key = bytes.fromhex(vec["Key"])
    tweak16 = bytes.fromhex(vec["i"])
    pt, ct = bytes.fromhex(vec["PT"]), bytes.fromhex(vec["CT"])
    assert len(pt) * 8 == int(vec["DataUnitLen"])
    assert xts.xts_encrypt_unit(key, tweak16, pt) == ct
    assert xts.xts_decrypt_unit(key, tweak16, ct) == pt


# -- known answers on every engine path ------------------------------------------------
#
# Which vector runs where, and why:
# - IEEE 1619-2007 vectors 10-14 are 512-byte data units whose tweak is the data
#   unit sequence number (0xff .. 0xffffffffff) as a 128-bit little-endian
#   integer: exactly a 512-byte sector's plain64 tweak.  They run through every
#   engine path that serves 512-byte sectors (ENGINE_PATHS), with the vector's
#   sector alone, in the middle of a short request, as the last sector of the
#   smallest bulk request, and on either side of a bulk chunk boundary
#   (positions 511 and 512 need a sequence number >= 512, so vector 10, 0xff,
#   skips those two).
# - The NIST XTSGenAES256 excerpt has 256- and 384-bit data units and arbitrary
#   128-bit tweaks: no sector size or 64-bit sector number fits them.  They run
#   through the unit-level functions instead: pyca's (the reference engine's
#   xts_encrypt_unit, test_nist_xtsgenaes256) and the libcrypto EVP calls the
#   OpenSSL engine is built from (test_nist_vectors_through_the_evp_bindings),
#   with the tweak set by EVP_CipherInit_ex and written through the live IV.
# - No published vector has a 4096-byte data unit; the 4096-byte paths are
#   checked against pyca and the openssl command line below.

def _fail_fallback(buf, sector_index, encrypt):
    raise AssertionError("the fast path handed a known-answer request to the generic path")


def _engine_path(path: str, key: bytes, monkeypatch):
    """``(crypt(buf, first_sector, encrypt), max_sectors, engine)`` for one
    engine path, 512-byte sectors; ``crypt`` works in place on a bytearray."""
    import ctypes
    key_view = memoryview(bytearray(key))
    if path == "reference":
        eng = xts.ReferenceXts(key_view, 512)
        return (lambda buf, first, enc: eng.crypt_into(memoryview(buf), memoryview(buf),
                                                       len(buf), first, enc)), None, eng
    if path == "auto":
        c = xts.XtsCipher(Secret(key), 512, engine="auto")
        assert c.engine_name == "openssl"
        return ((lambda buf, first, enc: (c.encrypt_into if enc else c.decrypt_into)(
            buf, buf, first)), None, c)
    lib = evp.libcrypto()
    if path == "openssl-init-iv":                  # EVP_CipherInit_ex per sector
        monkeypatch.setattr(lib, "live_iv_works", False)
    eng = xts.OpenSslXts(key_view, 512, lib)
    if path in ("openssl-live-iv", "openssl-init-iv"):
        return (lambda buf, first, enc: eng.crypt_into(memoryview(buf), memoryview(buf),
                                                       len(buf), first, enc)), None, eng
    in_place, at = eng.fast_paths(_fail_fallback)
    below_bulk = xts.BULK_MIN_SECTORS - 1          # the fast paths' largest request
    if path == "openssl-fast-in-place":
        return (lambda buf, first, enc: in_place(memoryview(buf), first, enc)), below_bulk, eng
    assert path == "openssl-fast-at"
    return ((lambda buf, first, enc: at(ctypes.addressof(ctypes.c_char.from_buffer(buf)),
                                        len(buf), first, enc)), below_bulk, eng)


ENGINE_PATHS = ["reference", "openssl-live-iv", "openssl-init-iv", "openssl-fast-in-place",
                "openssl-fast-at", "auto"]
# (sectors in the request, position of the vector's sector in it)
LAYOUTS = [(1, 0), (3, 1), (xts.BULK_MIN_SECTORS, xts.BULK_MIN_SECTORS - 1),
           (xts.BULK_CHUNK_SECTORS + 8, xts.BULK_CHUNK_SECTORS - 1),
           (xts.BULK_CHUNK_SECTORS + 8, xts.BULK_CHUNK_SECTORS)]


@pytest.mark.parametrize("path", ENGINE_PATHS)
@pytest.mark.parametrize("vec", IEEE, ids=lambda r: f"ieee-{r['Vector']}")
def test_ieee_vectors_on_every_engine_path(vec, path, monkeypatch):
    """Each IEEE 512-byte vector through each engine path of blockcrypt's own
    engines (not only pyca): the reference engine, the OpenSSL engine's generic
    path with the tweak written into the live IV and set per sector by
    EVP_CipherInit_ex, its two per-request fast entry points, its numpy bulk
    path (requests of >= BULK_MIN_SECTORS sectors, which must be taken), and
    XtsCipher with engine="auto".  See the comment above for the vector choice."""
    from blockcrypt.crypto.xts import bulk
    key = bytes.fromhex(vec["Key"])
    seq_no = int(vec["DataUnitSeqNo"], 16)
    pt, ct = bytes.fromhex(vec["PT"]), bytes.fromhex(vec["CT"])
    bulk_calls = []
    real_bulk = bulk.bulk_512
    monkeypatch.setattr(bulk, "bulk_512", lambda *a: (bulk_calls.append(1), real_bulk(*a)))
    crypt, max_sectors, eng = _engine_path(path, key, monkeypatch)
    ran = 0
    for n, k in LAYOUTS:
        if k > seq_no or (max_sectors is not None and n > max_sectors):
            continue
        ran += 1
        data = bytearray(os.urandom(n * 512))
        data[k * 512:(k + 1) * 512] = pt
        buf = bytearray(data)
        bulk_calls.clear()
        crypt(buf, seq_no - k, True)
        assert bytes(buf[k * 512:(k + 1) * 512]) == ct, (n, k)
        takes_bulk = n >= xts.BULK_MIN_SECTORS and path != "reference"
        assert bool(bulk_calls) == takes_bulk, (n, k)
        crypt(buf, seq_no - k, False)
        assert buf == data, (n, k)
    assert ran == (2 if max_sectors else 3 if seq_no < 512 else 5)
    if path == "openssl-init-iv":                  # really the per-sector-init way
        assert eng._workers and all(iv is None for st in eng._workers
                                    for _, iv in st.xts.values())
    (eng.wipe if path == "auto" else eng.close)()


@pytest.mark.parametrize("vec", NIST, ids=lambda r: f"nist-{r['COUNT']}")
def test_nist_vectors_through_the_evp_bindings(vec):
    """The NIST vectors (data units of 32 and 48 bytes, 128-bit tweaks) through
    the libcrypto calls the OpenSSL engine is made of: an XTS context keyed by
    LibCrypto.new_ctx, the tweak set by EVP_CipherInit_ex, then (where the live
    IV works, as on these machines) written straight into the context's IV,
    all 128 bits of it, and one EVP_CipherUpdate."""
    import ctypes
    lib = evp.libcrypto()
    key = (ctypes.c_char * 64).from_buffer_copy(bytes.fromhex(vec["Key"]))
    tweak16 = bytes.fromhex(vec["i"])
    pt, ct = bytes.fromhex(vec["PT"]), bytes.fromhex(vec["CT"])
    out = (ctypes.c_char * len(pt))()
    outl = ctypes.c_int()
    assert lib.live_iv_works
    for encrypt, src, want in ((True, pt, ct), (False, ct, pt)):
        ctx = lib.new_ctx(lib.aes_256_xts, ctypes.addressof(key), encrypt)
        try:
            iv = (ctypes.c_char * 16).from_buffer_copy(tweak16)
            assert lib.init(ctx, None, None, None, ctypes.addressof(iv), -1) == 1
            assert lib.update(ctx, out, ctypes.byref(outl), src, len(src)) == 1
            assert (outl.value, out.raw) == (len(src), want)
            live = lib.live_iv(ctx)                # resets the IV to zero, then ...
            live[0] = int.from_bytes(tweak16[:8], "little")
            live[1] = int.from_bytes(tweak16[8:], "little")
            out[:] = bytes(len(src))
            assert lib.update(ctx, out, ctypes.byref(outl), src, len(src)) == 1
            assert out.raw == want
        finally:
            lib.free_ctx(ctx)


# -- validation --------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 16, 32, 48, 63, 65, 128])
def test_refuses_wrong_key_length(n):
    with pytest.raises(errors.InvalidKeyMaterial) as exc:
        xts.XtsCipher(Secret(os.urandom(n)), 4096)
    assert exc.value.exit_code == errors.InvalidKeyMaterial.exit_code
    assert "64 bytes" in str(exc.value)
    with pytest.raises(errors.InvalidKeyMaterial):
        xts.xts_encrypt_unit(os.urandom(n), bytes(16), bytes(32))


def test_refuses_equal_halves():
    half = os.urandom(32)
    with pytest.raises(errors.InvalidKeyMaterial) as exc:
        xts.XtsCipher(Secret(half + half), 512)
    assert "halves" in str(exc.value)
    assert half.hex() not in str(exc.value)
    with pytest.raises(errors.InvalidKeyMaterial):
        xts.xts_encrypt_unit(half + half, bytes(16), bytes(32))


def test_refuses_non_secret_or_wiped_key():
    with pytest.raises(TypeError):
        xts.XtsCipher(os.urandom(64), 512)
    key = random_key()
    key.wipe()
    with pytest.raises(errors.InvalidKeyMaterial, match="wiped"):
        xts.XtsCipher(key, 512)


@pytest.mark.parametrize("size", [0, 256, 1024, 2048, 4095, 8192, "4096"])
def test_refuses_bad_sector_size(size):
    with pytest.raises(errors.InvalidInput) as exc:
        xts.XtsCipher(random_key(), size)
    assert "512 or 4096" in str(exc.value)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_refuses_bad_buffers_and_indexes(sector_size):
    c = xts.XtsCipher(random_key(), sector_size)
    for bad_len in (1, 16, sector_size - 16, sector_size + 16):
        with pytest.raises(errors.InvalidInput, match="multiple"):
            c.encrypt(bytes(bad_len), 0)
    with pytest.raises(errors.InvalidInput, match="negative"):
        c.encrypt(bytes(sector_size), -1)
    with pytest.raises(errors.InvalidInput):
        c.encrypt(bytes(sector_size), 1.0)
    with pytest.raises(errors.InvalidInput):
        c.encrypt(bytes(sector_size), True)
    # The tweak of the LAST sector must fit 64 bits.
    last_ok = (2**64 - 1) // (sector_size // 512)
    c.encrypt(bytes(sector_size), last_ok)
    with pytest.raises(errors.InvalidInput, match="64-bit"):
        c.encrypt(bytes(sector_size), last_ok + 1)
    with pytest.raises(errors.InvalidInput, match="64-bit"):
        c.encrypt(bytes(2 * sector_size), last_ok)
    with pytest.raises(errors.InvalidInput, match="read-only"):
        c.encrypt_into(bytes(sector_size), bytes(sector_size), 0)
    with pytest.raises(errors.InvalidInput, match="destination"):
        c.encrypt_into(bytes(sector_size), bytearray(2 * sector_size), 0)
    assert c.encrypt(b"", 5) == bytearray()


def test_wipe_zeroes_own_copy_and_disables():
    key = random_key()
    c = xts.XtsCipher(key, 4096)
    own = c._key
    c.wipe()
    assert own.wiped
    assert not key.wiped                      # the caller's secret is the caller's
    with pytest.raises(errors.StateError):
        c.encrypt(bytes(4096), 0)
    c.wipe()                                  # idempotent
    assert "wiped" in repr(c) and key.reveal().hex() not in repr(c)


def test_encrypt_changes_data_and_depends_on_index():
    c = xts.XtsCipher(random_key(), 512)
    pt = bytes(512)
    assert bytes(c.encrypt(pt, 0)) != pt
    assert c.encrypt(pt, 0) != c.encrypt(pt, 1)


# -- cross-checks against pyca ------------------------------------------------------

@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_matches_pyca_per_sector(sector_size):
    rng = random.Random(1619)
    key = random_key()
    c = xts.XtsCipher(key, sector_size)
    max_index = (2**64 - 1) // (sector_size // 512) - 40
    for _ in range(40):
        n = rng.randint(1, 24 if sector_size == 512 else 6)
        index = rng.choice([0, 1, rng.randrange(2**32 - 8, 2**32 + 8),
                            rng.randrange(max_index), max_index])
        data = os.urandom(n * sector_size)
        expect = pyca_buffer(key.reveal(), sector_size, index, data)
        assert bytes(c.encrypt(data, index)) == expect
        assert bytes(c.decrypt(expect, index)) == data


def test_4096_sector_i_uses_tweak_8i():
    key = random_key()
    c = xts.XtsCipher(key, 4096)
    for i in (1, 7, 2**29 + 3, 2**33 + 5):
        data = os.urandom(4096)
        assert bytes(c.encrypt(data, i)) == pyca_sector(key.reveal(), 8 * i, data)
        assert bytes(c.encrypt(data, i)) != pyca_sector(key.reveal(), i, data)


# -- cross-check against the openssl command line ------------------------------------
#
# `openssl enc -aes-256-xts` is refused by OpenSSL 3.0 ("enc XTS ciphers not
# supported"), so the independent implementation is composed here from the
# openssl CLI's AES-256-ECB and the IEEE 1619-2007 section 5.3 equations in plain
# Python integers: T = E_K2(i), C_j = E_K1(P_j ^ T*a^j) ^ T*a^j.  It shares no
# code with blockcrypt or pyca.

def openssl_ecb(key: bytes, data: bytes, encrypt: bool = True) -> bytes:
    # A throwaway random test key on the command line is fine in a test only.
    argv = ["openssl", "enc", "-e" if encrypt else "-d", "-aes-256-ecb",
            "-K", key.hex(), "-nopad"]
    cp = subprocess.run(argv, input=data, capture_output=True, check=True, timeout=30)
    assert len(cp.stdout) == len(data)
    return cp.stdout


def spec_xts_sector(key: bytes, tweak: int, data: bytes, encrypt: bool = True) -> bytes:
    k1, k2 = key[:32], key[32:]
    t = int.from_bytes(openssl_ecb(k2, tweak.to_bytes(16, "little")), "little")
    masks = []
    for _ in range(len(data) // 16):
        masks.append(t.to_bytes(16, "little"))
        t = ((t << 1) ^ 0x87) & (2**128 - 1) if t >> 127 else t << 1
    xored = b"".join(bytes(a ^ b for a, b in zip(data[16 * j:16 * j + 16], m))
                     for j, m in enumerate(masks))
    mid = openssl_ecb(k1, xored, encrypt)
    return b"".join(bytes(a ^ b for a, b in zip(mid[16 * j:16 * j + 16], m))
                    for j, m in enumerate(masks))


def test_spec_composition_matches_ieee_vector():
    """The composed reference itself reproduces IEEE vector 13 (sector 0xffffffff)."""
    require_tools("openssl")
    vec = IEEE[3]
    got = spec_xts_sector(bytes.fromhex(vec["Key"]), int(vec["DataUnitSeqNo"], 16),
                          bytes.fromhex(vec["PT"]))
    assert got.hex() == vec["CT"]


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_matches_openssl_command_line(sector_size):
    require_tools("openssl")
    rng = random.Random(sector_size)
    key = random_key()
    raw = key.reveal()
    c = xts.XtsCipher(key, sector_size)
    step = sector_size // 512
    last = (2**64 - 1) // step
    indexes = [0, rng.randrange(2**20), 2**32 // step - 1, 2**32 // step,
               rng.randrange(2**32, 2**40), rng.randrange(2**40, last), last - 1]
    for index in indexes:
        data = os.urandom(2 * sector_size)
        ours = bytes(c.encrypt(data, index))
        theirs = b"".join(
            spec_xts_sector(raw, (index + n) * step, data[off:off + sector_size])
            for n, off in enumerate(range(0, len(data), sector_size)))
        assert ours == theirs
        assert spec_xts_sector(raw, index * step, ours[:sector_size], encrypt=False) \
            == data[:sector_size]
    assert sum(i * step >= 2**32 for i in indexes) >= 4


# -- properties ------------------------------------------------------------------------

_KEY = random_key()
_CIPHERS = {s: xts.XtsCipher(_KEY, s) for s in SECTOR_SIZES}

sector_sizes = st.sampled_from(SECTOR_SIZES)
# Up to 40 sectors from the index: the last 4096-byte sector (tweak 8*i) must
# stay within the 64-bit tweak range, i.e. index <= 2^61 - 40.
indexes = st.one_of(st.integers(0, 2**20), st.integers(2**31, 2**33),
                    st.integers(0, 2**61 - 40))


@settings(max_examples=60, deadline=None)
@given(sector_sizes, st.integers(1, 40), indexes, st.integers(0, 2**32))
def test_roundtrip_and_in_place(sector_size, n_sectors, index, seed):
    c = _CIPHERS[sector_size]
    data = random.Random(seed).randbytes(n_sectors * sector_size)
    ct = c.encrypt(data, index)
    assert bytes(c.decrypt(ct, index)) == data
    buf = bytearray(data)
    c.encrypt_into(buf, buf, index)
    assert buf == ct
    c.decrypt_into(buf, buf, index)
    assert buf == data
    out = bytearray(len(data))
    c.encrypt_into(memoryview(data), out, index)
    assert out == ct


@settings(max_examples=60, deadline=None)
@given(sector_sizes, st.integers(1, 40), indexes, st.integers(0, 2**32))
def test_multi_sector_equals_concatenated_sectors(sector_size, n_sectors, index, seed):
    c = _CIPHERS[sector_size]
    data = random.Random(seed).randbytes(n_sectors * sector_size)
    whole = c.encrypt(data, index)
    parts = b"".join(bytes(c.encrypt(data[k * sector_size:(k + 1) * sector_size], index + k))
                     for k in range(n_sectors))
    assert bytes(whole) == parts


# -- fast engine vs reference -------------------------------------------------------

def _engines(key: Secret, sector_size: int):
    fast = xts.XtsCipher(key, sector_size, engine="openssl")
    ref = xts.XtsCipher(key, sector_size, engine="reference")
    assert (fast.engine_name, ref.engine_name) == ("openssl", "reference")
    return fast, ref


def test_auto_engine_is_openssl_here():
    """The machines this project runs on have libcrypto: the fast path is the default."""
    assert xts.libcrypto() is not None
    assert xts.XtsCipher(random_key(), 512).engine_name == "openssl"


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_fast_matches_reference_on_random_requests(sector_size):
    """Thousands of random (sector_index, n_sectors) pairs, both directions."""
    rng = random.Random(7 + sector_size)
    key = random_key()
    fast, ref = _engines(key, sector_size)
    step = sector_size // 512
    last = (2**64 - 1) // step
    bulk = xts.BULK_MIN_SECTORS
    chunk = xts.BULK_CHUNK_SECTORS
    pool = os.urandom((2 * chunk + 40) * 512 if sector_size == 512 else 12 * 4096)
    max_sectors = len(pool) // sector_size
    for _ in range(2000 if sector_size == 4096 else 1200):
        if sector_size == 512 and rng.random() < 0.1:
            # around the per-sector/bulk switch and the bulk chunk boundary
            n = rng.choice([bulk - 1, bulk, bulk + 1, chunk - 1, chunk, chunk + 1,
                            2 * chunk + 1, max_sectors])
        else:
            n = min(max_sectors, rng.randint(1, 3 * bulk if rng.random() < 0.2 else 8))
        index = rng.choice([rng.randrange(2**16), rng.randrange(2**32 - 300, 2**32 + 300),
                            rng.randrange(2**33, 2**50), rng.randrange(last - n + 1),
                            last - n + 1])
        start = rng.randrange(0, max_sectors - n + 1) * sector_size
        data = pool[start:start + n * sector_size]
        want = ref.encrypt(data, index)
        assert fast.encrypt(data, index) == want, (n, index)
        assert fast.decrypt(want, index) == data, (n, index)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_fast_in_place_and_views(sector_size):
    key = random_key()
    fast, ref = _engines(key, sector_size)
    for n in (1, 3, 40, 300):
        data = os.urandom(n * sector_size)
        index = 2**32 + 11
        want = ref.encrypt(data, index)
        buf = bytearray(data)
        fast.encrypt_into(buf, buf, index)                       # same object
        assert buf == want
        view = memoryview(buf)
        fast.decrypt_into(view, view, index)                     # same view
        assert buf == data
        # a read-only source and a writable memoryview slice as destination
        big = bytearray(len(data) + 2 * sector_size)
        dst = memoryview(big)[sector_size:sector_size + len(data)]
        fast.encrypt_into(memoryview(bytes(data)), dst, index)
        assert bytes(dst) == want
        assert big[:sector_size] == bytes(sector_size) and big[-sector_size:] == bytes(sector_size)
        # different views of one buffer covering the same bytes count as in place
        fast.decrypt_into(memoryview(big)[sector_size:sector_size + len(data)], dst, index)
        assert bytes(dst) == data


@pytest.mark.parametrize("engine", ["openssl", "reference"])
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_crypt_in_place_matches_encrypt_into(sector_size, engine):
    key = random_key()
    c = xts.XtsCipher(key, sector_size, engine=engine)
    ref = xts.XtsCipher(key, sector_size, engine="reference")
    last = (2**64 - 1) // (sector_size // 512)
    for n in (1, 2, 7, xts.BULK_MIN_SECTORS * 512 // sector_size + 1):
        for index in (0, 2**32 - 1, last - n + 1):
            data = os.urandom(n * sector_size)
            big = bytearray(sector_size) + bytearray(data) + bytearray(sector_size)
            view = memoryview(big)[sector_size:-sector_size]     # a slice, as the backend has
            c.crypt_in_place(view, index, True)
            assert bytes(view) == bytes(ref.encrypt(data, index)), (n, index)
            assert big[:sector_size] == bytes(sector_size) == big[-sector_size:]
            c.crypt_in_place(view, index, False)
            assert bytes(view) == data


def test_crypt_in_place_refusals():
    c = xts.XtsCipher(random_key(), 512)
    good = memoryview(bytearray(1024))
    for buf, index in [(bytearray(1024), 0),                       # not a memoryview
                       (good.cast("Q"), 0),                         # not bytes
                       (memoryview(bytes(1024)), 0),                # read-only
                       (memoryview(bytearray(2048))[::2], 0),       # not contiguous
                       (good[:1000], 0),                            # not whole sectors
                       (good, -1), (good, 2**64 - 1), (good, 1.0), (good, True)]:
        with pytest.raises(errors.InvalidInput):
            c.crypt_in_place(buf, index, True)
    assert good == bytearray(1024)
    c.crypt_in_place(good, 2**64 - 2, True)                         # the last two sectors
    c.wipe()
    with pytest.raises(errors.StateError):
        c.crypt_in_place(good, 0, True)


def test_fast_refuses_partial_overlap():
    fast = xts.XtsCipher(random_key(), 512, engine="openssl")
    buf = bytearray(4 * 512)
    with pytest.raises(errors.InvalidInput, match="overlap"):
        fast.encrypt_into(memoryview(buf)[:1024], memoryview(buf)[512:1536], 0)
    assert buf == bytearray(4 * 512)


def test_fast_refuses_non_contiguous():
    fast = xts.XtsCipher(random_key(), 512, engine="openssl")
    buf = bytearray(4096)
    with pytest.raises(errors.InvalidInput, match="contiguous"):
        fast.encrypt_into(memoryview(buf)[::2], bytearray(2048), 0)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_threads_agree_with_reference(sector_size):
    """Several threads share one cipher, each with its own buffers."""
    import threading
    key = random_key()
    fast, ref = _engines(key, sector_size)
    n_sectors = 64 if sector_size == 512 else 8
    jobs = []
    for t in range(6):
        data = os.urandom(n_sectors * sector_size)
        index = 2**32 - 3 + t * 1000
        jobs.append((data, index, bytes(ref.encrypt(data, index))))
    failures = []

    def worker(data, index, want):
        try:
            out = bytearray(len(data))
            for round_no in range(40):
                fast.encrypt_into(data, out, index)
                if out != want:
                    failures.append(("enc", index, round_no))
                fast.decrypt_into(out, out, index)
                if out != data:
                    failures.append(("dec", index, round_no))
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []


def test_wipe_frees_contexts_of_all_workers():
    c = xts.XtsCipher(random_key(), 512, engine="openssl")
    engine = c._engine
    c.encrypt(bytes(512 * xts.BULK_MIN_SECTORS), 1)   # a worker with bulk scratch
    busy = engine._idle.pop()              # as if a request were still running on it
    c.encrypt(bytes(512), 1)               # so this request needs a second worker
    engine._idle.append(busy)
    workers = list(engine._workers)
    assert len(workers) == 2 and all(st.ctxs for st in workers)
    assert any(st.scratch is not None for st in workers)
    c.wipe()
    assert all(not st.ctxs and st.scratch is None for st in workers)
    with pytest.raises(errors.StateError):
        c.encrypt(bytes(512), 0)


def test_wipe_during_a_request_frees_its_worker_when_it_returns(monkeypatch):
    """wipe() does not free a context under a running request: that request
    finishes correctly with it, and its worker is freed as it is returned."""
    import threading
    key = random_key()
    fast, ref = _engines(key, 4096)
    lib = xts.libcrypto()
    inside, go_on = threading.Event(), threading.Event()
    real_update = lib.update

    def slow_update(*args):
        inside.set()
        go_on.wait(10)
        return real_update(*args)

    data = os.urandom(2 * 4096)
    result = []
    monkeypatch.setattr(lib, "update", slow_update)
    th = threading.Thread(target=lambda: result.append(bytes(fast.encrypt(data, 3))))
    th.start()
    assert inside.wait(10)
    engine = fast._engine
    (busy,) = engine._workers
    fast.wipe()
    assert busy.ctxs                                 # still in use: not freed under it
    go_on.set()
    th.join(10)
    monkeypatch.setattr(lib, "update", real_update)
    assert result == [bytes(ref.encrypt(data, 3))]
    assert not busy.ctxs and not busy.xts            # freed on return
    with pytest.raises(errors.StateError):
        fast.encrypt(data, 3)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_per_sector_path_with_and_without_the_live_iv(monkeypatch, sector_size):
    """Both ways of setting the tweak (written into the context's IV, or
    EVP_CipherInit_ex per sector) give the reference bytes."""
    lib = xts.libcrypto()
    assert lib.live_iv_works            # OpenSSL 3 on these machines: the fast way
    key = random_key()
    rng = random.Random(sector_size)
    for live in (True, False):
        monkeypatch.setattr(lib, "live_iv_works", live)
        fast, ref = _engines(key, sector_size)
        for _ in range(50):
            n = rng.randint(1, 6)
            index = rng.choice([0, rng.randrange(2**32 - 8, 2**32 + 8),
                                (2**64 - 1) // (sector_size // 512) - n + 1])
            data = os.urandom(n * sector_size)
            want = ref.encrypt(data, index)
            assert fast.encrypt(data, index) == want, (live, n, index)
            assert fast.decrypt(want, index) == data, (live, n, index)
        (worker,) = fast._engine._workers
        assert all((iv is not None) == live for _, iv in worker.xts.values())


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_workers_are_pooled_not_kept_per_thread(sector_size):
    """Regression (nbdkit RSS grew with every request): nbdkit's Python plugin
    runs each callback in a fresh Python thread state, so anything kept per
    thread lives for one request.  Many short-lived threads, one after the
    other, must reuse one worker (contexts and scratch), not make one each."""
    import threading
    key = random_key()
    fast, ref = _engines(key, sector_size)
    small = os.urandom(sector_size)
    bulk_bytes = -(-xts.BULK_MIN_SECTORS * 512 // sector_size) * sector_size
    large = os.urandom(bulk_bytes + 3 * sector_size)    # the bulk path for 512
    want_small, want_large = bytes(ref.encrypt(small, 5)), bytes(ref.encrypt(large, 9))
    results = []

    def one_request(i):
        if i % 2:
            results.append(bytes(fast.encrypt(small, 5)) == want_small)
        else:
            results.append(bytes(fast.encrypt(large, 9)) == want_large)

    for i in range(200):
        th = threading.Thread(target=one_request, args=(i,))
        th.start()
        th.join()
    assert results == [True] * 200
    assert len(fast._engine._workers) == 1


def test_concurrent_requests_use_at_most_one_worker_each():
    """Workers never serve two requests at once, and the pool does not grow
    beyond the number of requests that ran concurrently."""
    import threading
    key = random_key()
    fast, ref = _engines(key, 512)
    data = os.urandom(600 * 512)           # bulk path: releases the GIL, so requests overlap
    want = bytes(ref.encrypt(data, 77))
    failures = []
    start = threading.Barrier(8)

    def worker():
        start.wait()
        for _ in range(10):
            if bytes(fast.encrypt(data, 77)) != want:
                failures.append("WRONG")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []
    engine = fast._engine
    assert 1 <= len(engine._workers) <= 8
    assert sorted(map(id, engine._idle)) == sorted(map(id, engine._workers))


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_wipe_while_threads_encrypt(sector_size):
    """wipe() during concurrent requests: each request either completes
    correctly or raises StateError; never a crash or a wrong result."""
    import threading
    import time
    key = random_key()
    fast, ref = _engines(key, sector_size)
    data = os.urandom((40 if sector_size == 512 else 4) * sector_size)
    want = bytes(ref.encrypt(data, 99))
    outcomes = []
    deadline = time.monotonic() + 20
    running = [threading.Event() for _ in range(3)]   # set after a worker's first request

    def worker(running):
        out = bytearray(len(data))
        while time.monotonic() < deadline:
            try:
                fast.encrypt_into(data, out, 99)
            except errors.StateError:
                outcomes.append("wiped")
                return
            outcomes.append("ok" if out == want else "WRONG")
            running.set()

    threads = [threading.Thread(target=worker, args=(ev,)) for ev in running]
    for th in threads:
        th.start()
    assert all(ev.wait(10) for ev in running)         # all three are encrypting now
    fast.wipe()
    for th in threads:
        th.join()
    assert "WRONG" not in outcomes
    assert outcomes.count("wiped") == 3


def test_falls_back_to_reference_without_libcrypto(monkeypatch):
    monkeypatch.setattr(evp, "_LIBCRYPTO", None)      # as if libcrypto failed to load
    key = random_key()
    c = xts.XtsCipher(key, 4096)
    assert c.engine_name == "reference"
    data = os.urandom(2 * 4096)
    assert bytes(c.encrypt(data, 2**33)) == pyca_buffer(key.reveal(), 4096, 2**33, data)
    with pytest.raises(errors.EnvironmentProblem, match="libcrypto"):
        xts.XtsCipher(key, 4096, engine="openssl")
