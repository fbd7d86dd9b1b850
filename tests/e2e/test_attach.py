"""End to end: `disk attach` / `detach` / `serve` with real nbdkit, nbdfuse, losetup,
mkfs.ext4, mount and e2fsck (root).  Covers issue 4's "done when" 1, 2, 3, 5 and 6,
stale cleanup after kill -9, concurrent attaches, and `disk serve`.

On these machines the kernel has no nbd driver, so attach takes the fallback path
(nbdfuse + loop); the nbd-client path is proved in tests/guest/test_guest_nbd.py.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.storage import container
from blockcrypt.system import proc

from support.env import (
    assert_nothing_started,
    dd_read,
    dd_write,
    read_allocated,
    sha256,
    write_files,
)
from support.nbdkit import import_libnbd
from support.prereq import require_tools
from support.serve import start_serve
from support.stored import container_file
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 2**20


# -- 1 and 3: mkfs, mount, files, detach, re-attach, verify, fsck ---------------------

@pytest.mark.parametrize("encrypted,sector", [(True, "4096"), (False, "4096"), (True, "512")])
def test_filesystem_roundtrip(env, encrypted, sector, store_name, store_args, store_cluster):
    require_tools("mkfs.ext4", "e2fsck", "blockdev")
    enc = [] if encrypted else ["--no-encrypted"]
    env.create("fs", "512M", "--sector-size", sector, *enc, *store_args(env.cli))
    assert env.json("disk", "show", "fs")["store"] == ("ceph" if store_name == "rbd" else "file")
    d = env.attach("fs")
    dev = d["device"]
    assert d["method"] == "nbdfuse-loop" and d["read_only"] is False
    ss = subprocess.run(["blockdev", "--getss", dev], capture_output=True, check=True)
    assert int(ss.stdout) == int(sector)
    size = subprocess.run(["blockdev", "--getsize64", dev], capture_output=True, check=True)
    assert int(size.stdout) == 512 * MiB
    shown = env.json("disk", "show", "fs")
    assert shown["state"] == "attached" and shown["device"] == dev
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    mp = env.mount(dev)
    hashes = write_files(mp)
    env.umount(mp)
    assert env.detach("fs") == {"name": "fs", "device": dev, "stale": False,
                                "catalog_pending": False}
    assert env.json("disk", "show", "fs")["state"] == "available"
    assert not (env.home / "run" / "fs").exists()
    assert env.rows("attachments") == []

    dev = env.attach("fs")["device"]
    mp = env.mount(dev)
    assert {str(p.relative_to(mp)): sha256(p) for p in mp.rglob("*") if p.is_file()
            and "lost+found" not in str(p)} == hashes
    env.umount(mp)
    fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    env.detach("fs")
    where = env.json("disk", "show", "fs")["path"]
    env.cli("disk", "delete", "fs")
    assert env.json("disk", "list") == []
    if store_cluster is not None:
        assert where.split("/", 1)[1] not in store_cluster.images()
    else:
        assert not Path(where).exists()


# -- 2 and 3: what the container file holds ---------------------------------------------

@pytest.mark.parametrize("encrypted", [True, False])
def test_file_holds_ciphertext_or_plaintext(env, encrypted, store_args, store_cluster):
    env.create("raw", "64M", *([] if encrypted else ["--no-encrypted"]), *store_args(env.cli))
    pattern = os.urandom(MiB)                  # known to the test, 256 distinct 4 KiB pieces
    offset = 8 * MiB
    dev = env.attach("raw")["device"]
    dd_write(dev, pattern, offset)
    env.detach("raw")
    # the file, or an `rbd export` of the image (a container file: FORMAT.md F-42)
    path = container_file(env.home, "disks", "raw", cluster=store_cluster, scratch=env.tmp)
    header = container.read_header(path)
    pieces = [pattern[i:i + 4096] for i in range(0, MiB, 4096)]
    extents = read_allocated(path)
    found = [(start + data.find(p), i) for i, p in enumerate(pieces)
             for start, data in extents if p in data]
    if encrypted:
        assert found == [], "plaintext 4 KiB pieces found in the encrypted disk file"
    else:
        assert sorted(found) == [(header.data_offset + offset + i * 4096, i)
                                 for i in range(len(pieces))]
    # and through the device the data reads back as written
    dev = env.attach("raw", "--read-only")["device"]
    assert dd_read(dev, MiB, offset) == pattern
    env.detach("raw")


def test_read_only_attach_refuses_writes(env, store_args):
    require_tools("blockdev")
    env.create("ro", "64M", *store_args(env.cli))
    dev = env.attach("ro")["device"]
    dd_write(dev, b"\x5a" * 4096, 0)
    env.detach("ro")
    d = env.attach("ro", "--read-only")
    assert d["read_only"] is True
    ro = subprocess.run(["blockdev", "--getro", d["device"]], capture_output=True, check=True)
    assert int(ro.stdout) == 1
    cp = subprocess.run(["dd", "if=/dev/zero", f"of={d['device']}", "bs=4096", "count=1",
                         "oflag=direct", "status=none"], capture_output=True)
    assert cp.returncode != 0
    assert dd_read(d["device"], 4096, 0) == b"\x5a" * 4096
    env.detach("ro")


# -- 5: the DK appears nowhere it must not ------------------------------------------------

def test_data_key_not_in_argv_environ_files_or_log(env, store_args, store_cluster):
    """... nor, on RBD, the cephx key of the store's user (only its keyring's path
    reaches nbdkit)."""
    env.create("sec", "64M", *store_args(env.cli))
    d = env.attach("sec")
    dk = env.data_key("sec", store_cluster)
    assert len(dk) == 64
    needles = [dk, dk[:32], dk[32:], dk.hex().encode(), dk.hex().upper().encode(),
               dk[:32].hex().encode(), dk[32:].hex().encode()]
    if store_cluster is not None:
        keyring = Path(env.json("store", "show", "ceph")["keyring"]).read_text()
        needles.append(keyring.split("key = ", 1)[1].split()[0].encode())

    def clean(blob: bytes, what: str) -> None:
        for n in needles:
            assert n not in blob, f"data key bytes found in {what}"

    dd_write(d["device"], os.urandom(MiB), 0)
    run_dir = env.home / "run" / "sec"
    pids = proc.find_processes("nbdkit", f"{run_dir}/")
    assert pids == [d["nbdkit_pid"]]
    related = pids + proc.find_processes("nbdfuse", f"{run_dir}/") + \
        [int(Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])]
    for pid in related:                       # nbdkit, nbdfuse, the supervisor shell
        for f in ("cmdline", "environ"):
            clean(Path(f"/proc/{pid}/{f}").read_bytes(), f"/proc/{pid}/{f}")
    log = run_dir / "nbdkit.log"
    assert log.exists()
    clean(log.read_bytes(), "nbdkit's log")
    env.detach("sec")
    for p in env.home.rglob("*"):
        if p.is_file():
            clean(p.read_bytes(), str(p))
        if p.is_dir():
            assert (p.stat().st_mode & 0o777) == 0o700, p
        elif p.is_file():
            assert (p.stat().st_mode & 0o777) == 0o600, p


def test_run_dir_is_private_while_attached(env):
    env.create("priv", "64M")
    env.attach("priv")
    run_dir = env.home / "run" / "priv"
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    for entry in os.scandir(run_dir):
        if not entry.is_dir(follow_symlinks=False):
            assert (os.lstat(entry.path).st_mode & 0o777) == 0o600, entry.name
    env.detach("priv")


# -- 6: refusals ------------------------------------------------------------------------------

def test_refusals_with_error_classes(env):
    env.create("busy", "256M")
    env.refused(errors.DiskNotFound, "disk", "attach", "nope")
    env.refused(errors.DiskNotAttached, "disk", "detach", "busy")
    env.refused(errors.InvalidName, "disk", "attach", "../busy")
    dev = env.attach("busy")["device"]
    # attached twice, delete while attached, and the first attachment keeps working
    msg = env.refused(errors.DiskAttached, "disk", "attach", "busy")
    assert dev in msg and "disk detach busy" in msg
    env.refused(errors.DiskAttached, "disk", "delete", "busy")
    assert os.path.exists(env.json("disk", "show", "busy")["path"])
    # detach while mounted names the mount point
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    mp = env.mount(dev)
    msg = env.refused(errors.DeviceBusy, "disk", "detach", "busy")
    assert str(mp) in msg
    (mp / "still-works").write_text("yes")
    env.umount(mp)
    env.detach("busy")
    # bad names and sizes
    env.refused(errors.InvalidName, "disk", "create", ".x", "--size", "1G")
    env.refused(errors.InvalidSize, "disk", "create", "x", "--size", "0")
    env.refused(errors.InvalidSize, "disk", "create", "x", "--size", "1000",
                "--sector-size", "512")
    assert [d["name"] for d in env.json("disk", "list")] == ["busy"]


@pytest.mark.parametrize("how", ["disable", "schedule-deletion"])
def test_attach_refused_when_key_unusable(env, how, provider_args):
    env.cli("key", "create", "--alias", "k", *provider_args(env.cli))
    env.create("locked", "64M", "--key", "k")
    env.cli("key", how, "k", "--force")
    msg = env.refused(errors.KeyStateError, "disk", "attach", "locked")
    assert "Disabled" in msg or "PendingDeletion" in msg
    assert_nothing_started(env, "locked")
    env.refused(errors.KeyStateError, "disk", "serve", "locked", "--unix",
                str(env.tmp / "s.sock"))
    assert_nothing_started(env, "locked")
    assert not (env.tmp / "s.sock").exists()


def test_attach_refused_when_header_tampered(env):
    """A header field changed to another valid value: the DK no longer unwraps."""
    d = env.create("tam", "64M")
    h = container.read_header(d["path"])
    container.write_header(d["path"], h.replace(size_bytes=h.size_bytes - 4096))
    cp = env.cli("disk", "attach", "tam", check=False)
    assert cp.returncode in (errors.UnwrapError.exit_code, errors.CryptoError.exit_code), \
        cp.stderr.decode()
    assert_nothing_started(env, "tam")


# -- stale attachments ---------------------------------------------------------------------------

def _take_over_if_locked(env, name: str, store_name: str, nbdkit_pid: int) -> tuple:
    """attach after its server was killed: a file disk attaches; an RBD disk's lock
    stays with the dead server (FORMAT.md F-41), so attach is refused saying so and
    ``--break-lock`` takes it over.  Returns attach's extra arguments."""
    if store_name == "file":
        return ()
    msg = env.refused(errors.DiskHeld, "disk", "attach", name)
    assert "no longer running" in msg and f"pid {nbdkit_pid}" in msg, msg
    assert f"blockcrypt disk attach {name} --break-lock" in msg, msg
    return ("--break-lock",)


