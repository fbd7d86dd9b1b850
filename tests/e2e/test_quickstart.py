"""README's Quick start, typed exactly as written by a new user (issue 18, "Done when").

The indented block under "## Quick start" in README.md is run line by line with
`bash -c` in a clean environment (nothing of this process's environment: PATH,
HOME, and the blockcrypt variables README documents), using the `blockcrypt`
that `make install` linked into /usr/local/bin.  Only what README marks as
placeholders is substituted: the device name (`/dev/nbd0`, "e.g." in README)
becomes the one `disk attach` printed, `/mnt` a scratch mount point, and the
`...` line (the user's own work) writes a file.  Afterwards the disk made from
the snapshot must hold that file.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support.cli import CLEAN_PATH, REPO, run_shell, user_env
from support.env import teardown_home
from support.prereq import require, require_block_devices

LINK = Path("/usr/local/bin/blockcrypt")
DEVICE_PLACEHOLDER = "/dev/nbd0"
MOUNT_PLACEHOLDER = re.compile(r"(?<![\w/.])/mnt(?![\w/])")
ELLIPSIS = "..."


def quick_start_commands(readme: str) -> list[str]:
    """The lines of the first indented code block after the "## Quick start" heading."""
    lines = readme.split("## Quick start\n", 1)[1].splitlines()
    block: list[str] = []
    for line in lines:
        if line.startswith("    "):
            block.append(line[4:])
        elif (block and line.strip()) or line.startswith("#"):
            break
    return [line for line in block if line.strip()]


def split_comment(line: str) -> tuple[str, str]:
    """(command, trailing `# comment`): placeholders in comments stay as written."""
    m = re.search(r"\s#", line)
    return (line, "") if m is None else (line[:m.start()], line[m.start():])


def test_quick_start_block_is_found_and_has_its_placeholders():
    commands = quick_start_commands((REPO / "README.md").read_text())
    assert commands and commands[0].startswith("blockcrypt init")
    assert any(c.startswith("blockcrypt disk attach") for c in commands)
    assert ELLIPSIS in commands
    assert any(DEVICE_PLACEHOLDER in split_comment(c)[0] for c in commands)
    assert any(MOUNT_PLACEHOLDER.search(split_comment(c)[0]) for c in commands)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
@pytest.mark.root
def test_quick_start_runs_exactly_as_written(tmp_path):
    require_block_devices()
    found = shutil.which("blockcrypt", path=CLEAN_PATH)
    require(found == str(LINK), f"`blockcrypt` on a clean PATH is {found}, not {LINK}: "
                                f"run `make install` as root")
    require(LINK.resolve() == (REPO / ".venv" / "bin" / "blockcrypt").resolve(),
            f"{LINK} leads to {LINK.resolve()}, not this checkout: run `make install` here")

    home, env = user_env(tmp_path, b"a quick start passphrase")
    work, mnt, mnt2 = (tmp_path / n for n in ("work", "mnt", "mnt2"))
    for d in (work, mnt, mnt2):
        d.mkdir()

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_shell(" ".join(["blockcrypt", *args]), env=env, cwd=work, check=check)

    commands = quick_start_commands((REPO / "README.md").read_text())
    device: str | None = None
    written: dict[str, str] = {}
    try:
        for command in commands:
            if command == ELLIPSIS:                   # the user's own work on the disk
                (mnt / "notes.txt").write_text("written before the snapshot\n")
                with open(mnt / "random.bin", "wb") as f:
                    f.write(os.urandom(3 << 20))
                    os.fsync(f.fileno())
                os.sync()                             # a snapshot is crash-consistent
                written = {p.name: sha256(p) for p in mnt.iterdir() if p.is_file()}
                continue
            code, comment = split_comment(command)
            if DEVICE_PLACEHOLDER in code:
                assert device is not None, f"{command!r} uses the device before `disk attach`"
                code = code.replace(DEVICE_PLACEHOLDER, device)
            code = MOUNT_PLACEHOLDER.sub(str(mnt), code)
            cp = run_shell(code + comment, env=env, cwd=work)
            if command.startswith("blockcrypt disk attach"):
                printed = [w for w in cp.stdout.decode().split() if w.startswith("/dev/")]
                assert len(printed) == 1, f"attach printed {cp.stdout.decode()!r}"
                device = printed[0]
        assert written, "the Quick start block has no `...` line between mount and snapshot"

        # the disk made from the snapshot holds what was written before it
        dev2 = cli("disk", "attach", "db2").stdout.decode().split()[-1]
        subprocess.run(["mount", "-o", "ro", dev2, str(mnt2)], check=True, capture_output=True)
        try:
            assert {p.name: sha256(p) for p in mnt2.iterdir() if p.is_file()} == written
        finally:
            subprocess.run(["umount", str(mnt2)], check=True, capture_output=True)
        cli("disk", "detach", "db2")
    finally:
        for m in (mnt, mnt2):
            if os.path.ismount(m):
                subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)
        teardown_home(home, cli)
