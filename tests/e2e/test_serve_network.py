"""`disk serve` over TCP authenticates every client (issue 12, items 1-2).

Real nbdkit started by `blockcrypt disk serve`, real libnbd clients (nbdinfo):

- certificate mode: a client without a certificate, and one whose certificate
  comes from another CA, are refused during the TLS handshake; a client whose
  certificate the directory's CA signed reads the disk;
- PSK mode: only an identity listed in the PSK file, with its key, gets in;
- plain TCP needs --insecure-plaintext-tcp (loopback only) and warns on stderr.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from blockcrypt import errors

from support.env import Env
from support.prereq import require_tools
from support.serve import start_serve
from support.tls import CA, client_dir, server_dir

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbdinfo_size(uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=60)


def stop(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=30)
    err = p.stderr.read().decode()
    assert rc == 0, err
    return err


def test_certificate_mode_admits_only_clients_with_a_certificate_from_its_ca(env: Env, tmp_path):
    require_tools("nbdinfo")
    env.create("crt", "64M")
    ca, other_ca = CA("blockcrypt test CA"), CA("someone else's CA")
    certs = server_dir(tmp_path / "server", ca,
                       ca.issue("localhost", server=True, dns=("localhost",),
                                ips=("127.0.0.1",)))
    good = client_dir(tmp_path / "good", ca, ca.issue("client-a", server=False))
    foreign = client_dir(tmp_path / "foreign", ca, other_ca.issue("client-a", server=False))
    no_cert = client_dir(tmp_path / "nocert", ca, None)
    port = free_port()
    p, info = start_serve(env, "crt", "--tcp", f"127.0.0.1:{port}", "--tls-certificates",
                          str(certs))
    try:
        assert info["tls"] is True
        base = f"nbds://127.0.0.1:{port}/crt"
        # No certificate at all (the attack of issue 12 item 1: the server's is not
        # even checked), and one signed by another CA: refused in the handshake.
        for uri in (f"{base}?tls-verify-peer=false", f"{base}?tls-certificates={no_cert}",
                    f"{base}?tls-certificates={foreign}"):
            cp = nbdinfo_size(uri)
            assert cp.returncode != 0 and cp.stdout == b"", (uri, cp.stdout, cp.stderr)
        # Plaintext is refused too (--tls=require).
        cp = nbdinfo_size(f"nbd://127.0.0.1:{port}/crt")
        assert cp.returncode != 0 and cp.stdout == b""
        # The client whose certificate the CA signed reads and writes the disk.
        uri = f"{base}?tls-certificates={good}"
        assert int(nbdinfo_size(uri).stdout) == 64 * MiB
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(MiB))
        subprocess.run(["nbdcopy", str(src), uri], check=True, capture_output=True, timeout=60)
        back = subprocess.run(["nbdcopy", uri, "-"], check=True, capture_output=True,
                              timeout=60).stdout
        assert back[:MiB] == src.read_bytes()
        argv = open(f"/proc/{info['nbdkit_pid']}/cmdline", "rb").read().split(b"\0")
        assert b"--tls-verify-peer" in argv and b"--tls=require" in argv
    finally:
        stop(p)


def test_certificate_mode_restricted_to_named_clients_by_revocation(env: Env, tmp_path):
    """nbdkit 1.32 has no subject-name filter: the allowed clients are those the CA
    signed, minus those its ca-crl.pem revokes (README, Serving over the network)."""
    require_tools("nbdinfo")
    env.create("crl", "64M")
    ca = CA("blockcrypt test CA")
    alice, bob = ca.issue("alice", server=False), ca.issue("bob", server=False)
    certs = server_dir(tmp_path / "server", ca,
                       ca.issue("localhost", server=True, dns=("localhost",),
                                ips=("127.0.0.1",)))
    (certs / "ca-crl.pem").write_bytes(ca.crl_pem(bob))
    port = free_port()
    p, _ = start_serve(env, "crl", "--tcp", f"127.0.0.1:{port}", "--tls-certificates",
                       str(certs))
    try:
        base = f"nbds://127.0.0.1:{port}/crl?tls-certificates="
        ok = nbdinfo_size(base + str(client_dir(tmp_path / "alice", ca, alice)))
        assert int(ok.stdout) == 64 * MiB, ok.stderr
        cp = nbdinfo_size(base + str(client_dir(tmp_path / "bob", ca, bob)))
        assert cp.returncode != 0 and cp.stdout == b"", cp.stdout
    finally:
        stop(p)


def test_psk_mode_admits_only_identities_in_the_file(env: Env, tmp_path):
    require_tools("nbdinfo")
    env.create("psk", "64M")
    psk = tmp_path / "keys.psk"
    psk.touch(mode=0o600)
    psk.write_text(f"alice:{os.urandom(32).hex()}\n")
    mallory = tmp_path / "mallory.psk"
    mallory.touch(mode=0o600)
    mallory.write_text(f"alice:{os.urandom(32).hex()}\nmallory:{os.urandom(32).hex()}\n")
    port = free_port()
    p, _ = start_serve(env, "psk", "--tcp", f"127.0.0.1:{port}", "--tls-psk", str(psk))
    try:
        base = f"127.0.0.1:{port}/psk"
        assert int(nbdinfo_size(f"nbds://alice@{base}?tls-psk-file={psk}").stdout) == 64 * MiB
        for uri in (f"nbds://alice@{base}?tls-psk-file={mallory}",     # wrong key
                    f"nbds://mallory@{base}?tls-psk-file={mallory}",   # unknown identity
                    f"nbd://{base}"):                                  # no TLS
            cp = nbdinfo_size(uri)
            assert cp.returncode != 0 and cp.stdout == b"", (uri, cp.stdout)
    finally:
        stop(p)


def test_plaintext_tcp_needs_the_flag_that_names_the_risk_and_warns(env: Env):
    require_tools("nbdinfo")
    env.create("plain", "64M")
    port = free_port()
    # The old spelling is refused with the way forward; nothing starts.
    err = env.refused(errors.InvalidInput, "disk", "serve", "plain", "--tcp",
                      f"127.0.0.1:{port}", "--no-tls")
    assert "--insecure-plaintext-tcp" in err and "--unix" in err
    err = env.refused(errors.InvalidInput, "disk", "serve", "plain", "--tcp",
                      f"127.0.0.1:{port}")
    assert "--unix PATH in a directory only you can enter (mode 0700)" in err
    p, info = start_serve(env, "plain", "--tcp", f"127.0.0.1:{port}",
                          "--insecure-plaintext-tcp")
    try:
        assert info["tls"] is False
        assert int(nbdinfo_size(f"nbd://127.0.0.1:{port}/plain").stdout) == 64 * MiB
    finally:
        err = stop(p)
    assert "warning: disk plain is served WITHOUT TLS" in err
    assert "every account on this machine" in err and "--unix PATH" in err
    assert env.json("disk", "show", "plain")["state"] == "available"


def test_serve_help_points_local_clients_at_the_unix_socket():
    from support.cli import run_cli
    text = run_cli("disk", "serve", "--help").stdout.decode()
    flat = " ".join(text.split())
    assert "--insecure-plaintext-tcp" in flat and "DANGEROUS" in flat
    assert "--unix" in flat and "0700" in flat
    assert "--no-tls" not in flat