def test_kill9_nbdkit_then_list_cleans_and_reattach_works(env, store_name, store_args):
    env.create("crash", "256M", *store_args(env.cli))
    d = env.attach("crash")
    subprocess.run(["mkfs.ext4", "-q", d["device"]], check=True, capture_output=True)
    mp = env.mount(d["device"])
    (mp / "durable").write_bytes(b"x" * 100000)
    os.sync()
    os.kill(d["nbdkit_pid"], signal.SIGKILL)
    assert proc.wait_gone(d["nbdkit_pid"], "nbdkit", None, 5)
    # the next list notices: never shown as attached.  While the dead device is
    # still mounted the attachment is kept as stale (attach refuses and names the
    # mount: tests/e2e/test_stale_mount.py); once unmounted, list cleans it.
    assert env.json("disk", "list")[0]["state"] == "stale"
    subprocess.run(["umount", str(mp)], capture_output=True)   # the dead fs; may complain
    env.mounts.remove(mp)
    listed = env.json("disk", "list")
    assert listed[0]["state"] == "available"
    assert env.rows("attachments") == []
    assert not (env.home / "run" / "crash" / "nbd.sock").exists()
    assert proc.find_processes("nbdfuse", f"{env.home / 'run' / 'crash'}/") == []
    d = env.attach("crash", *_take_over_if_locked(env, "crash", store_name, d["nbdkit_pid"]))
    mp = env.mount(d["device"])                                 # replays the journal
    assert (mp / "durable").read_bytes() == b"x" * 100000
    env.umount(mp)
    fsck = subprocess.run(["e2fsck", "-fn", d["device"]], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode()
    env.detach("crash")


def test_kill9_nbdkit_then_attach_and_detach_clean(env, store_name, store_args):
    env.create("k9", "64M", *store_args(env.cli))
    d = env.attach("k9")
    os.kill(d["nbdkit_pid"], signal.SIGKILL)
    proc.wait_gone(d["nbdkit_pid"], "nbdkit", None, 5)
    # attach cleans the stale attachment itself
    d2 = env.attach("k9", *_take_over_if_locked(env, "k9", store_name, d["nbdkit_pid"]))
    assert d2["nbdkit_pid"] != d["nbdkit_pid"]
    os.kill(d2["nbdkit_pid"], signal.SIGKILL)
    proc.wait_gone(d2["nbdkit_pid"], "nbdkit", None, 5)
    assert env.detach("k9")["stale"] is True
    assert_nothing_started(env, "k9")


def test_concurrent_attaches_exactly_one_wins(env):
    env.create("race", "64M")
    n = 8

    def attempt(_):
        return env.cli("disk", "attach", "race", "--json", check=False)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(attempt, range(n)))
    codes = sorted(cp.returncode for cp in results)
    assert codes == [0] + [errors.DiskAttached.exit_code] * (n - 1), \
        [cp.stderr.decode() for cp in results]
    winner = next(json.loads(cp.stdout) for cp in results if cp.returncode == 0)
    assert len(env.rows("attachments")) == 1
    assert proc.find_processes("nbdkit", f"{env.home / 'run' / 'race'}/") == \
        [winner["nbdkit_pid"]]
    env.detach("race")


