"""`blockcrypt disk create/list/show/delete` and the refusals that need no block device,
run as a user would (a subprocess per command)."""
import json
import os
import sqlite3
import stat
import subprocess

import pytest

from blockcrypt import errors
from blockcrypt.cli import read_passphrase_file
from blockcrypt.cli.store import CatalogKeyStore as KeyStore
from blockcrypt.storage import container
from blockcrypt.storage.home import Home

from support.cli import run_cli

GiB = 2**30
MiB = 2**20


@pytest.fixture
def cli(home, passphrase_file):
    """run_cli bound to an initialised home; returns (stdout json|text, process)."""
    run_cli("init", home=home, passphrase_file=passphrase_file)

    def run(*args, check=True):
        return run_cli(*args, home=home, passphrase_file=passphrase_file, check=check)
    return run


def _json(cp):
    return json.loads(cp.stdout)


def _err(cp):
    return cp.stderr.decode()


def _store(home, passphrase_file):
    return KeyStore.open(Home(home), lambda: read_passphrase_file(str(passphrase_file)))


def _files(home):
    d = home / "disks"
    return sorted(os.listdir(d)) if d.exists() else []


def _db_rows(home, table):
    conn = sqlite3.connect(home / "blockcrypt.db")
    try:
        return conn.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        conn.close()


def test_create_encrypted_default_key(cli, home, passphrase_file):
    d = _json(cli("disk", "create", "db", "--size", "10G", "--json"))
    assert d["name"] == "db" and d["size_bytes"] == 10 * GiB
    assert d["sector_size"] == 4096 and d["encrypted"] is True and d["discard"] is False
    assert d["state"] == "available" and d["device"] is None
    # the file: <id>.bcd under the home's disks dir, 0600, sparse, header matching
    path = home / "disks" / f"{d['id']}.bcd"
    assert d["path"] == str(path)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "disks").st_mode) == 0o700
    assert st.st_blocks * 512 < 4 * MiB  # sparse: 10 GiB apparent, almost nothing allocated
    header = container.read_header(path)
    assert header.uid_hex == d["id"] and header.size_bytes == 10 * GiB
    assert header.encrypted and header.cipher == "aes-xts-plain64"
    assert header.lineage_hex == d["lineage_id"] and len(header.lineage_id) == 16
    with _store(home, passphrase_file) as store:
        service_key = store.default_key()
        assert header.cmk_id == d["cmk_id"] == service_key["id"]
        assert header.cmk_version == service_key["current_version"]
        # the wrapped DK unwraps under this container's context, and only under it
        with store.decrypt_data_key(header.wrapped_dk, container.key_context(header)) as dk:
            assert len(dk) == 64 and dk.view()[:32] != dk.view()[32:]
        other = container.key_context(header.replace(size_bytes=header.size_bytes + 4096))
        with pytest.raises(errors.CryptoError):
            store.decrypt_data_key(header.wrapped_dk, other)
        assert "disk db" in store.get_key(service_key["id"])["dependants"]
    # create and show agree; show also says whether the disk attaches at boot and whether
    # its key can unwrap now
    shown = _json(cli("disk", "show", "db", "--json"))
    assert shown.pop("persistent") is False
    assert shown.pop("key") == {"usable": True, "note": "usable", "server_states": None}
    assert shown == d
    assert [x["name"] for x in _json(cli("disk", "list", "--json"))] == ["db"]


def test_create_plain_named_key_512_discard(cli, home):
    key = _json(cli("key", "create", "--alias", "team-a", "--json"))
    d = _json(cli("disk", "create", "a1", "--size", "512M", "--key", "team-a",
                  "--sector-size", "512", "--discard", "--json"))
    assert d["cmk_id"] == key["id"] and d["sector_size"] == 512 and d["discard"] is True
    p = _json(cli("disk", "create", "plain", "--size", "64M", "--no-encrypted", "--json"))
    assert p["encrypted"] is False and p["cmk_id"] is None and p["lineage_id"] is None
    h = container.read_header(p["path"])
    assert not h.encrypted and h.cipher == "none" and h.wrapped_dk is None
    listed = {x["name"]: x for x in _json(cli("disk", "list", "--json"))}
    assert set(listed) == {"a1", "plain"}
    out = cli("disk", "list").stdout.decode()
    assert "a1" in out and "512 MiB" in out and "available" in out
    shown = cli("disk", "show", "plain").stdout.decode()
    assert "encrypted:" in shown and "no" in shown


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "new\nline", "x" * 65, "sp ace"])
def test_bad_names_refused_before_anything_is_written(cli, home, name):
    before = _files(home)
    cp = cli("disk", "create", "--size", "1G", "--", name, check=False)
    assert cp.returncode == errors.InvalidName.exit_code, _err(cp)
    assert "invalid disk name" in _err(cp)
    assert _files(home) == before and _db_rows(home, "disks") == []


