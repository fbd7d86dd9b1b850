"""The store passphrase and the KEK are gone from memory once the data key is
unwrapped, in `disk serve` and in `disk attach` (issue 12, item 8).

Read from the processes' memory (/proc/PID/mem, as root) while they run:

- the `disk serve` CLI, which lives as long as the disk is served: neither the
  passphrase, nor the KEK derived from it, nor the CMK material, nor the DK
  (handed to nbdkit) is anywhere in its memory;
- `disk attach`, stopped (SIGSTOP, test-only) right after nbdkit started with
  the DK: no passphrase, no KEK, no DK left in the CLI;
- the nbdkit serving an attached disk: the DK is there (the control that shows
  the search finds a key that is present), the passphrase and the KEK are not.

The test knows the passphrase (the env fixture's file) and derives the KEK
itself from the store's Argon2id parameters, as blockcrypt does.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import kdf
from blockcrypt.testing.crashpoints import ENV_STOP_AT

from support.cli import REPO
from support.env import Env
from support.memory import find_in_memory
from support.procstate import stopped
from support.serve import start_serve
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def secrets_of(env: Env, disk: str) -> dict[str, bytes]:
    """The passphrase, the KEK, the CMK material of the service key and the DK."""
    passphrase = env.passphrase_file.read_bytes().rstrip(b"\n")
    conn = sqlite3.connect(env.home / "blockcrypt.db")
    try:
        params = kdf.KdfParams.from_json(
            conn.execute("SELECT kdf FROM kms_store WHERE id = 1").fetchone()[0])
    finally:
        conn.close()
    with Secret(passphrase) as p, kdf.derive_kek(p, params) as kek:
        kek_bytes = kek.reveal()
    cmk_id = env.json("disk", "show", disk)["cmk_id"]
    with env.store() as store:
        version = store._vault.current_version(cmk_id)
        store.unlock()
        with store._vault.material(cmk_id, version) as m:
            cmk = m.reveal()
    return {"passphrase": passphrase, "kek": kek_bytes, "cmk": cmk,
            "dk": env.data_key(disk)}


def test_serve_process_holds_no_passphrase_kek_cmk_or_dk(env: Env):
    env.create("msrv", "64M")
    secrets = secrets_of(env, "msrv")
    sock = env.tmp / "msrv.sock"
    p, info = start_serve(env, "msrv", "--unix", str(sock))
    try:
        found = find_in_memory(p.pid, secrets)
        assert found == {}, f"secrets in the memory of `disk serve` (pid {p.pid}): {found}"
        # Control: the same search finds the DK in the nbdkit serving the disk.
        in_nbdkit = find_in_memory(info["nbdkit_pid"], secrets)
        assert "dk" in in_nbdkit, in_nbdkit
        assert "passphrase" not in in_nbdkit and "kek" not in in_nbdkit, in_nbdkit
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0, p.stderr.read().decode()


def test_attach_wipes_passphrase_kek_and_dk_once_nbdkit_has_the_key(env: Env):
    env.create("matt", "64M")
    secrets = secrets_of(env, "matt")
    argv = [sys.executable, "-m", "blockcrypt", "--home", str(env.home), "--passphrase-file",
            str(env.passphrase_file), "disk", "attach", "matt", "--json"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env={**os.environ, ENV_STOP_AT: "disk-attach.after-nbdkit"})
    try:
        wait_for(lambda: p.poll() is not None or stopped(p.pid), 60,
                 "attach to stop itself after starting nbdkit")
        assert p.poll() is None, p.stderr.read().decode()
        found = find_in_memory(p.pid, secrets)
        assert found == {}, f"secrets in the memory of `disk attach` (pid {p.pid}): {found}"
        pid = int((env.home / "run" / "matt" / "nbdkit.pid").read_text())
        in_nbdkit = find_in_memory(pid, secrets)
        assert "dk" in in_nbdkit, in_nbdkit                       # the control
        assert "passphrase" not in in_nbdkit and "kek" not in in_nbdkit, in_nbdkit
    finally:
        p.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    env.detach("matt")
