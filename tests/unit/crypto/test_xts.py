"""Tests of the AES-256-XTS sector cipher (blockcrypt/crypto/xts/ and the
compiled engine, Xts of blockcrypt/crypto/_datapath_src/xts.c).

Known answers come from IEEE 1619-2007 Annex B (tests/data/xts/) and NIST CAVP
XTSGenAES256, complete, from the PyPI package cryptography-vectors.  The
cipher is also checked against pyca's XTS per sector, against the openssl
command line (its AES-256-ECB composed with the IEEE 1619 equations written out
in plain Python, because OpenSSL 3.0's `openssl enc` refuses XTS), and the
compiled engine against the reference engine on thousands of random requests,
in place, from several threads, and across wipe().
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
from blockcrypt.crypto import compiled, xts
from blockcrypt.crypto.compiled import datapath
from blockcrypt.crypto.secret import Secret

from support.cli import REPO
from support.prereq import require, require_tools

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


def _nist_file() -> Path:
    import cryptography_vectors
    return (Path(cryptography_vectors.__file__).parent / "ciphers" / "AES" / "XTS"
            / "tweak-128hexstr" / "XTSGenAES256.rsp")


def _nist_records() -> list[dict[str, str]]:
    """Every record of NIST's XTSGenAES256.rsp, tagged with its section."""
    out, section = [], None
    for block in _nist_file().read_text().split("\n\n"):
        for line in block.splitlines():
            if line.strip() in ("[ENCRYPT]", "[DECRYPT]"):
                section = line.strip()[1:-1]
        recs = _records_text(block)
        for r in recs:
            r["section"] = section
        out += recs
    return out


def _records_text(text: str) -> list[dict[str, str]]:
    fields = {}
    for line in text.splitlines():
        if line.startswith("#") or " = " not in line:
            continue
        name, value = line.split(" = ", 1)
        fields[name.strip()] = value.strip()
    return [fields] if fields else []


IEEE = _records(DATA / "ieee1619-2007-annexB-aes256.txt")
NIST_ALL = _nist_records()
# OpenSSL's (and pyca's) XTS works on whole bytes: the 140- and 250-bit data
# units of the file (400 of its 1000 records) cannot be expressed and are left
# out; the 256- and 384-bit ones (600 records) all run.
NIST = [r for r in NIST_ALL if int(r["DataUnitLen"]) % 8 == 0]


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


ENGINES = ["compiled", "reference"]


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
    for engine in ENGINES:
        c = xts.XtsCipher(Secret(key), 512, engine=engine)
        assert c.engine_name == engine
        assert bytes(c.encrypt(pt, seq_no)) == ct
        assert bytes(c.decrypt(ct, seq_no)) == pt
        # ... as the second sector of a two-sector request,
        two = c.encrypt(bytes(512) + pt, seq_no - 1)
        assert bytes(two[512:]) == ct
        # ... and as sector 25 of a 60-sector request, in place.
        many = bytearray(os.urandom(60 * 512))
        many[25 * 512:26 * 512] = pt
        c.encrypt_into(many, many, seq_no - 25)
        assert bytes(many[25 * 512:26 * 512]) == ct
        c.decrypt_into(many, many, seq_no - 25)
        assert bytes(many[25 * 512:26 * 512]) == pt


def test_nist_file_is_complete():
    """The whole CAVP file is read: 1000 records, 500 per direction, and the
    600 whole-byte ones are what runs."""
    assert len(NIST_ALL) == 1000
    assert sum(r["section"] == "ENCRYPT" for r in NIST_ALL) == 500
    assert {int(r["DataUnitLen"]) for r in NIST_ALL} == {140, 250, 256, 384}
    assert len(NIST) == 600 and {int(r["DataUnitLen"]) for r in NIST} == {256, 384}


def test_nist_xtsgenaes256_all_whole_byte_vectors():
    """All 600 whole-byte NIST vectors (32- and 48-byte data units, arbitrary
    128-bit tweaks) through pyca (the reference engine's unit function) and
    through the compiled engine's EVP calls (Xts.crypt_unit: the same keyed
    context, per-unit IV and update as its sector loop).  ENCRYPT records are
    checked PT -> CT, DECRYPT records CT -> PT.  No sector size fits these
    units, so the sector paths get the IEEE vectors and pyca/openssl checks."""
    dp = datapath()
    failures = []
    for r in NIST:
        key = bytes.fromhex(r["Key"])
        tweak16 = bytes.fromhex(r["i"])
        pt, ct = bytes.fromhex(r["PT"]), bytes.fromhex(r["CT"])
        assert len(pt) * 8 == int(r["DataUnitLen"])
        engine = dp.Xts(key, 512)
        if r["section"] == "ENCRYPT":
            got = (xts.xts_encrypt_unit(key, tweak16, pt), engine.crypt_unit(tweak16, pt, True))
            want = ct
        else:
            got = (xts.xts_decrypt_unit(key, tweak16, ct), engine.crypt_unit(tweak16, ct, False))
            want = pt
        engine.wipe()
        if got != (want, want):
            failures.append(r["COUNT"] + r["section"])
    assert failures == []


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


