"""Run the blockcrypt CLI as a user would: a subprocess, no terminal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_PY = REPO / ".venv" / "bin" / "python"


def run_cli(*args, home: Path | None = None, passphrase_file: Path | None = None,
            check: bool = True, input: bytes | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m blockcrypt` in a subprocess, as a user would."""
    argv = [sys.executable, "-m", "blockcrypt"]
    if home is not None:
        argv += ["--home", str(home)]
    if passphrase_file is not None:
        argv += ["--passphrase-file", str(passphrase_file)]
    argv += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.update(env or {})
    # No terminal on stdin unless input is given: a command must never hang on a prompt.
    stdin = None if input is not None else subprocess.DEVNULL
    cp = subprocess.run(argv, capture_output=True, input=input, stdin=stdin, env=full_env,
                        timeout=timeout, cwd=REPO)
    if check and cp.returncode != 0:
        raise AssertionError(f"{argv} exited {cp.returncode}\nstdout: {cp.stdout.decode()}"
                             f"\nstderr: {cp.stderr.decode()}")
    return cp


CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh root shell (as `env -i` plus a login would give):
    nothing of the test process's own environment, so no PYTHONPATH, no venv."""
    return {"PATH": CLEAN_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8", **extra}


def user_env(tmp_path: Path, passphrase: bytes) -> tuple[Path, dict[str, str]]:
    """A not yet initialised home under ``tmp_path`` and the clean environment of a
    user who keeps the passphrase in a 0600 file (``$BLOCKCRYPT_PASSPHRASE_FILE``)."""
    home, pf = tmp_path / "home", tmp_path / "passphrase"
    pf.write_bytes(passphrase + b"\n")
    pf.chmod(0o600)
    return home, clean_env(BLOCKCRYPT_HOME=str(home), BLOCKCRYPT_PASSPHRASE_FILE=str(pf),
                           BLOCKCRYPT_TESTONLY_WEAK_KDF="1")


def run_shell(command: str, *, env: dict[str, str], cwd: Path, check: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one command line with `bash -c`, exactly as typed, in ``env`` only."""
    cp = subprocess.run(["/bin/bash", "-c", command], env=env, cwd=cwd, capture_output=True,
                        stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    if check and cp.returncode != 0:
        raise AssertionError(f"{command!r} exited {cp.returncode}\nstdout: {cp.stdout.decode()}"
                             f"\nstderr: {cp.stderr.decode()}")
    return cp


def run_cli_tty(*args, home: Path | None = None, passphrase_file: Path | None = None,
                stdout_tty: bool = True, timeout: float = 300) -> tuple[int, bytes, bytes]:
    """Run the CLI with stderr (and, unless ``stdout_tty`` is False, stdout) on a
    pseudo-terminal each, as in an interactive shell; returns (rc, stdout, stderr)."""
    import pty
    import threading
    argv = [sys.executable, "-m", "blockcrypt"]
    if home is not None:
        argv += ["--home", str(home)]
    if passphrase_file is not None:
        argv += ["--passphrase-file", str(passphrase_file)]
    argv += [str(a) for a in args]
    ptys = [pty.openpty() for _ in range(2 if stdout_tty else 1)]
    out: dict[int, list[bytes]] = {}

    def drain(fd: int) -> None:
        chunks = out.setdefault(fd, [])
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:          # EIO: the other side is closed
                return
            if not data:
                return
            chunks.append(data)

    err_master, err_slave = ptys[-1]
    stdout = ptys[0][1] if stdout_tty else subprocess.PIPE
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err_slave,
                            cwd=REPO)
    for _, slave in ptys:
        os.close(slave)
    readers = [threading.Thread(target=drain, args=(m,)) for m, _ in ptys]
    for t in readers:
        t.start()
    piped = proc.stdout.read() if not stdout_tty else None
    rc = proc.wait(timeout=timeout)
    for t in readers:
        t.join(timeout)
    for master, _ in ptys:
        os.close(master)
    got_out = piped if piped is not None else b"".join(out[ptys[0][0]])
    return rc, got_out, b"".join(out[err_master])
