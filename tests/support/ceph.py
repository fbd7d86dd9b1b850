"""A throwaway single-node Ceph cluster for the test session (RBD stores, issue 17).

:func:`start_cluster` runs ``scripts/ceph-test-cluster.sh up`` (one mon, one mgr,
one OSD with bluestore on a sparse file, all on 127.0.0.1, cephx on; recipe and
pitfalls in ../shared/CEPH.md) in a directory of its own and returns a
:class:`Cluster`; :meth:`Cluster.stop` runs ``down``.  conftest starts it once per
session (fixture ``ceph_cluster``): about 6 s.

Clients: the admin keyring is ``Cluster.admin_keyring``; :meth:`Cluster.add_client`
makes a restricted cephx user (``profile rbd`` on one pool), as an administrator
would give a blockcrypt host, and writes its keyring 0600.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.prereq import require, require_root, require_tools

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ceph-test-cluster.sh"
DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool")
UP_TIMEOUT_S = 180


@dataclass
class Cluster:
    dir: Path
    conf: Path
    pool: str = "rbd"

    @property
    def admin_keyring(self) -> Path:
        return self.dir / "ceph.client.admin.keyring"

    def env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def ceph(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ``ceph`` CLI as client.admin against this cluster."""
        return subprocess.run(["ceph", "--conf", str(self.conf), *args], check=check,
                              capture_output=True, text=True, timeout=60)

    def rbd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ``rbd`` CLI as client.admin against this cluster."""
        return subprocess.run(["rbd", "--conf", str(self.conf), *args], check=check,
                              capture_output=True, text=True, timeout=120)

    def add_client(self, name: str, dest: Path, *, pool: str | None = None) -> Path:
        """A cephx user ``client.NAME`` allowed RBD on ``pool`` (default: the
        cluster's), its keyring written 0600 to ``dest``."""
        pool = pool or self.pool
        out = self.ceph("auth", "get-or-create", f"client.{name}", "mon", "profile rbd",
                        "osd", f"profile rbd pool={pool}", "mgr", f"profile rbd pool={pool}")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(out.stdout)
        return dest

    def images(self, pool: str | None = None) -> list[str]:
        return json.loads(self.rbd("ls", "--format", "json", pool or self.pool).stdout)

    def export(self, ref: str, dest: Path) -> Path:
        """``rbd export`` the image of a catalog reference ``rbd:STORE/IMAGE`` to ``dest``."""
        image = ref.split("/", 1)[1]
        self.rbd("export", f"{self.pool}/{image}", str(dest))
        return dest

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "down", str(self.dir)], check=False, timeout=60)


def require_ceph() -> None:
    """Root and Debian's Ceph daemons and CLIs (``make install`` installs them)."""
    require_root()
    require_tools(*DAEMONS)
    require(any(Path("/usr/lib/python3/dist-packages").glob("rbd.*.so")),
            "python3-rbd not installed")


def start_cluster(base: Path) -> Cluster:
    """Start a cluster in ``base/cluster`` (bluestore on a sparse file, so sparse and
    large writes cost disk, not OSD memory).  Fails with the daemon logs' tail."""
    require_ceph()
    d = base / "cluster"
    env = {**os.environ, "CEPH_OBJECTSTORE": "bluestore"}
    env.pop("CEPH_CONF", None)
    p = subprocess.run([str(SCRIPT), "up", str(d)], env=env, capture_output=True, text=True,
                       timeout=UP_TIMEOUT_S)
    if p.returncode != 0:
        raise RuntimeError(f"ceph-test-cluster.sh up failed ({p.returncode}):\n{p.stderr}")
    return Cluster(dir=d, conf=d / "ceph.conf")