@pytest.mark.parametrize("engine", ENGINES)
def test_wipe_zeroes_own_copy_and_disables(engine):
    key = random_key()
    c = xts.XtsCipher(key, 4096, engine=engine)
    own = c.xts if engine == "compiled" else c._key
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


# -- compiled engine vs reference -----------------------------------------------------

def _engines(key: Secret, sector_size: int):
    fast = xts.XtsCipher(key, sector_size, engine="compiled")
    ref = xts.XtsCipher(key, sector_size, engine="reference")
    assert (fast.engine_name, ref.engine_name) == ("compiled", "reference")
    return fast, ref


def test_auto_engine_is_compiled_here():
    """`pip install` built the extension: the compiled engine is the default."""
    assert datapath() is not None
    assert xts.XtsCipher(random_key(), 512).engine_name == "compiled"


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_compiled_matches_reference_on_random_requests(sector_size):
    """Thousands of random (sector_index, n_sectors) pairs, both directions."""
    rng = random.Random(7 + sector_size)
    key = random_key()
    fast, ref = _engines(key, sector_size)
    step = sector_size // 512
    last = (2**64 - 1) // step
    pool = os.urandom(1100 * 512 if sector_size == 512 else 12 * 4096)
    max_sectors = len(pool) // sector_size
    for _ in range(2000 if sector_size == 4096 else 1200):
        if rng.random() < 0.05:
            n = min(max_sectors, rng.choice([max_sectors, max_sectors - 1, 64, 65]))
        else:
            n = min(max_sectors, rng.randint(1, 150 if rng.random() < 0.2 else 8))
        index = rng.choice([rng.randrange(2**16), rng.randrange(2**32 - 300, 2**32 + 300),
                            rng.randrange(2**33, 2**50), rng.randrange(last - n + 1),
                            last - n + 1])
        start = rng.randrange(0, max_sectors - n + 1) * sector_size
        data = pool[start:start + n * sector_size]
        want = ref.encrypt(data, index)
        assert fast.encrypt(data, index) == want, (n, index)
        assert fast.decrypt(want, index) == data, (n, index)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_compiled_in_place_and_views(sector_size):
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_crypt_in_place_matches_encrypt_into(sector_size, engine):
    key = random_key()
    c = xts.XtsCipher(key, sector_size, engine=engine)
    ref = xts.XtsCipher(key, sector_size, engine="reference")
    last = (2**64 - 1) // (sector_size // 512)
    for n in (1, 2, 7, 49):
        for index in (0, 2**32 - 1, last - n + 1):
            data = os.urandom(n * sector_size)
            big = bytearray(sector_size) + bytearray(data) + bytearray(sector_size)
            view = memoryview(big)[sector_size:-sector_size]     # a slice, as the backend has
            c.crypt_in_place(view, index, True)
            assert bytes(view) == bytes(ref.encrypt(data, index)), (n, index)
            assert big[:sector_size] == bytes(sector_size) == big[-sector_size:]
            c.crypt_in_place(view, index, False)
            assert bytes(view) == data


@pytest.mark.parametrize("engine", ENGINES)
def test_crypt_in_place_refusals(engine):
    c = xts.XtsCipher(random_key(), 512, engine=engine)
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


def test_compiled_refuses_partial_overlap():
    fast = xts.XtsCipher(random_key(), 512, engine="compiled")
    buf = bytearray(4 * 512)
    with pytest.raises(errors.InvalidInput, match="overlap"):
        fast.encrypt_into(memoryview(buf)[:1024], memoryview(buf)[512:1536], 0)
    assert buf == bytearray(4 * 512)


def test_compiled_refuses_non_contiguous():
    fast = xts.XtsCipher(random_key(), 512, engine="compiled")
    buf = bytearray(4096)
    with pytest.raises(errors.InvalidInput, match="contiguous"):
        fast.encrypt_into(memoryview(buf)[::2], bytearray(2048), 0)


