"""blockcrypt.system.proc: error mapping of the runner, and the /proc queries attach and
detach rely on."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.system import proc

from support.wait import wait_for

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
    wait_for(lambda: proc.pid_matches(p.pid, "sh", marker), 10.0, "sh to exec with the marker")
    # sh forks a child for `sleep`; until that child execs, it is a second `sh` with the
    # marker (seen under load): wait until the shell is the only one.
    wait_for(lambda: proc.find_processes("sh", marker) == [p.pid], 10.0,
             "sh's child to exec sleep")
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
    # an unreaped child is a zombie: not alive for these checks.  waitid(WNOWAIT) returns
    # once it is one and leaves it unreaped.  (Its cmdline empties earlier, while it is
    # still exiting and its stat still says R: CI once saw a start time there.)
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    assert proc.cmdline(p.pid) is None
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