# -- serve ---------------------------------------------------------------------------------------

def test_serve_unix_nbdinfo_nbdcopy_and_stop(env, store_args):
    require_tools("nbdinfo", "nbdcopy")
    env.create("srv", "64M", *store_args(env.cli))
    sock = env.tmp / "srv.sock"
    p, info = start_serve(env, "srv", "--unix", str(sock))
    try:
        assert info["endpoint"] == str(sock) and info["tls"] is False
        assert (sock.stat().st_mode & 0o777) == 0o600
        uri = f"nbd+unix:///srv?socket={sock}"
        cp = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, check=True)
        exp = json.loads(cp.stdout)["exports"][0]
        assert exp["export-size"] == 64 * MiB
        assert exp["block_size_preferred"] == 4096
        for flag in ("can_flush", "can_fua", "can_multi_conn", "can_zero"):
            assert exp[flag] is True, flag
        assert exp["is_read_only"] is False
        # in use: no attach, no delete, shown as served
        shown = env.json("disk", "show", "srv")
        assert shown["method"] == "serve" and shown["state"] == "attached"
        env.refused(errors.DiskAttached, "disk", "attach", "srv")
        env.refused(errors.DiskAttached, "disk", "delete", "srv")
        # data through it
        src = env.tmp / "src.bin"
        src.write_bytes(os.urandom(8 * MiB))
        subprocess.run(["nbdcopy", str(src), uri], check=True, capture_output=True)
        back = subprocess.run(["nbdcopy", uri, "-"], check=True, capture_output=True).stdout
        assert back[:8 * MiB] == src.read_bytes() and back[8 * MiB:] == bytes(56 * MiB)
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
    assert rc == 0, p.stderr.read().decode()
    assert not sock.exists()
    assert env.json("disk", "show", "srv")["state"] == "available"
    assert_nothing_started(env, "srv")