def test_compiled_key_lives_in_a_locked_dontdump_page():
    """The compiled cipher's key page: mlocked ("lo"), MADV_DONTDUMP ("dd"),
    holding exactly K1 || K2, unmapped once wiped."""
    require(os.geteuid() == 0, "only root may always mlock (no RLIMIT_MEMLOCK)")
    import ctypes

    from test_secret import vm_flags_at
    key = random_key()
    c = xts.XtsCipher(key, 4096)
    addr = c.xts.key_address
    assert c.xts.locked and c.xts.dontdump and addr % 4096 == 0
    # AddressSanitizer's mlock interceptor does nothing (make test-sanitize loads
    # such a build): there only MADV_DONTDUMP shows.
    sanitized = bool(os.environ.get(compiled.OVERRIDE_ENV))
    assert ({"dd"} if sanitized else {"lo", "dd"}) <= vm_flags_at(addr)
    assert ctypes.string_at(addr, 64) == key.reveal()
    c.wipe()
    assert c.xts.key_address is None
    with pytest.raises(AssertionError, match="no mapping"):   # cleansed and unmapped
        vm_flags_at(addr)


def test_compiled_module_checks_its_own_arguments():
    """The extension refuses bad calls itself, whoever calls it."""
    dp = datapath()
    key = os.urandom(64)
    with pytest.raises(ValueError, match="64 bytes"):
        dp.Xts(key[:32], 512)
    with pytest.raises(ValueError, match="halves"):
        dp.Xts(key[:32] * 2, 512)
    with pytest.raises(ValueError, match="sector size"):
        dp.Xts(key, 1024)
    x = dp.Xts(key, 4096)
    with pytest.raises(ValueError, match="multiple"):
        x.crypt(bytes(100), bytearray(100), 0, True)
    with pytest.raises(ValueError, match="destination"):
        x.crypt(bytes(4096), bytearray(8192), 0, True)
    with pytest.raises(BufferError):
        x.crypt(bytes(4096), bytes(4096), 0, True)               # read-only destination
    with pytest.raises(ValueError, match="64-bit"):
        x.crypt(bytes(8192), bytearray(8192), 2**61 - 1, True)
    for beyond in (2**61, 2**63, 2**64 - 1):                  # tweak 8*i would wrap
        with pytest.raises(ValueError, match="64-bit"):
            x.crypt(bytes(4096), bytearray(4096), beyond, True)
    with pytest.raises(OverflowError):
        x.crypt(bytes(4096), bytearray(4096), -1, True)
    x.crypt(bytes(4096), bytearray(4096), 2**61 - 1, True)      # the very last sector
    x.wipe()
    with pytest.raises(dp.WipedError):
        x.crypt(bytes(4096), bytearray(4096), 0, True)
    assert x.wiped and x.key_address is None


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_threads_agree_with_reference(sector_size):
    """Several threads share one cipher, each with its own buffers (the compiled
    engine runs them at once: it releases the GIL)."""
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


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_wipe_while_threads_encrypt(sector_size):
    """wipe() during concurrent requests: each request either completes
    correctly or raises StateError; never a crash or a wrong result (wipe
    waits for running requests before it cleanses the key)."""
    import threading
    import time
    key = random_key()
    fast, ref = _engines(key, sector_size)
    data = os.urandom((40 if sector_size == 512 else 4) * sector_size)
    want = bytes(ref.encrypt(data, 99))
    outcomes = []
    # Generous: under valgrind on a loaded 2-core machine a first request can take
    # seconds; on success the test ends as soon as wipe() has stopped all three.
    deadline = time.monotonic() + 120
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
    assert all(ev.wait(120) for ev in running)        # all three are encrypting now
    fast.wipe()
    for th in threads:
        th.join()
    assert "WRONG" not in outcomes
    assert outcomes.count("wiped") == 3


def test_falls_back_to_reference_with_one_loud_warning(monkeypatch, capsys):
    """Without the extension, "auto" takes the reference engine and says so on
    stderr, once per process; "compiled" refuses with the reason."""
    from blockcrypt.crypto import compiled
    monkeypatch.setattr(compiled, "_module", None)    # as if the import had failed
    monkeypatch.setattr(compiled, "_reason", "ImportError: test")
    monkeypatch.setattr(compiled, "_warned", False)
    key = random_key()
    c = xts.XtsCipher(key, 4096)
    assert c.engine_name == "reference"
    data = os.urandom(2 * 4096)
    assert bytes(c.encrypt(data, 2**33)) == pyca_buffer(key.reveal(), 4096, 2**33, data)
    xts.XtsCipher(key, 512)
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "slower" in err and "ImportError: test" in err
    assert "make install" in err
    with pytest.raises(errors.EnvironmentProblem, match="ImportError: test"):
        xts.XtsCipher(key, 4096, engine="compiled")
