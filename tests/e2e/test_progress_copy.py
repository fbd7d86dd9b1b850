"""End to end: `disk copy` shows rsync's progress line (bytes, percentage, rate, ETA)
on stderr when run on a terminal (a pseudo-terminal), and nothing extra on pipes or
with --json (root: attach, mount, rsync).  The container copies' progress is in
tests/unit/cli/test_progress.py."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from support.cli import run_cli_tty
from support.prereq import require_tools

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 2**20
# rsync --info=progress2: "     8,388,608 100%   95.24MB/s    0:00:00 (xfr#3, to-chk=0/5)"
RSYNC_LINE = re.compile(r"[\d,]+\s+\d+%\s+[\d.]+[kMG]?B/s\s+\d+:\d\d:\d\d")


@pytest.fixture
def source(env):
    require_tools("mkfs.ext4", "rsync")
    env.create("src", "64M", "--no-encrypted")
    dev = env.attach("src")["device"]
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    mp = env.mount(dev)
    (mp / "data.bin").write_bytes(os.urandom(8 * MiB))
    env.umount(mp)
    env.detach("src")
    return env


def test_disk_copy_progress_on_a_terminal_only(source):
    env = source
    env.create("dst1", "64M")
    rc, out, err = run_cli_tty("disk", "copy", "src", "dst1", home=env.home,
                               passphrase_file=env.passphrase_file)
    assert rc == 0, err
    assert RSYNC_LINE.search(err.decode()), err
    assert not RSYNC_LINE.search(out.decode()) and b"copied the files" in out

    env.create("dst2", "64M")
    cp = env.cli("disk", "copy", "src", "dst2")                       # pipes
    assert not RSYNC_LINE.search(cp.stderr.decode() + cp.stdout.decode())
    env.create("dst3", "64M")
    rc, out, err = run_cli_tty("disk", "copy", "src", "dst3", "--json", home=env.home,
                               passphrase_file=env.passphrase_file)
    assert rc == 0 and not RSYNC_LINE.search(err.decode()), err
    assert json.loads(out)["destination"] == "dst3"