def test_serve_threads_reach_nbdkit(env):
    """--threads N is nbdkit's worker-thread count per connection: seen in the
    running nbdkit's command line and in its thread count while a client is
    connected (N workers besides the main and connection threads)."""
    require_tools("nbdinfo")
    env.create("thr", "64M")
    sock = env.tmp / "thr.sock"
    p, info = start_serve(env, "thr", "--unix", str(sock), "--threads", "7")
    try:
        pid = int((env.home / "run" / "thr" / "nbdkit.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--threads") + 1] == b"7"
        nbd = import_libnbd()
        h = nbd.NBD()
        h.connect_unix(str(sock))
        h.pread(4096, 0)
        # nbdkit starts a connection's workers while it already serves, so the
        # count is polled (with a deadline) while the client stays connected.
        tasks = wait_for(lambda: len(os.listdir(f"/proc/{pid}/task")) >= 7 + 1 and
                         len(os.listdir(f"/proc/{pid}/task")), timeout_s=10,
                         what="7 nbdkit workers besides the main thread")
        h.shutdown()
        assert tasks >= 7 + 1, tasks
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
    assert rc == 0, p.stderr.read().decode()


def test_serve_tcp_loopback_without_tls_and_kill9_of_cli(env):
    require_tools("nbdinfo")
    env.create("tcp", "64M", "--no-encrypted")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p, info = start_serve(env, "tcp", "--tcp", f"127.0.0.1:{port}", "--insecure-plaintext-tcp",
                          "--read-only")
    try:
        size = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"],
                              capture_output=True, check=True)
        assert int(size.stdout) == 64 * MiB
        ro = subprocess.run(["nbdinfo", "--is", "read-only", f"nbd://127.0.0.1:{port}"])
        assert ro.returncode == 0
    finally:
        p.kill()                      # kill -9 of the CLI: nbdkit exits with its parent
        p.wait()
    assert "is served WITHOUT TLS" in p.stderr.read().decode()
    assert proc.wait_gone(info["nbdkit_pid"], "nbdkit", None, 10)
    assert env.json("disk", "show", "tcp")["state"] == "available"
    assert_nothing_started(env, "tcp")


