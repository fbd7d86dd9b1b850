"""Start nbdkit with the blockcrypt plugin for tests, and talk to it with libnbd.

    with serve_container(path, dk) as srv:
        h = connect(srv.socket)
        ...

The data key travels as the CLI sends it: through an inherited pipe whose
descriptor number is the only thing on the command line.  The socket sits in a
private (0700) directory; nbdkit's stderr (its log, verbose with ``verbose=True``)
goes to ``srv.log``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from blockcrypt.nbd.launch import plugin_env, plugin_path

PLUGIN = plugin_path()
SYSTEM_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")


@dataclass
class Server:
    socket: Path
    proc: subprocess.Popen
    log: Path
    handles: list = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self, *, strict: bool = True):
        """A libnbd handle, disconnected when the server context ends.

        (nbdkit does not exit on SIGTERM while a client stays connected.)
        """
        h = connect(self.socket, strict=strict)
        self.handles.append(h)
        return h

    def disconnect_all(self) -> None:
        for h in self.handles:
            try:
                h.shutdown()
            except Exception:
                pass                                    # already shut down or dead
        self.handles.clear()


def _key_bytes(dk) -> bytes | bytearray | memoryview | None:
    if dk is None:
        return None
    return dk.view() if hasattr(dk, "view") else dk


@contextlib.contextmanager
def serve_container(container: str | os.PathLike, dk=None, *, readonly: bool = False,
                    discard: bool = False, filters: tuple[str, ...] = (),
                    filter_args: tuple[str, ...] = (), plugin_args: tuple[str, ...] = (),
                    verbose: bool = False, threads: int | None = None,
                    start_timeout: float = 30.0, extra_env: dict[str, str] | None = None):
    """Run ``nbdkit -f -U SOCK -P PIDFILE --exit-with-parent python PLUGIN file=...``;
    yield a Server once nbdkit has written its pid file (it is then listening).

    ``dk`` (a Secret or bytes) is written into a pipe passed as ``keyfd``;
    ``filters`` are filter names (``--filter=NAME``) and ``filter_args`` their
    ``key=value`` parameters; ``plugin_args`` are extra raw plugin parameters
    (to test refusals); ``extra_env`` is added to nbdkit's environment.
    Raises RuntimeError with nbdkit's log if the server does not come up.
    """
    workdir = Path(tempfile.mkdtemp(prefix="bc-nbdkit-"))
    os.chmod(workdir, 0o700)
    sock = workdir / "nbd.sock"
    log = workdir / "nbdkit.log"
    pidfile = workdir / "nbdkit.pid"       # written once nbdkit listens
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile)]
    if verbose:
        argv.append("-v")
    if threads is not None:
        argv += ["-t", str(threads)]
    argv += [f"--filter={f}" for f in filters]
    argv += ["python", str(PLUGIN), f"file={os.fspath(container)}"]
    if readonly:
        argv.append("readonly=true")
    if discard:
        argv.append("discard=true")
    key = _key_bytes(dk)
    pass_fds: tuple[int, ...] = ()
    rfd = -1
    if key is not None:
        rfd, wfd = os.pipe()
        try:
            os.write(wfd, key)      # 64 bytes: fits the pipe buffer
        finally:
            os.close(wfd)
        argv.append(f"keyfd={rfd}")
        pass_fds = (rfd,)
    argv += list(filter_args) + list(plugin_args)
    proc = None
    try:
        with open(log, "wb") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, pass_fds=pass_fds,
                                    env={**plugin_env(), **(extra_env or {})})
        if rfd >= 0:
            os.close(rfd)
            rfd = -1
        deadline = time.monotonic() + start_timeout
        while not (pidfile.exists() and pidfile.read_text().strip() == str(proc.pid)):
            if proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited {proc.returncode} before serving:\n"
                                   f"{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit not serving on {sock} within {start_timeout}s:\n"
                                   f"{log.read_text(errors='replace')}")
            time.sleep(0.02)
        server = Server(sock, proc, log)
        try:
            yield server
        finally:
            server.disconnect_all()
    finally:
        if rfd >= 0:
            os.close(rfd)
        if proc is not None:
            stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM nbdkit (it finishes in-flight requests and runs cleanup), then SIGKILL.

    nbdkit waits for connected clients to go away before it exits: disconnect
    them first (:meth:`Server.disconnect_all`) or this falls back to SIGKILL.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_nbdkit(container: str | os.PathLike, *plugin_args: str, dk=None,
               timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run nbdkit with ``--run true`` (start, serve nothing, exit): for config refusals."""
    argv = ["nbdkit", "-U", "-", "--run", "true", "python", str(PLUGIN),
            f"file={os.fspath(container)}", *plugin_args]
    pass_fds: tuple[int, ...] = ()
    rfd = -1
    key = _key_bytes(dk)
    if key is not None:
        rfd, wfd = os.pipe()
        os.write(wfd, key)
        os.close(wfd)
        argv.append(f"keyfd={rfd}")
        pass_fds = (rfd,)
    try:
        return subprocess.run(argv, capture_output=True, pass_fds=pass_fds,
                              env=plugin_env(), timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        if rfd >= 0:
            os.close(rfd)


def import_libnbd():
    """libnbd's Python bindings (Debian python3-libnbd), which the venv does not see.

    Loads only ``libnbdmod`` and ``nbd`` from the system dist-packages, rather
    than putting that whole directory on sys.path.
    """
    if "nbd" in sys.modules:
        return sys.modules["nbd"]
    so = next(iter(SYSTEM_DIST_PACKAGES.glob("libnbdmod.cpython-*.so")), None)
    py = SYSTEM_DIST_PACKAGES / "nbd.py"
    if so is None or not py.exists():
        return None
    for name, path in (("libnbdmod", so), ("nbd", py)):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception:
            sys.modules.pop(name, None)
            raise
    return sys.modules["nbd"]


def connect(sock: Path, *, strict: bool = True):
    """A libnbd handle connected to the Unix socket (``strict=False``: no client-side checks)."""
    nbd = import_libnbd()
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.connect_unix(str(sock))
    return h
