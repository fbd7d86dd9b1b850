"""The kmip key provider (blockcrypt/kms/kmip/) against the session's real PyKMIP server.

- ``provider add`` refuses a client key file others can read (naming the file and
  the chmod), missing or relative options, a wrong CA and a server that is not
  there, each changing nothing; ``provider show`` reports the server's identity,
  protocol versions and reachability;
- a key version is an activated AES-256 object on the server, named after the key;
  the catalog holds only its uid; the blob carries the uid in its authenticated header;
- state changed behind blockcrypt's back (revoked, destroyed) and a host of another
  identity are reported with their own errors and audited;
- a server that would not bind the AAD is refused (error mapping, with the
  server's answers replaced: PyKMIP itself binds it).
"""
from __future__ import annotations

import json
import os

import pytest

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import envelope
from blockcrypt.kms.kmip import protocol
from blockcrypt.kms.kmip.backend import KmipBackend
from blockcrypt.kms.kmip.config import KmipConfig
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage.home import Home

from support.cli import run_cli

PASS = b"kmip test passphrase"
CTX = {"container_uid": "ab" * 16, "cmk_id": "k"}


@pytest.fixture
def home(tmp_path, passphrase_file):
    h = tmp_path / "home"
    run_cli("init", home=h, passphrase_file=passphrase_file)
    return h


def cli(home, passphrase_file, *args, check=True):
    return run_cli(*args, home=home, passphrase_file=passphrase_file, check=check)


def refused(home, passphrase_file, error, *args) -> str:
    cp = cli(home, passphrase_file, *args, check=False)
    assert cp.returncode == error.exit_code, (cp.returncode, cp.stderr.decode())
    return cp.stderr.decode()


def providers(home, passphrase_file) -> list[str]:
    return [p["name"] for p in json.loads(cli(home, passphrase_file, "provider", "list",
                                              "--json").stdout)]


def test_provider_add_refusals_change_nothing(kmip_server, home, passphrase_file, tmp_path):
    srv = kmip_server
    who = srv.client("host-a")
    loose = tmp_path / "loose.key"
    loose.write_bytes(who.key.read_bytes())
    loose.chmod(0o644)
    args = srv.provider_args("kms", who)
    bad_key = args[:args.index("--key") + 1] + [str(loose)]
    msg = refused(home, passphrase_file, errors.ClientKeyFileError, *bad_key)
    assert str(loose) in msg and f"chmod 600 {loose}" in msg and "'kms'" in msg
    no_host = [a for i, a in enumerate(args) if a != "--host" and args[i - 1] != "--host"]
    assert "needs --host" in refused(home, passphrase_file, errors.InvalidInput, *no_host)
    missing = args[:args.index("--ca") + 1] + [str(tmp_path / "nope.crt")] \
        + args[args.index("--ca") + 2:]
    assert f"--ca {tmp_path / 'nope.crt'}: no such file" in refused(
        home, passphrase_file, errors.InvalidInput, *missing)
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(who.cert.read_bytes())          # not the CA that signed the server
    wrong_ca = args[:args.index("--ca") + 1] + [str(other_ca)] + args[args.index("--ca") + 2:]
    msg = refused(home, passphrase_file, errors.ProviderUnavailable, *wrong_ca)
    assert srv.address in msg and "'kms'" in msg
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                         # bound, not listening: refused
        msg = refused(home, passphrase_file, errors.ProviderUnavailable,
                      *srv.provider_args("kms", who, port=port))
    assert f"127.0.0.1:{port}" in msg and "cannot reach the KMIP server" in msg
    assert providers(home, passphrase_file) == ["local"]


def test_provider_show_and_keys_on_the_server(kmip_server, home, passphrase_file):
    srv = kmip_server
    who = srv.client("host-a")
    cli(home, passphrase_file, *srv.provider_args("kms", who))
    show = json.loads(cli(home, passphrase_file, "provider", "show", "kms", "--json").stdout)
    s = show["server"]
    assert s["reachable"] is True and s["server"] == srv.address
    assert s["server_identity"] == "CN=localhost" and "1.4" in s["protocol_versions"]
    assert s["protocol_version_used"] == "1.4" and s["client_identity"] == "host-a"
    assert s["vendor"].startswith("PyKMIP")
    text = cli(home, passphrase_file, "provider", "show", "kms").stdout.decode()
    assert "Reachable          yes" in text and "KMIP 1.4" in text
    key = json.loads(cli(home, passphrase_file, "key", "create", "--alias", "k", "--provider",
                         "kms", "--json").stdout)
    cli(home, passphrase_file, "key", "rotate", "k")
    with KeyStore.open(Home(home), lambda: Secret(PASS)) as ks:
        uids = [bytes(r[0]).decode() for r in ks.conn.execute(
            "SELECT material FROM kms_key_versions WHERE key_id = ? ORDER BY version",
            (key["id"],))]
        dk, blob = ks.generate_data_key("k", CTX)
        with dk, ks.decrypt_data_key(blob, CTX) as again:
            assert again.reveal() == dk.reveal()
    parsed = envelope.parse_wrapped(blob)
    assert (parsed.algorithm, parsed.key_version, parsed.server_ref) == (3, 2, uids[1])
    admin = srv.admin(who)
    try:
        for version, uid in enumerate(uids, 1):
            _, attrs = admin.get_attributes(uid, ["State", "Name", "Cryptographic Length"])
            got = {a.attribute_name.value: a.attribute_value for a in attrs}
            assert got["State"].value.name == "ACTIVE"
            assert got["Cryptographic Length"].value == 256
            assert got["Name"].name_value.value == f"blockcrypt:{key['id']}:v{version}"
    finally:
        admin.close()
    # Another uid in the blob's (authenticated) header does not open it.
    at = 7 + len(key["id"]) + 4 + 1                   # the uid field (kms/envelope.py)
    assert blob[at:at + len(uids[1])] == uids[1].encode()
    forged = blob[:at] + b"9" * len(uids[1]) + blob[at + len(uids[1]):]
    with KeyStore.open(Home(home), lambda: Secret(PASS)) as ks, \
            pytest.raises(errors.UnwrapError):
        ks.decrypt_data_key(forged, CTX)