# -- kill -9 of the CLI at every step of attach and detach ---------------------------------

ATTACH_STEPS = ["disk-attach.after-claim", "disk-attach.after-nbdkit",
                "disk-attach.after-nbdfuse", "disk-attach.after-device"]
DETACH_STEPS = ["disk-detach.after-mark", "disk-detach.after-teardown"]


def test_attach_detach_crash_steps_are_all_covered(env, tmp_path):
    env.create("steps", "64M")
    listing = tmp_path / "steps.txt"
    extra = {"BLOCKCRYPT_TESTONLY_CRASH_LIST": str(listing)}
    env.cli("disk", "attach", "steps", env=extra)
    env.cli("disk", "detach", "steps", env=extra)
    steps = [s for s in listing.read_text().split() if s.startswith(("disk-attach",
                                                                     "disk-detach"))]
    assert steps == ATTACH_STEPS + DETACH_STEPS


@pytest.mark.parametrize("step", ATTACH_STEPS)
def test_attach_killed_at_each_step_is_cleaned(env, step):
    env.create("half", "64M")
    cp = env.cli("disk", "attach", "half", check=False,
                 env={"BLOCKCRYPT_TESTONLY_CRASH_AT": step})
    assert cp.returncode == -9, cp.stderr.decode()
    # the next command sees the dead claim and removes everything it had started
    assert env.json("disk", "show", "half")["state"] == "available"
    assert_nothing_started(env, "half")
    assert proc.find_processes("nbdfuse", f"{env.home / 'run' / 'half'}/") == []
    dev = env.attach("half")["device"]
    dd_write(dev, b"\x11" * 4096, 0)
    env.detach("half")


@pytest.mark.parametrize("step", DETACH_STEPS)
def test_detach_killed_at_each_step_is_cleaned(env, step):
    env.create("half", "64M")
    env.attach("half")
    cp = env.cli("disk", "detach", "half", check=False,
                 env={"BLOCKCRYPT_TESTONLY_CRASH_AT": step})
    assert cp.returncode == -9, cp.stderr.decode()
    assert env.json("disk", "list")[0]["state"] == "available"
    assert_nothing_started(env, "half")
    env.attach("half")
    env.detach("half")
