"""`blockcrypt disk serve` started in the background for end-to-end tests."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from .cli import REPO
from .env import Env

READY_TIMEOUT_S = 60


def start_serve(e: Env, name: str, *args) -> tuple[subprocess.Popen, dict]:
    """Start `disk serve NAME ARGS --json`; return the process and its ready record
    (stdout is read up to the JSON object, stderr left for the caller)."""
    argv = [sys.executable, "-m", "blockcrypt", "--home", str(e.home), "--passphrase-file",
            str(e.passphrase_file), "disk", "serve", name, *args, "--json"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    out = b""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"serve exited {p.wait()}: {p.stderr.read().decode()}")
        out += line
        if line.startswith(b"}"):
            return p, json.loads(out)
    p.kill()
    raise AssertionError("serve did not become ready")