def test_state_changed_behind_blockcrypts_back_is_reported(kmip_server, tmp_path):
    srv = kmip_server
    who, other = srv.client("host-a"), srv.client("host-z", "someone-else")
    h = Home(tmp_path / "home")
    KeyStore.init(h, Secret(PASS))
    with KeyStore.open(h, lambda: Secret(PASS)) as ks:
        ks.add_provider("kms", "kmip", **srv.provider_options(who))
        key = ks.create_key(alias="k", provider="kms")
        ks.rotate("k")
        blobs = {}
        dk, blobs[2] = ks.generate_data_key("k", CTX)       # wrapped by version 2
        dk.wipe()
        uids = [bytes(r[0]).decode() for r in ks.conn.execute(
            "SELECT material FROM kms_key_versions WHERE key_id = ? ORDER BY version",
            (key["id"],))]
        assert ks.key_health("k")["server_states"] == {1: "ACTIVE", 2: "ACTIVE"}
    from kmip.core import enums
    admin = srv.admin(who)
    try:
        admin.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uids[1])
    finally:
        admin.close()
    with KeyStore.open(h, lambda: Secret(PASS)) as ks:
        with pytest.raises(errors.KeyManagerStateError) as e:
            ks.decrypt_data_key(blobs[2], CTX)
        assert "version 2 is revoked (Deactivated)" in e.value.message
        assert srv.address in e.value.message and key["id"] in e.value.message
        with pytest.raises(errors.KeyManagerStateError):
            ks.generate_data_key("k", CTX)
        assert ks.key_health("k")["server_states"] == {1: "ACTIVE", 2: "DEACTIVATED"}
        rec = ks.audit_records(key="k")[-1]
        assert rec["result"] == "refused" and "KeyManagerStateError" in rec["error"]
    admin = srv.admin(who)
    try:
        admin.destroy(uids[1])
    finally:
        admin.close()
    with KeyStore.open(h, lambda: Secret(PASS)) as ks:
        with pytest.raises(errors.KeyManagerStateError, match="destroyed or missing"):
            ks.decrypt_data_key(blobs[2], CTX)
        assert ks.key_health("k")["server_states"][2] == "MISSING"
        # The same key's blob, asked for by a host of another identity.
    h2 = Home(tmp_path / "other")
    KeyStore.init(h2, Secret(PASS))
    with KeyStore.open(h2, lambda: Secret(PASS)) as ks:
        ks.add_provider("kms", "kmip", **srv.provider_options(other))
        dk, blob = None, None
        with KeyStore.open(h, lambda: Secret(PASS)) as mine:
            mine.rotate("k")
            dk, blob = mine.generate_data_key("k", CTX)
            dk.wipe()
        ks.adopt_key(blob)
        with pytest.raises(errors.KeyManagerNotAuthorised) as e:
            ks.decrypt_data_key(blob, CTX)
        assert "'someone-else'" in e.value.message and srv.address in e.value.message
        assert ks.audit_records()[-1]["result"] == "refused"


# -- a server that does not bind the AAD (its answers replaced) ------------------------------

class _Answer:
    def __init__(self, data, auth_tag, iv=None):
        self.data, self.auth_tag, self.iv_counter_nonce = data, auth_tag, iv


def test_a_server_that_drops_the_tag_is_refused(kmip_server, monkeypatch):
    srv = kmip_server
    backend = KmipBackend("kms", KmipConfig(**srv.provider_options(srv.client("host-a"))))
    uid = backend.new_material("k", 1).decode()
    monkeypatch.setattr(protocol.Connection, "_call",
                        lambda self, fn, retry: _Answer(b"x" * 64, None))
    with Secret(os.urandom(64)) as dk, pytest.raises(errors.ContextBindingUnsupported) as e:
        backend.wrap("k", 1, uid.encode(), dk, CTX)
    assert "without a 16-byte authentication tag" in e.value.message
    assert "never wraps a data key without binding" in e.value.message


def test_a_server_below_kmip_1_4_is_refused(kmip_server, monkeypatch):
    srv = kmip_server
    backend = KmipBackend("kms", KmipConfig(**srv.provider_options(srv.client("host-a"))))
    monkeypatch.setattr(protocol.Connection, "server_info",
                        lambda self: {"vendor": "old", "protocol_versions": ["1.2", "1.1"],
                                      "peer_subject": "CN=old"})
    with pytest.raises(errors.ContextBindingUnsupported, match="needs KMIP 1.4"):
        backend.check()


def test_a_server_that_ignores_the_aad_is_refused(kmip_server, monkeypatch):
    srv = kmip_server
    backend = KmipBackend("kms", KmipConfig(**srv.provider_options(srv.client("host-a"))))
    real = protocol.Connection.decrypt_gcm
    monkeypatch.setattr(protocol.Connection, "decrypt_gcm",
                        lambda self, uid, iv, ct, tag, aad: real(self, uid, iv, ct, tag,
                                                                 backend_probe_aad()))
    with pytest.raises(errors.ContextBindingUnsupported, match="under the wrong additional"):
        backend.check()
    backend.close()


def backend_probe_aad() -> bytes:
    from blockcrypt.kms.kmip.backend import PROBE_AAD
    return PROBE_AAD
