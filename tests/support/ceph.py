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


# -- OSD faults (tests/e2e/test_rbd_faults.py) ------------------------------------------
# Module functions rather than Cluster methods, so that they merge cleanly with the
# RBD store's own additions to this file (hence the imports here).
import signal  # noqa: E402

from support.wait import wait_for  # noqa: E402

OSD_ID = 0
OSD_RESTART_TIMEOUT_S = 120.0


def osd_pid(cluster: Cluster) -> int | None:
    """The live ``ceph-osd`` of ``cluster`` (by its pid file), or None if it is gone."""
    f = cluster.dir / "run" / f"osd.{OSD_ID}.pid"
    try:
        pid = int(f.read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() != "ceph-osd":
            return None
    except (OSError, ValueError):
        return None
    # The daemon is reparented to PID 1 once it forks, so it lingers as a zombie; and
    # a dying multi-threaded process shows its leader as a zombie while other threads
    # still hold its files (bluestore's lock): gone = every thread a zombie.
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return pid
        except (OSError, IndexError):
            continue
    return None


def osd_up_from(cluster: Cluster) -> int:
    """The osdmap epoch since which the OSD has been up (it grows with every (re)start)."""
    dump = json.loads(cluster.ceph("osd", "dump", "--format", "json").stdout)
    return next(o["up_from"] for o in dump["osds"] if o["osd"] == OSD_ID)


def kill_osd(cluster: Cluster, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to the OSD; with SIGKILL, wait until it is gone.  Returns its pid."""
    pid = osd_pid(cluster)
    if pid is None:
        raise RuntimeError(f"no running ceph-osd in {cluster.dir}")
    os.kill(pid, sig)
    if sig == signal.SIGKILL:
        wait_for(lambda: osd_pid(cluster) is None, 30, "the killed ceph-osd to exit")
    return pid


def cluster_active(cluster: Cluster) -> bool:
    """One OSD up and every PG active (ready for client I/O)."""
    p = cluster.ceph("status", "--format", "json", check=False)
    if p.returncode != 0:
        return False
    st = json.loads(p.stdout)
    pg, osd = st.get("pgmap", {}), st.get("osdmap", {})
    active = sum(s["count"] for s in pg.get("pgs_by_state", [])
                 if s["state_name"].split("+")[0] == "active")
    return (osd.get("num_up_osds") == 1 and pg.get("num_pgs", 0) > 0
            and active == pg["num_pgs"])


def restart_osd(cluster: Cluster, *, up_from_before: int | None = None,
                timeout_s: float = OSD_RESTART_TIMEOUT_S) -> None:
    """Start the OSD again as scripts/ceph-test-cluster.sh does (it forks; its pid goes
    to the pid file), after SIGKILLing a stopped or hung one; then wait until the mon
    has it up again (a newer ``up_from`` than ``up_from_before``) and every PG is
    active.  The mon of a one-OSD cluster has no peer to report a killed OSD down:
    only the restarted OSD's boot replaces it in the osdmap."""
    pid = osd_pid(cluster)
    if pid is not None:
        os.kill(pid, signal.SIGCONT)      # a SIGSTOPped OSD cannot die until continued
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: osd_pid(cluster) is None, 30, "the old ceph-osd to exit")
    log = cluster.dir / "log" / f"osd.{OSD_ID}.log"
    p = subprocess.run(["ceph-osd", "-c", str(cluster.conf), "-i", str(OSD_ID)],
                       env=cluster.env(), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout_s)
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"ceph-osd restart failed ({p.returncode}): {p.stderr}\n{tail}")
    wait_for(lambda: osd_pid(cluster) is not None, 30, "the restarted ceph-osd")
    if up_from_before is not None:
        wait_for(lambda: osd_up_from(cluster) > up_from_before, timeout_s,
                 "the mon to mark the restarted OSD up", interval_s=0.2)
    wait_for(lambda: cluster_active(cluster), timeout_s, "every PG active after the restart",
             interval_s=0.2)