@pytest.mark.parametrize("size,sector", [
    ("0", "4096"), ("-1", "4096"), ("-4G", "4096"), ("1000", "512"), ("6K", "4096"),
    ("4097", "4096"), ("9E", "4096"), (str(2**63 + 4096), "4096"), ("1.5G", "4096"),
])
def test_bad_sizes_refused_before_anything_is_written(cli, home, size, sector):
    cp = cli("disk", "create", "d", "--size", size, "--sector-size", sector, check=False)
    assert cp.returncode == errors.InvalidSize.exit_code, _err(cp)
    assert _files(home) == [] and _db_rows(home, "disks") == []


def test_key_with_no_encrypted_and_bad_sector_size(cli, home):
    cp = cli("disk", "create", "d", "--size", "1G", "--no-encrypted", "--key", "x", check=False)
    assert cp.returncode == errors.InvalidInput.exit_code and "--no-encrypted" in _err(cp)
    cp = cli("disk", "create", "d", "--size", "1G", "--sector-size", "1024", check=False)
    assert cp.returncode == 2  # click usage error: not a choice
    assert _files(home) == []


def test_duplicate_name_and_missing_key(cli, home):
    cli("disk", "create", "d", "--size", "64M")
    cp = cli("disk", "create", "d", "--size", "64M", "--no-encrypted", check=False)
    assert cp.returncode == errors.AlreadyExists.exit_code and "already exists" in _err(cp)
    cp = cli("disk", "create", "e", "--size", "64M", "--key", "nope", check=False)
    assert cp.returncode == errors.KeyNotFound.exit_code
    assert len(_files(home)) == 1 and len(_db_rows(home, "disks")) == 1


def test_create_under_disabled_key_refused(cli, home):
    cli("key", "create", "--alias", "k")
    cli("key", "disable", "k")
    cp = cli("disk", "create", "d", "--size", "64M", "--key", "k", check=False)
    assert cp.returncode == errors.KeyStateError.exit_code, _err(cp)
    assert _files(home) == [] and _db_rows(home, "disks") == []


def test_show_delete_missing(cli):
    for cmd in (("show", "nope"), ("delete", "nope")):
        cp = cli("disk", *cmd, check=False)
        assert cp.returncode == errors.DiskNotFound.exit_code
    cp = cli("disk", "show", "bad/name", check=False)
    assert cp.returncode == errors.InvalidName.exit_code


def test_delete_removes_file_and_row(cli, home, passphrase_file):
    d = _json(cli("disk", "create", "d", "--size", "64M", "--json"))
    keep = _json(cli("disk", "create", "keep", "--size", "64M", "--json"))
    out = _json(cli("disk", "delete", "d", "--json"))
    assert out == {"name": "d", "deleted": True}
    assert _files(home) == [f"{keep['id']}.bcd"]
    assert [r[1] for r in _db_rows(home, "disks")] == ["keep"]
    with _store(home, passphrase_file) as store:
        assert store.get_key(d["cmk_id"])["dependants"] == ["disk keep"]
    assert _json(cli("disk", "list", "--json"))[0]["name"] == "keep"


def test_json_error_output(cli):
    cp = cli("disk", "show", "nope", "--json", check=False)
    err = json.loads(cp.stderr)
    assert err["error"] == "DiskNotFound" and err["exit_code"] == errors.DiskNotFound.exit_code


def test_no_store(home, passphrase_file):
    cp = run_cli("disk", "list", home=home, passphrase_file=passphrase_file, check=False)
    assert cp.returncode == errors.StoreNotFound.exit_code


# -- crash recovery of create and delete -------------------------------------------

