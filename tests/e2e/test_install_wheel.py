"""blockcrypt installed from a real wheel serves disks (issue 18, "Done when").

A copy of the source tree is built into a wheel (`pip wheel --no-deps`, so
nothing is written into the checkout), the wheel is installed with its
dependencies into a fresh virtualenv made from /usr/bin/python3 (the interpreter
nbdkit's Python plugin embeds), and that venv's `blockcrypt` entry point, run
from a scratch directory in a clean environment (no PYTHONPATH, nothing of this
checkout on sys.path), creates, attaches, writes, detaches, re-attaches and
verifies a disk.  The nbdkit serving it must load the plugin from the installed
package (``blockcrypt/nbd/plugin.py`` found with importlib.resources), never
from the source tree.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockcrypt.system import proc

from support.cli import REPO, clean_env, user_env
from support.env import dd_read, dd_write, teardown_home
from support.prereq import require, require_block_devices

MiB = 1 << 20
# Not copied into the build tree: local state, caches and build output.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".hypothesis")


@dataclass
class Installed:
    wheel: Path
    venv: Path
    site_packages: Path

    @property
    def exe(self) -> Path:
        return self.venv / "bin" / "blockcrypt"


def pip(*args: str | Path, python: Path) -> None:
    cp = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *map(str, args)],
                        capture_output=True, env=clean_env(), timeout=900,
                        stdin=subprocess.DEVNULL, check=False)
    assert cp.returncode == 0, f"pip {args} failed:\n{cp.stdout.decode()}\n{cp.stderr.decode()}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel built once, installed into a fresh venv from /usr/bin/python3."""
    require(Path("/usr/bin/python3").exists(), "no /usr/bin/python3")
    top = tmp_path_factory.mktemp("wheel")
    src = top / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE, symlinks=True)
    venv = top / "venv"
    cp = subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], capture_output=True,
                        env=clean_env(), check=False)
    require(cp.returncode == 0, f"/usr/bin/python3 -m venv failed (python3-venv?): "
                                f"{cp.stderr.decode()}")
    python = venv / "bin" / "python"
    pip("wheel", "--no-deps", "--wheel-dir", top / "dist", src, python=python)
    wheel, = (top / "dist").glob("blockcrypt-*.whl")
    pip("install", wheel, python=python)
    site = subprocess.run([str(python), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, check=True, env=clean_env(),
                          cwd=top).stdout.decode().strip()
    return Installed(wheel, venv, Path(site))


@pytest.mark.e2e
def test_wheel_ships_every_module_and_the_plugin(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    source = {p.relative_to(REPO).as_posix() for p in (REPO / "blockcrypt").rglob("*.py")
              if "__pycache__" not in p.parts}
    assert "blockcrypt/nbd/plugin.py" in names
    # the compiled data path, built for /usr/bin/python3, ships in the wheel
    assert [n for n in names if n.startswith("blockcrypt/crypto/_datapath.cpython-")
            and n.endswith(".so")], sorted(names)
    where = subprocess.run([str(installed.venv / "bin" / "python"), "-c",
                            "from blockcrypt.crypto.compiled import datapath; "
                            "print(datapath().__file__)"],
                           capture_output=True, env=clean_env(), cwd=installed.venv,
                           check=True).stdout.decode().strip()
    assert where.startswith(str(installed.site_packages / "blockcrypt" / "crypto")), where
    assert source - names == set(), "modules of the source tree missing from the wheel"
    packages = {p.parent.relative_to(REPO).as_posix()
                for p in (REPO / "blockcrypt").rglob("__init__.py")}
    assert {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")} == packages
    assert not any(n.startswith(("tests/", "scripts/", "nbd_plugin/")) for n in names)


@pytest.mark.e2e
@pytest.mark.root
def test_installed_wheel_creates_attaches_writes_and_reattaches_a_disk(installed, tmp_path):
    require_block_devices()
    home, env = user_env(tmp_path, b"a wheel-installed passphrase")
    work = tmp_path / "work"
    work.mkdir()

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run([str(installed.exe), *args], capture_output=True, env=env,
                            cwd=work, stdin=subprocess.DEVNULL, timeout=300, check=False)
        if check:
            assert cp.returncode == 0, (f"blockcrypt {' '.join(args)} exited {cp.returncode}: "
                                        f"{cp.stderr.decode()}")
        return cp

    # the installed package, not this checkout, is what the venv imports
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c",
         ("import sys, blockcrypt; from blockcrypt.nbd.launch import plugin_path; "
          "print(blockcrypt.__file__); print(plugin_path()); print(sys.path)")],
        capture_output=True, check=True, env=env, cwd=work).stdout.decode().splitlines()
    package = installed.site_packages / "blockcrypt"
    assert where[0] == str(package / "__init__.py")
    assert where[1] == str(package / "nbd" / "plugin.py")
    assert str(REPO) not in where[2]

    try:
        cli("init")
        cli("key", "create", "--alias", "wheel-key")
        cli("disk", "create", "data", "--size", "64M", "--key", "wheel-key")
        device = json.loads(cli("disk", "attach", "data", "--json").stdout)["device"]
        assert device.startswith("/dev/")

        run_dir = home / "run" / "data"
        nbdkit, = proc.find_processes("nbdkit", f"{run_dir}/")
        argv = proc.cmdline(nbdkit)
        assert str(package / "nbd" / "plugin.py") in argv, argv
        assert not any(str(REPO) in a for a in argv), argv
        environ = Path(f"/proc/{nbdkit}/environ").read_bytes().split(b"\0")
        pythonpath = next(e for e in environ if e.startswith(b"PYTHONPATH=")).decode()
        assert str(REPO) not in pythonpath, pythonpath

        pattern = os.urandom(MiB)
        dd_write(device, pattern, 8 * MiB)
        assert dd_read(device, MiB, 8 * MiB) == pattern
        cli("disk", "detach", "data")
        assert proc.find_processes("nbdkit", f"{run_dir}/") == []

        device = json.loads(cli("disk", "attach", "data", "--json").stdout)["device"]
        assert dd_read(device, MiB, 8 * MiB) == pattern
        assert dd_read(device, MiB, 0) == bytes(MiB)          # never written: zeros
        cli("disk", "detach", "data")
        shown = json.loads(cli("disk", "show", "data", "--json").stdout)
        assert shown["state"] == "available"
        assert pattern not in Path(shown["path"]).read_bytes()   # at rest: ciphertext
    finally:
        teardown_home(home, cli)
