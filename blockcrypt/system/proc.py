"""Running external programs and asking the kernel about processes.

Owns: :func:`run` (wait for a short command) and :func:`spawn` (start a
long-running server), the only places that execute anything; both map "program
not installed" to :class:`~blockcrypt.errors.MissingTool` (naming the Debian
package) and :func:`run` maps a non-zero exit to
:class:`~blockcrypt.errors.CommandFailed`.  And the process queries attach and
detach need (is a pid still our nbdkit? stop it), read from ``/proc``.

Argument vectors are built by :mod:`blockcrypt.system.commands`; mounts and block
devices are queried by :mod:`blockcrypt.system.devices`.  Nothing here builds an
argv or knows a program's options.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import errors
from .commands import PACKAGES

STDERR_TAIL_CHARS = 2000

# The runner used by run() and run_visible(); tests replace it to check argv and
# error mapping.
_runner = subprocess.run


# -- running --------------------------------------------------------------

def _missing(argv: Sequence[str]) -> errors.MissingTool:
    tool = os.path.basename(argv[0])
    return errors.MissingTool(tool=tool, package=PACKAGES.get(tool, tool))


def run(argv: Sequence[str], *, check: bool = True, timeout_s: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a short command, capture its output; map failures to blockcrypt errors.

    MissingTool if the program is not installed; CommandFailed (with the tail
    of stderr) if it exits non-zero and check is true, or runs past timeout_s.
    """
    argv = [str(a) for a in argv]
    try:
        cp = _runner(argv, capture_output=True, timeout=timeout_s, input=input,
                     stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise _missing(argv) from None
    except subprocess.TimeoutExpired:
        raise errors.CommandFailed(cmd=" ".join(argv), rc="timeout",
                                   stderr=f"no exit after {timeout_s:g} s") from None
    if check and cp.returncode != 0:
        stderr = (cp.stderr or b"").decode(errors="replace").strip()
        raise errors.CommandFailed(cmd=" ".join(argv), rc=cp.returncode,
                                   stderr=stderr[-STDERR_TAIL_CHARS:] or "(no output)")
    return cp


def run_visible(argv: Sequence[str], *, timeout_s: float | None = None,
                stdout_to_stderr: bool = False) -> None:
    """Run a command with this process's stdout and stderr (a progress display
    on the user's terminal; with ``stdout_to_stderr`` its stdout goes to our stderr,
    keeping our stdout for the result); MissingTool / CommandFailed as :func:`run`."""
    argv = [str(a) for a in argv]
    extra = {"stdout": sys.stderr.fileno()} if stdout_to_stderr else {}
    try:
        rc = _runner(argv, timeout=timeout_s, stdin=subprocess.DEVNULL, **extra).returncode
    except FileNotFoundError:
        raise _missing(argv) from None
    except subprocess.TimeoutExpired:
        raise errors.CommandFailed(cmd=" ".join(argv), rc="timeout",
                                   stderr=f"no exit after {timeout_s:g} s") from None
    if rc != 0:
        raise errors.CommandFailed(cmd=" ".join(argv), rc=rc, stderr="(shown above)")


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None,
          pass_fds: Sequence[int] = (), stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """Start a long-running program in its own session (it outlives the CLI and
    a Ctrl-C on the CLI's terminal does not reach it); stdin is /dev/null."""
    argv = [str(a) for a in argv]
    try:
        return subprocess.Popen(argv, env=env, pass_fds=tuple(pass_fds),
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                start_new_session=True, close_fds=True, umask=0o077)
    except FileNotFoundError:
        raise _missing(argv) from None


# -- processes ------------------------------------------------------------

def cmdline(pid: int) -> list[str] | None:
    """argv of a live process, or None (no such process, or a zombie)."""
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if not raw:  # zombies and kernel threads have an empty cmdline
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def pid_matches(pid: int | None, program: str, marker: str | None = None) -> bool:
    """Is pid alive and running `program` (basename of argv[0]) with `marker`
    somewhere in its argv?  Guards against a pid reused by another program."""
    if not pid:
        return False
    argv = cmdline(pid)
    if not argv:
        return False
    # argv[0], or an interpreter's script or module (`python -m blockcrypt`)
    if not any(os.path.basename(a) == program for a in argv[:3]):
        return False
    return marker is None or any(marker in a for a in argv)


def find_processes(program: str, marker: str) -> list[int]:
    """Pids of live processes running program with marker in their argv."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and pid_matches(int(d.name), program, marker):
            pids.append(int(d.name))
    return sorted(pids)


def process_start_time(pid: int | None) -> int | None:
    """Start time of pid in clock ticks since boot (field 22 of /proc/PID/stat),
    or None if there is no such live process.  (pid, start time) names one
    process: a reused pid has a different start time."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] == "Z":  # zombie: it has exited
        return None
    return int(fields[19])


def process_alive(pid: int | None, start_time: int | None) -> bool:
    """Is the process (pid, start_time) still running?"""
    return pid is not None and start_time is not None and \
        process_start_time(pid) == start_time


def read_pidfile(path: Path) -> int | None:
    try:
        text = Path(path).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def wait_gone(pid: int, program: str, marker: str | None, timeout_s: float) -> bool:
    """Poll until pid no longer runs program/marker; True if it is gone."""
    deadline = time.monotonic() + timeout_s
    while pid_matches(pid, program, marker):
        _reap(pid)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    """Collect pid if it is our own exited child (so it is not left a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_process(pid: int | None, program: str, marker: str | None,
                 timeout_s: float = 10.0) -> None:
    """SIGTERM, wait up to timeout_s, then SIGKILL; only if pid still is ours."""
    if not pid_matches(pid, program, marker):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait_gone(pid, program, marker, timeout_s):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(pid, program, marker, 5.0)
