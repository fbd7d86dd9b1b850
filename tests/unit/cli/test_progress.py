"""Progress of the long operations (issue 14): bytes done, rate and ETA on stderr,
redrawn in place, when run on a terminal (a real pseudo-terminal here); nothing
extra on a pipe, with stdout not a terminal, or with --json.  `disk copy` (rsync's
progress line, root) is in tests/e2e/test_progress_copy.py."""
from __future__ import annotations

import io
import json
import os
import re

import pytest

from blockcrypt.cli.progress import Meter
from blockcrypt.storage import container

from support.cli import run_cli, run_cli_tty

MiB = 2**20
# "LABEL: 3 MiB of 6 MiB (50%), 120 MiB/s, ETA 0:01" - the final one says "done in"
LINE = re.compile(r"\r[^\r\n]+: [\d.]+ [KMG]?i?B of [\d.]+ [KMG]?i?B \(\d+%\)")


def test_meter_draws_bytes_rate_and_eta_in_place():
    now = [100.0]
    out = io.StringIO()
    m = Meter("snapshot s", out, clock=lambda: now[0], interval_s=0.5)
    m(0, 100 * MiB)
    now[0] += 1
    m(25 * MiB, 100 * MiB)
    now[0] += 0.1
    m(30 * MiB, 100 * MiB)          # within the redraw interval: skipped
    now[0] += 1
    m(100 * MiB, 100 * MiB)         # the end is always drawn
    m.close()
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert frames[0] == "snapshot s: 0 B of 100 MiB (0%)\x1b[K"
    assert frames[1] == "snapshot s: 25 MiB of 100 MiB (25%), 25 MiB/s, ETA 0:03\x1b[K"
    assert frames[2] == "snapshot s: 100 MiB of 100 MiB (100%), 47.6 MiB/s, done in 0:02" \
                        "\x1b[K\n"
    assert len(frames) == 3


@pytest.fixture
def filled(home, passphrase_file):
    """An initialised home with plain disk d holding 6 MiB of data and snapshot s0."""
    def run(*args, check=True):
        return run_cli(*args, home=home, passphrase_file=passphrase_file, check=check)
    run("init")
    run("disk", "create", "d", "--size", "64M", "--no-encrypted")
    path = json.loads(run("disk", "show", "d", "--json").stdout)["path"]
    offset = container.read_header(path).data_offset
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), os.urandom(6 * MiB), offset + 8 * MiB)
    run("snapshot", "create", "d", "s0")
    return run


def _ops(tmp_path):
    return {
        "snapshot create": ["snapshot", "create", "d", "s1"],
        "disk create --from-snapshot": ["disk", "create", "e", "--from-snapshot", "s0"],
        "snapshot export": ["snapshot", "export", "s0", str(tmp_path / "s0.img")],
        "disk reset": ["disk", "reset", "d", "--snapshot", "s0"],
    }


OPS = ["snapshot create", "disk create --from-snapshot", "snapshot export", "disk reset"]


@pytest.mark.parametrize("op", OPS)
def test_progress_on_a_terminal(filled, home, passphrase_file, tmp_path, op):
    rc, out, err = run_cli_tty(*_ops(tmp_path)[op], home=home, passphrase_file=passphrase_file)
    assert rc == 0, err
    text = err.decode()
    frames = LINE.findall(text)
    assert frames, text
    assert "\x1b[K" in text and text.endswith("\n")          # redrawn in place, then ended
    assert re.search(r"\((100)%\)", frames[-1])               # it finished
    assert re.search(r"of \d", frames[-1]) and "MiB" in frames[-1]
    assert b"\x1b[K" not in out and not LINE.search(out.decode())   # stdout: the result


@pytest.mark.parametrize("op", OPS)
def test_no_progress_on_pipes_or_with_json(filled, home, passphrase_file, tmp_path, op):
    argv = _ops(tmp_path)[op]
    cp = run_cli(*argv, home=home, passphrase_file=passphrase_file)     # plain pipes
    assert cp.stderr == b"" and b"\r" not in cp.stdout
    # undo, so the same command can run again
    cleanup = {"snapshot create": ["snapshot", "delete", "s1"],
               "disk create --from-snapshot": ["disk", "delete", "e"]}.get(op)
    if cleanup:
        run_cli(*cleanup, home=home, passphrase_file=passphrase_file)
    if op == "snapshot export":
        os.unlink(tmp_path / "s0.img")
    rc, out, err = run_cli_tty(*argv, "--json", home=home, passphrase_file=passphrase_file)
    assert rc == 0 and err == b"", err
    json.loads(out)
    if cleanup:
        run_cli(*cleanup, home=home, passphrase_file=passphrase_file)
    if op == "snapshot export":
        os.unlink(tmp_path / "s0.img")
    # stdout redirected to a file or pipe, stderr still a terminal: nothing extra either
    rc, out, err = run_cli_tty(*argv, home=home, passphrase_file=passphrase_file,
                               stdout_tty=False)
    assert rc == 0 and err == b"", err
