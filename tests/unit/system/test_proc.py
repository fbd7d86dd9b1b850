"""blockcrypt.system.proc: argv construction (pure), error mapping of the runner, and the
/proc and /sys queries attach and detach rely on."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.system import proc

PLUGIN = Path("/repo/blockcrypt/nbd/plugin.py")
RUN = Path("/home/bc/run/d1")


def _nbdkit(**kw):
    args = dict(plugin_script=PLUGIN, container=Path("/home/bc/disks/abc.bcd"), read_only=False,
                discard=False, keyfd=7, pidfile=RUN / "nbdkit.pid",
                pause_control=RUN / "ctl.sock", unix_socket=RUN / "nbd.sock")
    args.update(kw)
    return proc.nbdkit_argv(**args)


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


def test_nbdkit_argv_threads():
    argv = _nbdkit()
    assert argv[argv.index("--threads") + 1] == str(proc.NBDKIT_THREADS) == "4"
    argv = _nbdkit(threads=16)
    assert argv[argv.index("--threads") + 1] == "16"
    assert argv.index("--threads") < argv.index("python")     # an nbdkit option
    for bad in (0, -1, proc.MAX_NBDKIT_THREADS + 1, True, "4"):
        with pytest.raises(ValueError):
            _nbdkit(threads=bad)


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
    argv = proc.supervised_argv(["sh", "-c", script])
    assert argv[:4] == ["/bin/sh", "-c", '"$@"; exit $?', proc.SUPERVISOR_NAME]
    p = subprocess.Popen(argv, cwd=tmp_path)
    assert p.wait() == 7
    # the command's parent was the supervisor, not us
    assert int((tmp_path / "ppid").read_text()) == p.pid


# -- other argv builders ------------------------------------------------------

def test_nbdfuse_losetup_fusermount_argv():
    assert proc.nbdfuse_argv(fuse_file=RUN / "fuse/disk", unix_socket=RUN / "nbd.sock",
                             pidfile=RUN / "nbdfuse.pid", read_only=False) == [
        "nbdfuse", "--pidfile", str(RUN / "nbdfuse.pid"), str(RUN / "fuse/disk"),
        "--unix", str(RUN / "nbd.sock")]
    ro = proc.nbdfuse_argv(fuse_file=Path("/f/d"), unix_socket=Path("/s"),
                           pidfile=Path("/p"), read_only=True)
    assert ro.index("--readonly") < ro.index("/f/d")
    assert proc.losetup_attach_argv(Path("/f/d"), sector_size=4096, read_only=False) == [
        "losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on", "/f/d"]
    assert proc.losetup_attach_argv(Path("/f/d"), sector_size=512, read_only=True,
                                    direct_io=False) == [
        "losetup", "--find", "--show", "--sector-size", "512", "--read-only", "/f/d"]
    assert proc.losetup_detach_argv("/dev/loop3") == ["losetup", "--detach", "/dev/loop3"]
    assert proc.fusermount_unmount_argv(Path("/r/fuse")) == ["fusermount3", "-u", "/r/fuse"]
    assert proc.fusermount_unmount_argv(Path("/r/fuse"), lazy=True) == [
        "fusermount3", "-uz", "/r/fuse"]
    assert proc.blockdev_flush_argv("/dev/loop3") == ["blockdev", "--flushbufs", "/dev/loop3"]
    assert proc.modprobe_argv("nbd") == ["modprobe", "--quiet", "nbd"]


def test_nbd_client_argv():
    argv = proc.nbd_client_connect_argv(unix_socket=RUN / "nbd.sock", device="/dev/nbd2",
                                        sector_size=4096, export_name="d1", read_only=False)
    # nbd-client 3.24: -unix makes the first positional the socket path; -N is mandatory
    assert argv == ["nbd-client", "-unix", str(RUN / "nbd.sock"), "/dev/nbd2",
                    "-b", "4096", "-N", "d1"]
    ro = proc.nbd_client_connect_argv(unix_socket=Path("/s"), device="/dev/nbd0",
                                      sector_size=512, export_name="x", read_only=True)
    assert ro[-1] == "-readonly" and ro[ro.index("-b") + 1] == "512"
    assert proc.nbd_client_disconnect_argv("/dev/nbd2") == ["nbd-client", "-d", "/dev/nbd2"]


# -- run(): error mapping (the runner is the only thing mocked) ----------------

def test_run_missing_tool_maps_to_missing_tool(monkeypatch):
    def runner(argv, **kw):
        raise FileNotFoundError(2, "No such file", argv[0])
    monkeypatch.setattr(proc, "_runner", runner)
    with pytest.raises(errors.MissingTool) as ei:
        proc.run(["nbdfuse", "x"])
    assert ei.value.exit_code == errors.MissingTool.exit_code
    assert "nbdfuse not found" in ei.value.message
    assert "apt-get install libnbd-bin" in ei.value.message


def test_run_nonzero_maps_to_command_failed(monkeypatch):
    seen = {}

    def runner(argv, **kw):
        seen.update(argv=argv, **kw)
        return subprocess.CompletedProcess(argv, 32, b"", b"x" * 5000 + b"losetup: busy")
    monkeypatch.setattr(proc, "_runner", runner)
    with pytest.raises(errors.CommandFailed) as ei:
        proc.run(["losetup", "--detach", Path("/dev/loop0")])
    e = ei.value
    assert e.exit_code == errors.CommandFailed.exit_code
    assert "losetup --detach /dev/loop0 failed (exit 32)" in e.message
    assert e.message.endswith("losetup: busy")
    assert len(e.message) < proc.STDERR_TAIL_CHARS + 200   # only the tail of stderr
    assert seen["argv"] == ["losetup", "--detach", "/dev/loop0"]  # stringified
    assert seen["capture_output"] is True
    # check=False returns the result instead
    assert proc.run(["losetup"], check=False).returncode == 32


def test_run_timeout_maps_to_command_failed(monkeypatch):
    def runner(argv, **kw):
        raise subprocess.TimeoutExpired(argv, kw["timeout"])
    monkeypatch.setattr(proc, "_runner", runner)
    with pytest.raises(errors.CommandFailed, match="no exit after 3 s"):
        proc.run(["nbd-client", "-d", "/dev/nbd0"], timeout_s=3)


def test_run_and_spawn_real_missing_program():
    with pytest.raises(errors.MissingTool, match="blockcrypt-no-such-tool not found"):
        proc.run(["blockcrypt-no-such-tool"])
    with pytest.raises(errors.MissingTool):
        proc.spawn(["blockcrypt-no-such-tool"])


def test_run_real_success_and_failure():
    assert proc.run([sys.executable, "-c", "print('ok')"]).stdout == b"ok\n"
    with pytest.raises(errors.CommandFailed, match="exit 3.*boom"):
        proc.run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])


# -- processes -------------------------------------------------------------

def _sleeper(marker: str) -> subprocess.Popen:
    """A process running `sh` with marker in its argv (like nbdkit with its run dir)."""
    p = subprocess.Popen(["sh", "-c", "sleep 30; :", marker + "x"])
    for _ in range(100):
        if proc.pid_matches(p.pid, "sh", marker):
            break
        time.sleep(0.02)
    return p


def test_pid_matches_and_start_time(tmp_path):
    marker = str(tmp_path) + "/"
    p = _sleeper(marker)
    try:
        assert proc.pid_matches(p.pid, "sh", marker)
        assert not proc.pid_matches(p.pid, "nbdkit", marker)     # another program
        assert not proc.pid_matches(p.pid, "sh", "/elsewhere/")  # another run dir
        start = proc.process_start_time(p.pid)
        assert proc.process_alive(p.pid, start)
        assert not proc.process_alive(p.pid, start + 1)         # a reused pid
        assert proc.find_processes("sh", marker) == [p.pid]
    finally:
        p.kill()
    # an unreaped child is a zombie: not alive for these checks
    deadline = 50
    while proc.cmdline(p.pid) is not None and deadline:
        time.sleep(0.05)
        deadline -= 1
    assert not proc.pid_matches(p.pid, "sh", marker)
    assert proc.process_start_time(p.pid) is None
    p.wait()
    assert not proc.pid_matches(None, "sleep")


def test_stop_process_terminates_only_matching(tmp_path):
    marker = str(tmp_path) + "/"
    p = _sleeper(marker)
    proc.stop_process(p.pid, "sh", "/not/this/")   # wrong marker: left alone
    assert p.poll() is None
    proc.stop_process(p.pid, "sh", marker, timeout_s=5)
    assert p.wait(timeout=5) == -15   # SIGTERM


def test_read_pidfile(tmp_path):
    f = tmp_path / "pid"
    assert proc.read_pidfile(f) is None
    f.write_text("1234\n")
    assert proc.read_pidfile(f) == 1234
    f.write_text("")
    assert proc.read_pidfile(f) is None


# -- mounts and block devices ---------------------------------------------------

def test_mountinfo_sees_root_and_unescapes(monkeypatch, tmp_path):
    assert any(mp == "/" for _, mp in proc.mountinfo())
    assert proc.is_mountpoint(Path("/"))
    assert not proc.is_mountpoint(tmp_path)
    assert proc._unescape_mount(r"/mnt/with\040space\011tab\134") == "/mnt/with space\ttab\\"


def test_device_queries_on_missing_device(tmp_path):
    assert proc.block_device_ids("/dev/blockcrypt-none") == {}
    assert proc.device_mounts("/dev/blockcrypt-none") == []
    assert proc.device_holders("/dev/blockcrypt-none") == []
    assert proc.loop_devices_backed_by(tmp_path / "nothing") == []
    assert not proc.open_exclusively_busy(str(tmp_path / "nothing"))
