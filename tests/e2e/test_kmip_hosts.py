"""Three hosts, one KMIP key manager (a real PyKMIP server started by the tests).

Hosts are three blockcrypt homes with their own client certificates.  A and B hold
certificates of the identity that owns the key (CN ``tenant-1``; PyKMIP authorises
by the certificate's CN), C one of another identity (``tenant-2``).  B reaches the
server through a relay the test can cut (a network partition).

- A creates a kmip key and an encrypted disk and writes data; the container file
  is copied to B and C; ``disk import`` is refused for a damaged header, a name in
  use and a key whose provider the host does not know, each with its own error;
- B imports, attaches and reads A's data, with exactly one Decrypt on the server;
- C's attach is refused "not authorised by the key manager" naming key and server,
  and audited on C;
- the server unreachable: B's attach fails naming the server;
- the key revoked on the server: new attaches fail on every host, B's attached disk
  keeps serving and ``disk show`` says so;
- at boot, a persistent disk under a kmip key waits (with backoff, reported) for an
  unreachable key manager, with no passphrase, and attaches once it answers.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from blockcrypt import errors

from support.env import Env, dd_read, dd_write
from support.kmip_server import Relay
from support.prereq import require_block_devices

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def _damaged_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        for copy_offset in (0, 512 * 1024):       # both header copies (docs/FORMAT.md F-21)
            f.seek(copy_offset + 100)
            f.write(os.urandom(64))


def test_three_hosts_share_one_key_manager(kmip_server, tmp_path, passphrase_file):
    require_block_devices()
    srv = kmip_server
    hosts: dict[str, Env] = {}
    relay = Relay(srv)
    try:
        for h in "ABC":
            (tmp_path / h).mkdir()
            hosts[h] = Env(tmp_path / h / "home", passphrase_file, tmp_path / h)
        A, B, C = hosts["A"], hosts["B"], hosts["C"]
        a_id = srv.client("host-a-tenant1", "tenant-1")
        b_id = srv.client("host-b-tenant1", "tenant-1")
        c_id = srv.client("host-c-tenant2", "tenant-2")
        A.cli(*srv.provider_args("kms", a_id))
        B.cli(*srv.provider_args("kms", b_id, port=relay.port))
        shown = B.json("provider", "show", "kms")["server"]
        assert shown["reachable"] is True and "1.4" in shown["protocol_versions"]
        assert shown["client_identity"] == "tenant-1"
        assert shown["server"] == f"127.0.0.1:{relay.port}"

        key = A.json("key", "create", "--alias", "shared", "--provider", "kms")
        assert key["provider"] == "kms"
        A.create("vol", "64M", "--key", "shared")
        pattern = os.urandom(MiB)
        dev = A.attach("vol")["device"]
        dd_write(dev, pattern, 0)
        A.detach("vol")
        copy = tmp_path / "vol-from-A.bcd"
        shutil.copyfile(A.json("disk", "show", "vol")["path"], copy)
        A.create("local-vol", "16M")                  # under A's local service key
        local_copy = tmp_path / "local-from-A.bcd"
        shutil.copyfile(A.json("disk", "show", "local-vol")["path"], local_copy)

        # Import refusals on B, each with its own error; nothing is added.
        damaged = tmp_path / "damaged.bcd"
        _damaged_copy(copy, damaged)
        assert "both header copies" in B.refused(errors.ChecksumMismatch, "disk", "import",
                                                 "vol", damaged)
        B.create("taken", "16M", "--no-encrypted")
        assert "'taken' already exists" in B.refused(errors.AlreadyExists, "disk", "import",
                                                     "taken", copy)
        msg = B.refused(errors.KeyProviderUnknown, "disk", "import", "lv", local_copy)
        assert "local provider that this host does not know" in msg
        # C has no kmip provider yet: its import of A's kmip disk says what to add.
        msg = C.refused(errors.KeyProviderUnknown, "disk", "import", "vol", copy)
        assert key["id"] in msg and "provider add NAME --type kmip" in msg
        assert [d["name"] for d in B.json("disk", "list")] == ["taken"]
        assert [d["name"] for d in C.json("disk", "list")] == []

        # B imports and reads A's data; one attach is one Decrypt on the server.
        B.json("disk", "import", "vol", copy)
        assert B.json("key", "show", key["id"])["origin"] == "shared"
        before = srv.decrypt_count()
        dev_b = B.attach("vol")["device"]
        assert srv.decrypt_count() - before == 1
        assert dd_read(dev_b, MiB, 0) == pattern

        # C: another identity; the key manager refuses, C says so and audits it.
        C.cli(*srv.provider_args("kms", c_id))
        C.json("disk", "import", "vol", copy)
        msg = C.refused(errors.KeyManagerNotAuthorised, "disk", "attach", "vol")
        assert "not authorised by the key manager" in msg
        assert key["id"] in msg and srv.address in msg and "tenant-2" in msg
        refused = [r for r in C.json("audit", "--key", key["id"])
                   if r["operation"] == "decrypt" and r["result"] == "refused"]
        assert refused and "KeyManagerNotAuthorised" in refused[-1]["error"]
        C.json("audit", "verify")

        # B cut off from the server: its attach fails naming the server.
        B.detach("vol")
        relay.cut = True
        msg = B.refused(errors.ProviderUnavailable, "disk", "attach", "vol")
        assert f"127.0.0.1:{relay.port}" in msg and "kms" in msg
        assert B.json("disk", "show", "vol")["key"]["usable"] is False
        relay.cut = False
        dev_b = B.attach("vol")["device"]

        # Revoked on the server behind blockcrypt's back: no new attach anywhere, the
        # attached disk keeps serving, and `disk show` says so.
        uid = A.rows("kms_key_versions")[0][3].decode()
        admin = srv.admin(a_id)
        try:
            from kmip.core import enums
            admin.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, uid,
                         compromise_occurrence_date=1)
        finally:
            admin.close()
        assert dd_read(dev_b, MiB, 0) == pattern
        show = B.json("disk", "show", "vol")
        assert show["state"] == "attached" and show["key"]["usable"] is False
        assert "keeps serving until it is detached" in show["key"]["note"]
        assert show["key"]["server_states"] == {"1": "COMPROMISED"}
        msg = A.refused(errors.KeyManagerStateError, "disk", "attach", "vol")
        assert "revoked (Compromised)" in msg and srv.address in msg
        assert "keeps serving until it is detached" in B.cli("disk", "show", "vol").stdout.decode()
        B.detach("vol")
        B.refused(errors.KeyManagerStateError, "disk", "attach", "vol")
    finally:
        relay.close()
        for e in hosts.values():
            e.cleanup()


def test_persistent_disk_waits_for_an_unreachable_key_manager(kmip_server, tmp_path,
                                                               passphrase_file):
    """At boot the key manager may not be reachable yet (network still coming up):
    `disk attach --all-persistent --wait` (what the boot unit runs) reports the disk as
    waiting, naming the server, retries with backoff, and attaches it once the server
    answers, with its data."""
    import subprocess
    import sys

    from support.wait import wait_for
    require_block_devices()
    srv = kmip_server
    relay = Relay(srv)
    home = tmp_path / "home"
    env = Env(home, passphrase_file, tmp_path)
    try:
        env.cli(*srv.provider_args("kms", srv.client("host-boot", "tenant-3"),
                                   port=relay.port))
        env.cli("key", "create", "--alias", "boot-key", "--provider", "kms")
        env.create("bootdisk", "64M", "--key", "boot-key")
        dev = env.attach("bootdisk", "--persistent")["device"]
        data = os.urandom(MiB)
        dd_write(dev, data, 3 * MiB)
        env.detach("bootdisk")

        relay.cut = True                             # the key manager is unreachable
        # The unit that runs before the network leaves a disk under a KMIP key alone:
        # the network unit attaches it.
        cp = env.cli("disk", "attach", "--all-persistent", "--local", "--wait", "120")
        assert cp.stdout.decode().strip() == "no persistent disks to attach"
        log = tmp_path / "boot.stderr"
        # No passphrase: a kmip key needs none at boot (the unit passes none).
        argv = [sys.executable, "-m", "blockcrypt", "--home", str(home), "disk", "attach",
                "--all-persistent", "--network", "--wait", "120"]
        with open(log, "wb") as err:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=err, start_new_session=True)
        try:
            wait_for(lambda: b"waiting: disk bootdisk" in log.read_bytes(), 60,
                     "the boot attach to report that bootdisk waits for its key manager")
            assert f"127.0.0.1:{relay.port}" in log.read_text()
            assert {d["name"]: d["state"] for d in env.json("disk", "list")} == {
                "bootdisk": "available"}
            relay.cut = False                        # the network comes up
            out, _ = p.communicate(timeout=150)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, log.read_text()
        assert b"attached disk bootdisk" in out
        shown = env.json("disk", "show", "bootdisk")
        assert shown["state"] == "attached"
        assert dd_read(shown["device"], MiB, 3 * MiB) == data
        env.detach("bootdisk")
    finally:
        relay.cut = False
        relay.close()
        env.cleanup()
