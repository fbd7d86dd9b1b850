"""blockcrypt.system.commands: argv construction (pure), checked without running the
programs (the supervisor shell, which only wraps a command, is run once)."""
import subprocess
from pathlib import Path

import pytest

from blockcrypt.system import commands

PLUGIN = Path("/repo/blockcrypt/nbd/plugin.py")
RUN = Path("/home/bc/run/d1")


def _nbdkit(**kw):
    args = dict(plugin_script=PLUGIN, container=Path("/home/bc/disks/abc.bcd"), read_only=False,
                discard=False, keyfd=7, pidfile=RUN / "nbdkit.pid",
                pause_control=RUN / "ctl.sock", unix_socket=RUN / "nbd.sock")
    args.update(kw)
    return commands.nbdkit_argv(**args)


# -- nbdkit ------------------------------------------------------------------

def test_nbdkit_argv_attach():
    argv = _nbdkit()
    assert argv[0] == "nbdkit"
    assert "--foreground" in argv and "--log=stderr" in argv
    assert argv[argv.index("--unix") + 1] == str(RUN / "nbd.sock")
    assert argv[argv.index("--pidfile") + 1] == str(RUN / "nbdkit.pid")
    assert "--tls=off" in argv
    assert "--readonly" not in argv and "-v" not in argv and "--verbose" not in argv
    # filters before the plugin; plugin, then its parameters and the filter's
    i = argv.index("python")
    assert argv.index("--filter=pause") < i
    assert argv[i + 1] == str(PLUGIN)
    params = argv[i + 2:]
    assert params == ["file=/home/bc/disks/abc.bcd", "keyfd=7", "readonly=false",
                      "discard=false", f"pause-control={RUN / 'ctl.sock'}"]


def test_nbdkit_argv_cow_control():
    """The copy-before-write socket (nbd/cow.py) is a plugin parameter, last."""
    argv = _nbdkit(cow_control=RUN / "cow.sock")
    assert argv[-2:] == [f"pause-control={RUN / 'ctl.sock'}", f"cowctl={RUN / 'cow.sock'}"]
    assert not any(a.startswith("cowctl=") for a in _nbdkit())


def test_nbdkit_argv_rbd_volume_params_replace_file():
    """A disk on Ceph: the rbd-* parameters (paths and names, never a key) instead of
    file=, before the key descriptor and the common parameters."""
    rbd = ["rbd-store=ceph", "rbd-conf=/etc/ceph/ceph.conf", "rbd-pool=rbd",
           "rbd-client=blockcrypt", "rbd-image=bc-01", "disk=d1", "home=/home/bc",
           "rbd-keyring=/etc/ceph/k.keyring"]
    argv = _nbdkit(volume_params=rbd)
    params = argv[argv.index("python") + 2:]
    assert params[:len(rbd)] == rbd and params[len(rbd)] == "keyfd=7"
    assert not any(a.startswith("file=") for a in argv)


def test_nbdkit_argv_snapshot_dir():
    """Where a detached disk's snapshot copy waits for the server (nbd/cow.py take_over)."""
    argv = _nbdkit(cow_control=RUN / "cow.sock", snapshot_dir=RUN.parent / ".snapshots")
    assert argv[-1] == f"snapdir={RUN.parent / '.snapshots'}"
    assert not any(a.startswith("snapdir=") for a in _nbdkit())


def test_nbdkit_argv_threads():
    argv = _nbdkit()
    assert argv[argv.index("--threads") + 1] == str(commands.NBDKIT_THREADS) == "4"
    argv = _nbdkit(threads=16)
    assert argv[argv.index("--threads") + 1] == "16"
    assert argv.index("--threads") < argv.index("python")     # an nbdkit option
    for bad in (0, -1, commands.MAX_NBDKIT_THREADS + 1, True, "4"):
        with pytest.raises(ValueError):
            _nbdkit(threads=bad)


def test_default_threads_per_store():
    """Files are GIL-bound (4 is best); RBD waits on OSD commits and needs more in flight."""
    assert commands.default_threads(on_rbd=False) == commands.NBDKIT_THREADS == 4
    assert commands.default_threads(on_rbd=True) == commands.RBD_NBDKIT_THREADS == 16


def test_nbdkit_argv_read_only_discard_unencrypted():
    argv = _nbdkit(read_only=True, discard=True, keyfd=None)
    assert "--readonly" in argv
    assert "readonly=true" in argv and "discard=true" in argv
    assert not any(a.startswith("keyfd=") for a in argv)


