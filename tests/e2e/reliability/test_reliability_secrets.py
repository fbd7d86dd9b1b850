"""Secret hygiene after a full workflow (issue 8 item 10).

The workflow, through the real CLI as root: init, key create, disk create,
attach, mkfs + mount + write, snapshot (while mounted), unmount, detach,
disk create --from-snapshot, attach, mount + read back, unmount, detach.

The test knows the secrets: it unwraps the disks' data key (DK) through the key
store, and reads the CMK material of every key version by unlocking the store
(``KeyStore._material``: the material never leaves the store otherwise).  Each
is searched as raw bytes, as each 32-byte half (the DK is two XTS keys) and in
hex (lower and upper case) in:

- every file under the home, while attached (run directory, nbdkit and nbdfuse
  logs) and afterwards (database and its WAL, containers, snapshots);
- every regular file under /tmp modified since the workflow started (a file
  not written since cannot hold a key that did not exist yet), not crossing
  into other file systems (other tests' FUSE mounts);
- ``/proc/PID/cmdline`` and ``/proc/PID/environ`` of nbdkit, of the
  supervisor shell that is its parent and of nbdfuse.

Core dumps: the kernel keeps no readable "dumpable" flag for another process,
and every access check on /proc/PID is bypassed by root's CAP_SYS_PTRACE, so
the check is the consequence itself: nbdkit (cwd a scratch directory, core
size limit raised with prlimit) is killed with SIGABRT and must leave no core
file, next to two controls in the same conditions: an ordinary process that
does leave one (core dumps work here) and one that made itself non-dumpable
(PR_SET_DUMPABLE 0) and leaves none.  Its key memory is mlocked (VmLck > 0);
a unit test checks that wiping one Secret never unlocks another one that
shares its page (mlock is per page and not counted).

Permissions: every directory under the home is 0700 and every file 0600
(sockets too) at rest and while attached; the only exception is the content of
nbdfuse's FUSE mount (the export shown as a file), which must be a mount
without ``allow_other`` inside a 0700 directory, so only root reaches it.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockcrypt.crypto.secret import Secret, _address
from blockcrypt.system import devices, proc

from support.cli import REPO
from support.env import Env, read_allocated
from support.prereq import require, require_block_devices
from support.wait import wait_for

MiB = 2**20
SCAN_MAX_BYTES = 256 * MiB      # bigger files under /tmp are not blockcrypt's (its are in the home)


def needles_of(secret: bytes) -> list[bytes]:
    out = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    if len(secret) == 64:
        for half in (secret[:32], secret[32:]):
            out += [half, half.hex().encode(), half.hex().upper().encode()]
    return out


class Scanner:
    def __init__(self, needles: dict[str, list[bytes]]):
        self.needles = needles
        self.longest = max(len(n) for ns in needles.values() for n in ns)
        self.scanned_files = 0
        self.scanned_bytes = 0
        self.skipped: list[str] = []

    def blob(self, data: bytes, where: str) -> None:
        for what, ns in self.needles.items():
            for n in ns:
                assert n not in data, f"{what} found in {where}"

    def file(self, path: Path) -> None:
        try:
            for start, data in read_allocated(str(path)):
                self.blob(data, f"{path} (near offset {start})")
                self.scanned_bytes += len(data)
        except OSError:
            self.skipped.append(str(path))         # vanished or unreadable meanwhile
            return
        self.scanned_files += 1

    def tree(self, top: Path, *, since_ns: int | None = None, cap: int | None = None,
             skip: tuple[Path, ...] = ()) -> None:
        top_dev = os.lstat(top).st_dev
        for dirpath, dirnames, filenames in os.walk(top):
            d = Path(dirpath)
            keep = []
            for n in dirnames:
                p = d / n
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if st.st_dev == top_dev and not stat.S_ISLNK(st.st_mode) and \
                        not any(p == s or s in p.parents for s in skip):
                    keep.append(n)
            dirnames[:] = keep
            for n in filenames:
                p = d / n
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_dev != top_dev:
                    continue
                if since_ns is not None and max(st.st_mtime_ns, st.st_ctime_ns) < since_ns:
                    continue
                if cap is not None and st.st_blocks * 512 > cap:
                    self.skipped.append(f"{p} ({st.st_blocks * 512} bytes)")
                    continue
                self.file(p)

    def process(self, pid: int, what: str) -> None:
        for f in ("cmdline", "environ"):
            self.blob(Path(f"/proc/{pid}/{f}").read_bytes(), f"/proc/{pid}/{f} ({what})")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def check_modes(home: Path) -> list[str]:
    """Paths under home that break 0700/0600, other than FUSE mount contents."""
    fuse_mounts = {Path(mp) for _, mp in devices.mountinfo() if mp.startswith(f"{home}/")}
    bad = []
    for dirpath, dirnames, filenames in os.walk(home):
        d = Path(dirpath)
        for n in dirnames + filenames:
            p = d / n
            if any(m == p or m in p.parents for m in fuse_mounts):
                continue
            st = os.lstat(p)
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if stat.S_IMODE(st.st_mode) != want or st.st_uid != 0:
                bad.append(f"{p}: {oct(stat.S_IMODE(st.st_mode))} uid {st.st_uid}")
    return bad


def check_fuse_mounts_private(home: Path) -> int:
    """The FUSE mounts under home: no allow_other, parent 0700.  Returns how many."""
    n = 0
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mp = fields[4]
        if not mp.startswith(f"{home}/"):
            continue
        sep = fields.index("-")
        fstype, super_opts = fields[sep + 1], fields[sep + 3]
        assert fstype.startswith("fuse"), line
        assert "allow_other" not in super_opts.split(","), line
        assert stat.S_IMODE(os.stat(Path(mp).parent).st_mode) == 0o700, line
        n += 1
    return n


def core_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("core*"))


def abort_with_cores_enabled(pid: int, cwd: Path,
                             child: subprocess.Popen | None = None) -> list[Path]:
    """Raise pid's core limit, SIGABRT it, wait until it is gone; core files in cwd.

    With a file core_pattern (the only kind that puts a core in cwd) the dying
    process writes and closes its core itself, before it exits: once it is gone
    (reaped by us if it is our ``child``, else by its parent) the file is complete.
    """
    resource.prlimit(pid, resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                 resource.RLIM_INFINITY))
    os.kill(pid, signal.SIGABRT)
    if child is not None:
        assert child.wait(timeout=30) == -signal.SIGABRT, f"{pid} did not die of SIGABRT"
    else:
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout_s=30,
                 what=f"{pid} to die of SIGABRT")
    assert not Path(f"/proc/{pid}").exists(), f"{pid} did not die of SIGABRT"
    return core_files(cwd)


@pytest.mark.e2e
@pytest.mark.root
def test_no_secret_anywhere_after_a_full_workflow(home, passphrase_file, tmp_path):
    require_block_devices()
    suid_dumpable = Path("/proc/sys/fs/suid_dumpable").read_text().strip()
    require(suid_dumpable != "1", "fs.suid_dumpable=1 dumps non-dumpable processes anyway")
    started_ns = time.time_ns() - 2_000_000_000       # slack for coarse file timestamps
    env = Env(home, passphrase_file, tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    nbdkit_cwd = tmp_path / "nbdkit-cwd"
    nbdkit_cwd.mkdir()
    try:
        key = env.json("key", "create", "--alias", "app")
        env.create("src", "64M", "--key", "app")
        dev = env.attach("src")["device"]
        subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
        subprocess.run(["mount", dev, str(mp)], check=True, capture_output=True)
        env.mounts.append(mp)
        payload = os.urandom(3 * MiB)
        (mp / "payload.bin").write_bytes(payload)
        os.sync()
        env.cli("snapshot", "create", "src", "snap")          # while mounted

        # the secrets, known to the test
        dk = env.data_key("src")
        with env.store() as store:
            store.unlock()
            cmk = {f"CMK {key['id']} v{v['version']}": store._material(key["id"], v["version"])
                   .reveal() for v in store.get_key(key["id"])["versions"]}
        scanner = Scanner({"the data key": needles_of(dk),
                           **{name: needles_of(m) for name, m in cmk.items()}})
        locked_kb: dict[str, int] = {}

        def scan_attached(name: str) -> int:
            run_dir = home / "run" / name
            nbdkit = proc.find_processes("nbdkit", f"{run_dir}/")
            assert len(nbdkit) == 1
            scanner.process(nbdkit[0], "nbdkit")
            scanner.process(parent_of(nbdkit[0]), "nbdkit's supervisor shell")
            for pid in proc.find_processes("nbdfuse", f"{run_dir}/"):
                scanner.process(pid, "nbdfuse")
            log = run_dir / "nbdkit.log"
            assert log.exists()
            scanner.file(log)
            scanner.tree(home)
            assert check_modes(home) == []
            assert check_fuse_mounts_private(home) == 1
            status = Path(f"/proc/{nbdkit[0]}/status").read_text()
            locked_kb[name] = int(next(line for line in status.splitlines()
                                       if line.startswith("VmLck:")).split()[1])
            return nbdkit[0]

        scan_attached("src")
        env.umount(mp)
        env.detach("src")
        env.json("disk", "create", "dst", "--from-snapshot", "snap")
        assert env.data_key("dst") == dk
        # attach from a scratch directory: nbdkit inherits it as its cwd (for the core check)
        cp = subprocess.run([sys.executable, "-m", "blockcrypt", "--home", str(home),
                             "--passphrase-file", str(passphrase_file), "disk", "attach", "dst",
                             "--json"], capture_output=True, cwd=nbdkit_cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert cp.returncode == 0, cp.stderr.decode()
        dst = json.loads(cp.stdout)
        subprocess.run(["mount", dst["device"], str(mp)], check=True, capture_output=True)
        env.mounts.append(mp)
        assert (mp / "payload.bin").read_bytes() == payload
        env.umount(mp)
        pid = scan_attached("dst")
        assert os.readlink(f"/proc/{pid}/cwd") == str(nbdkit_cwd)

        # core dumps: two controls, then nbdkit itself
        ordinary_dir, hardened_dir = tmp_path / "ordinary", tmp_path / "hardened"
        for d in (ordinary_dir, hardened_dir):
            d.mkdir()
        ordinary = subprocess.Popen(["sleep", "60"], cwd=ordinary_dir)
        hardened = subprocess.Popen(
            [sys.executable, "-c", "from blockcrypt.crypto.secret import disable_core_dumps; "
             "import time; disable_core_dumps(); print(flush=True); time.sleep(60)"],
            cwd=hardened_dir, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert hardened.stdout.readline() == b"\n"           # it is non-dumpable now
        require(abort_with_cores_enabled(ordinary.pid, ordinary_dir, ordinary) != [],
                f"core dumps are not written to the crashing process's directory here "
                f"(kernel.core_pattern={Path('/proc/sys/kernel/core_pattern').read_text()!r})")
        assert abort_with_cores_enabled(hardened.pid, hardened_dir, hardened) == []
        cores = abort_with_cores_enabled(pid, nbdkit_cwd)
        for c in cores:
            c.unlink()                                    # it may hold the key: never keep it
        assert cores == [], "nbdkit wrote a core dump: it is dumpable"
        assert env.detach("dst")["stale"] is True

        # at rest: the whole home, and whatever was written under /tmp meanwhile
        assert not (home / "run" / "dst").exists()
        assert check_modes(home) == []
        scanner.tree(home)
        scanner.tree(Path("/tmp"), since_ns=started_ns, cap=SCAN_MAX_BYTES,
                     skip=tuple(Path("/tmp").glob("bash_jobs*")))
        print(f"\nscanned {scanner.scanned_files} files, {scanner.scanned_bytes} bytes; "
              f"skipped {len(scanner.skipped)}: {scanner.skipped[:5]}")
        assert scanner.scanned_files > 5
        # checked last, so a failure here does not hide the checks above
        assert all(kb > 0 for kb in locked_kb.values()), \
            f"nbdkit holds no locked memory (VmLck kB per disk: {locked_kb}): is the key mlocked?"
    finally:
        env.cleanup()


def _page_locked(addr: int) -> bool:
    """Is the page at addr in a VM_LOCKED mapping of this process (smaps 'lo' flag)?"""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return "lo" in line.split()[1:]
    raise AssertionError(f"address {addr:#x} is in no mapping")


def test_wiping_one_secret_keeps_the_others_locked():
    """mlock works on whole pages and is not counted: unlocking one buffer unlocks
    every other secret on its page.  Small secrets share pages (the nbdkit plugin
    holds the DK read from the pipe and the cipher's copy side by side, then wipes
    the first), so wiping one secret must not make another swappable."""
    secrets = [Secret.random(64) for _ in range(64)]
    page = {id(s): _address(s._buf) & ~4095 for s in secrets}
    pairs = [(a, b) for i, a in enumerate(secrets) for b in secrets[i + 1:]
             if page[id(a)] == page[id(b)]]
    assert pairs, "no two small secrets share a page: cannot test"
    keep, gone = pairs[0]
    assert keep._locked and _page_locked(page[id(keep)])
    gone.wipe()
    assert not keep.wiped
    assert _page_locked(page[id(keep)]), \
        "wiping one Secret munlocked the page of another live Secret"