def _dead_process() -> tuple[int, int]:
    """(pid, start time) of a process that has exited."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid, 12345


def test_recovery_of_interrupted_create_and_delete(cli, home):
    a = _json(cli("disk", "create", "a", "--size", "64M", "--json"))
    b = _json(cli("disk", "create", "b", "--size", "64M", "--json"))
    disks = home / "disks"
    pid, start = _dead_process()
    # 1. a create that crashed after writing the file, before the row: file removed
    orphan = disks / f"{'ab' * 16}.bcd.tmp-{pid}-{start}"
    orphan.write_bytes(b"partial")
    # 2. a create that committed the row but crashed before the rename: completed
    os.rename(disks / f"{a['id']}.bcd", disks / f"{a['id']}.bcd.tmp-{pid}-{start}")
    # 3. a delete that renamed but did not commit: restored
    os.rename(disks / f"{b['id']}.bcd", disks / f"{b['id']}.bcd.deleted")
    # 4. a delete that committed but did not unlink: finished
    gone = disks / f"{'cd' * 16}.bcd.deleted"
    gone.write_bytes(b"old")
    # 5. a create in progress in a live process: left alone
    live = disks / f"{'ef' * 16}.bcd.tmp-{os.getpid()}-" \
                   f"{int(open(f'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[19])}"
    live.write_bytes(b"in progress")

    listed = _json(cli("disk", "list", "--json"))
    assert [d["name"] for d in listed] == ["a", "b"]
    assert sorted(_files(home)) == sorted([f"{a['id']}.bcd", f"{b['id']}.bcd", live.name])
    assert container.read_header(disks / f"{a['id']}.bcd").uid_hex == a["id"]
    assert container.read_header(disks / f"{b['id']}.bcd").uid_hex == b["id"]
    live.unlink()


# -- stale attachments (no block device needed: the processes are gone) ---------------

def test_stale_attachment_row_is_cleaned_by_list_and_show(cli, home):
    d = _json(cli("disk", "create", "s", "--size", "64M", "--json"))
    run_dir = home / "run" / "s"
    run_dir.mkdir(parents=True)
    (run_dir / "nbd.sock").write_bytes(b"")
    (run_dir / "nbdkit.pid").write_text("999999\n")
    pid, _ = _dead_process()
    conn = sqlite3.connect(home / "blockcrypt.db")
    with conn:
        conn.execute(
            "INSERT INTO attachments (disk_id, state, owner_pid, owner_start, device, method,"
            " read_only, nbdkit_pid, helper_pid, run_dir, socket, control_socket, attached_at)"
            " VALUES (?, 'attached', NULL, NULL, NULL, 'nbdfuse-loop', 0, ?, ?, ?, ?, ?, 'x')",
            (d["id"], pid, pid, str(run_dir), str(run_dir / "nbd.sock"),
             str(run_dir / "ctl.sock")))
    conn.close()
    shown = _json(cli("disk", "show", "s", "--json"))
    assert shown["state"] == "available" and shown["device"] is None
    assert not run_dir.exists()
    assert _db_rows(home, "attachments") == []
    # an 'attaching' claim whose CLI died is stale too; delete then works
    conn = sqlite3.connect(home / "blockcrypt.db")
    with conn:
        conn.execute(
            "INSERT INTO attachments (disk_id, state, owner_pid, owner_start, method, read_only,"
            " run_dir, attached_at) VALUES (?, 'attaching', ?, 1, 'nbdfuse-loop', 0, ?, 'x')",
            (d["id"], pid, str(run_dir)))
    conn.close()
    assert _json(cli("disk", "list", "--json"))[0]["state"] == "available"
    cli("disk", "delete", "s")
    assert _files(home) == []


def test_live_claim_blocks_delete(cli, home):
    """A claim held by a live process (an attach in progress) makes delete refuse."""
    d = _json(cli("disk", "create", "c", "--size", "64M", "--json"))
    me = os.getpid()
    start = int(open(f"/proc/{me}/stat").read().rsplit(")", 1)[1].split()[19])
    conn = sqlite3.connect(home / "blockcrypt.db")
    with conn:
        conn.execute(
            "INSERT INTO attachments (disk_id, state, owner_pid, owner_start, method, read_only,"
            " run_dir, attached_at) VALUES (?, 'attaching', ?, ?, 'nbdfuse-loop', 0, ?, 'x')",
            (d["id"], me, start, str(home / "run" / "c")))
    conn.close()
    cp = cli("disk", "delete", "c", check=False)
    assert cp.returncode == errors.DiskAttached.exit_code
    assert f"being attached by process {me}" in _err(cp)
    assert _json(cli("disk", "show", "c", "--json"))["state"] == "attaching"
    assert len(_files(home)) == 1


# -- serve refusals (checked before anything starts) --------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--tcp", "0.0.0.0:10809", "--insecure-plaintext-tcp"], "only allowed on loopback"),
    (["--tcp", "192.0.2.1:10809", "--insecure-plaintext-tcp"], "only allowed on loopback"),
    (["--tcp", "127.0.0.1:10809"], "requires TLS"),
    (["--tcp", "localhost:10809", "--insecure-plaintext-tcp"], "not an IP address"),
    (["--tcp", "127.0.0.1:0", "--insecure-plaintext-tcp"], "port must be"),
    (["--tcp", "127.0.0.1:\u0661\u0660\u0668\u0660\u0669", "--insecure-plaintext-tcp"],
     "port must be 1-65535 (ASCII digits)"),
    (["--tcp", "127.0.0.1"], "HOST:PORT"),
    (["--unix", "/tmp/x.sock", "--tcp", "127.0.0.1:1", "--insecure-plaintext-tcp"],
     "exactly one"),
    ([], "exactly one"),
    (["--tcp", "127.0.0.1:10809", "--tls-psk", "/nonexistent/psk"], "no such file"),
    (["--tcp", "127.0.0.1:10809", "--tls-psk", "/etc/hostname", "--insecure-plaintext-tcp"],
     "contradicts"),
    (["--tcp", "127.0.0.1:10809", "--no-tls"], "--no-tls was removed"),
    (["--unix", "/tmp/x.sock", "--insecure-plaintext-tcp"], "only applies to --tcp"),
    (["--tcp", "127.0.0.1:10809", "--tls-certificates", "/nonexistent"], "no such directory"),
    (["--unix", "/tmp/x.sock", "--threads", "\u0664"], "--threads '\u0664' is not a whole"),
    (["--unix", "/tmp/x.sock", "--threads", "0"], "--threads must be between 1 and 64"),
    (["--unix", "/tmp/x.sock", "--threads", "65"], "--threads must be between 1 and 64"),
])
def test_serve_refusals(cli, home, args, needle):
    cli("disk", "create", "s", "--size", "64M")
    cp = cli("disk", "serve", "s", *args, check=False)
    assert cp.returncode == errors.InvalidInput.exit_code, _err(cp)
    assert needle in _err(cp)
    assert not (home / "run" / "s").exists() and _db_rows(home, "attachments") == []


@pytest.mark.parametrize("threads", ["0", "65"])
def test_attach_refuses_bad_thread_count(cli, home, threads):
    cli("disk", "create", "t", "--size", "64M")
    cp = cli("disk", "attach", "t", "--threads", threads, check=False)
    assert cp.returncode == errors.InvalidInput.exit_code, _err(cp)
    assert "--threads must be between 1 and 64" in _err(cp)
    assert not (home / "run" / "t").exists() and _db_rows(home, "attachments") == []


def test_serve_loopback_v6_plaintext_is_allowed_by_policy():
    from blockcrypt.services.serve import parse_tcp_endpoint, serve_tls_mode
    ep = parse_tcp_endpoint("[::1]:10809")
    assert ep == ("::1", 10809)
    assert serve_tls_mode(tcp=ep, tls_psk=None, tls_certificates=None,
                          insecure_plaintext_tcp=True) == "off"
    assert serve_tls_mode(tcp=("127.0.0.2", 1), tls_psk=None, tls_certificates=None,
                          insecure_plaintext_tcp=True) == "off"
    assert serve_tls_mode(tcp=None, tls_psk=None, tls_certificates=None,
                          insecure_plaintext_tcp=False) == "off"


def _cert_dir(tmp_path, *, key_mode=0o600, missing=()):
    d = tmp_path / "certs"
    d.mkdir(mode=0o700)
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        if f not in missing:
            (d / f).write_text("-----BEGIN CERTIFICATE-----\n")
    if "server-key.pem" not in missing:
        (d / "server-key.pem").chmod(key_mode)
    return d


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_serve_refuses_tls_secrets_others_can_read(cli, home, tmp_path, mode):
    """Issue 12 item 3: a TLS-PSK file or server key that group or others may
    access is refused, naming the file and the chmod to run; nothing starts."""
    cli("disk", "create", "s", "--size", "64M")
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + "00" * 32 + "\n")
    psk.chmod(mode)
    certs = _cert_dir(tmp_path, key_mode=mode)
    for args, path in ((["--tls-psk", str(psk)], psk),
                       (["--tls-certificates", str(certs)], certs / "server-key.pem")):
        cp = cli("disk", "serve", "s", "--tcp", "127.0.0.1:10809", *args, check=False)
        assert cp.returncode == errors.InsecureFile.exit_code, _err(cp)
        assert f"run `chmod 600 {path}`" in _err(cp) and f"{mode:04o}" in _err(cp)
        assert not (home / "run" / "s").exists() and _db_rows(home, "attachments") == []


def test_serve_refuses_an_incomplete_certificate_directory(cli, home, tmp_path):
    cli("disk", "create", "s", "--size", "64M")
    certs = _cert_dir(tmp_path, missing=("ca-cert.pem",))
    cp = cli("disk", "serve", "s", "--tcp", "127.0.0.1:10809", "--tls-certificates", str(certs),
             check=False)
    assert cp.returncode == errors.InvalidInput.exit_code, _err(cp)
    assert "missing ca-cert.pem" in _err(cp)
    assert not (home / "run" / "s").exists() and _db_rows(home, "attachments") == []


# -- kill -9 of the CLI at every step of create and delete ------------------------------

def _consistent(home) -> list[str]:
    """Every catalog row has its file, every file a row, no markers; returns names."""
    conn = sqlite3.connect(home / "blockcrypt.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT id, name FROM disks ORDER BY name").fetchall()
    finally:
        conn.close()
    assert sorted(_files(home)) == sorted(f"{i}.bcd" for i, _ in rows)
    for i, _ in rows:
        assert container.read_header(home / "disks" / f"{i}.bcd").uid_hex == i
    return [n for _, n in rows]


@pytest.mark.parametrize("step,exists_after", [
    ("disk-create.after-file", False),
    ("disk-create.in-txn", False),
    ("disk-create.after-row", True),
])
def test_create_killed_at_each_step(cli, home, passphrase_file, step, exists_after):
    cp = run_cli("disk", "create", "k", "--size", "64M", home=home,
                 passphrase_file=passphrase_file, check=False,
                 env={"BLOCKCRYPT_TESTONLY_CRASH_AT": step})
    assert cp.returncode == -9, cp.stderr.decode()
    names = [d["name"] for d in _json(cli("disk", "list", "--json"))]   # recovers
    assert names == (["k"] if exists_after else [])
    assert _consistent(home) == names
    if not exists_after:
        cli("disk", "create", "k", "--size", "64M")                   # the name is free
        assert _consistent(home) == ["k"]


@pytest.mark.parametrize("step,exists_after", [
    ("disk-delete.in-txn", True),
    ("disk-delete.after-row", False),
])
def test_delete_killed_at_each_step(cli, home, passphrase_file, step, exists_after):
    cli("disk", "create", "k", "--size", "64M")
    cp = run_cli("disk", "delete", "k", home=home, passphrase_file=passphrase_file,
                 check=False, env={"BLOCKCRYPT_TESTONLY_CRASH_AT": step})
    assert cp.returncode == -9, cp.stderr.decode()
    names = [d["name"] for d in _json(cli("disk", "list", "--json"))]
    assert names == (["k"] if exists_after else [])
    assert _consistent(home) == names


def test_crash_steps_are_all_covered(cli, home, passphrase_file, tmp_path):
    """The parametrized steps above are every crash point create and delete reach."""
    listing = tmp_path / "steps"
    env = {"BLOCKCRYPT_TESTONLY_CRASH_LIST": str(listing)}
    run_cli("disk", "create", "k", "--size", "64M", home=home,
            passphrase_file=passphrase_file, env=env)
    run_cli("disk", "delete", "k", home=home, passphrase_file=passphrase_file, env=env)
    steps = [s for s in listing.read_text().split() if s.startswith("disk-")]
    assert steps == ["disk-create.after-file", "disk-create.in-txn", "disk-create.after-row",
                     "disk-delete.in-txn", "disk-delete.after-row"]