def test_nbdkit_argv_tcp_tls():
    argv = _nbdkit(unix_socket=None, tcp=("127.0.0.1", 10809), tls="require",
                   tls_psk=Path("/etc/psk"), exit_with_parent=True)
    assert argv[argv.index("--ipaddr") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "10809"
    assert "--unix" not in argv
    assert "--tls=require" in argv and "--tls-psk=/etc/psk" in argv
    assert "--exit-with-parent" in argv
    argv = _nbdkit(unix_socket=None, tcp=("::1", 1), tls="require",
                   tls_certificates=Path("/etc/certs"))
    assert "--tls-certificates=/etc/certs" in argv and not any("psk" in a for a in argv)
    # issue 12 item 1: certificate mode verifies the client's certificate
    assert "--tls-verify-peer" in argv


@pytest.mark.parametrize("kw", [
    dict(unix_socket=None),                                   # no endpoint
    dict(tcp=("127.0.0.1", 1)),                               # both endpoints
    dict(tls="require"),                                      # TLS without credentials
    dict(tls="require", tls_psk=Path("/a"), tls_certificates=Path("/b")),
    dict(tls="maybe"),
])
def test_nbdkit_argv_rejects_inconsistent(kw):
    with pytest.raises(ValueError):
        _nbdkit(**kw)


def test_nbdkit_argv_never_carries_key_bytes():
    """Only the descriptor number is on the command line, whatever the key."""
    argv = _nbdkit(keyfd=3)
    joined = "\0".join(argv)
    assert "keyfd=3" in argv
    for a in argv:
        assert not a.startswith(("key=", "dk=", "password"))
    assert len(joined) < 1000


def test_supervised_argv_keeps_parent_and_status(tmp_path):
    """The supervisor shell forks (does not exec) the command and returns its status."""
    script = "echo $PPID > ppid; exit 7"
    argv = commands.supervised_argv(["sh", "-c", script])
    assert argv[:4] == ["/bin/sh", "-c", '"$@"; exit $?', commands.SUPERVISOR_NAME]
    p = subprocess.Popen(argv, cwd=tmp_path)
    assert p.wait() == 7
    # the command's parent was the supervisor, not us
    assert int((tmp_path / "ppid").read_text()) == p.pid


# -- other argv builders ------------------------------------------------------

def test_nbdfuse_losetup_fusermount_argv():
    assert commands.nbdfuse_argv(fuse_file=RUN / "fuse/disk", unix_socket=RUN / "nbd.sock",
                             pidfile=RUN / "nbdfuse.pid", read_only=False) == [
        "nbdfuse", "--pidfile", str(RUN / "nbdfuse.pid"), str(RUN / "fuse/disk"),
        "--unix", str(RUN / "nbd.sock")]
    ro = commands.nbdfuse_argv(fuse_file=Path("/f/d"), unix_socket=Path("/s"),
                           pidfile=Path("/p"), read_only=True)
    assert ro.index("--readonly") < ro.index("/f/d")
    assert commands.losetup_attach_argv(Path("/f/d"), sector_size=4096, read_only=False) == [
        "losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on", "/f/d"]
    assert commands.losetup_attach_argv(Path("/f/d"), sector_size=512, read_only=True,
                                    direct_io=False) == [
        "losetup", "--find", "--show", "--sector-size", "512", "--read-only", "/f/d"]
    assert commands.losetup_detach_argv("/dev/loop3") == ["losetup", "--detach", "/dev/loop3"]
    assert commands.fusermount_unmount_argv(Path("/r/fuse")) == ["fusermount3", "-u", "/r/fuse"]
    assert commands.fusermount_unmount_argv(Path("/r/fuse"), lazy=True) == [
        "fusermount3", "-uz", "/r/fuse"]
    assert commands.blockdev_flush_argv("/dev/loop3") == ["blockdev", "--flushbufs", "/dev/loop3"]
    assert commands.modprobe_argv("nbd") == ["modprobe", "--quiet", "nbd"]


def test_nbd_client_argv():
    argv = commands.nbd_client_connect_argv(unix_socket=RUN / "nbd.sock", device="/dev/nbd2",
                                        sector_size=4096, export_name="d1", read_only=False)
    # nbd-client 3.24: -unix makes the first positional the socket path; -N is mandatory
    assert argv == ["nbd-client", "-unix", str(RUN / "nbd.sock"), "/dev/nbd2",
                    "-b", "4096", "-N", "d1"]
    ro = commands.nbd_client_connect_argv(unix_socket=Path("/s"), device="/dev/nbd0",
                                      sector_size=512, export_name="x", read_only=True)
    assert ro[-1] == "-readonly" and ro[ro.index("-b") + 1] == "512"
    assert commands.nbd_client_disconnect_argv("/dev/nbd2") == ["nbd-client", "-d", "/dev/nbd2"]
