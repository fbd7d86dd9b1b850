"""A disk whose server died under a mounted file system is not attached twice
(issue 12, item 14).

Before, `disk attach` cleaned the stale attachment and attached the same disk
again on a second loop device while the first still carried the mounted ext4:
two file systems writing one disk.  Now attach refuses with StaleMount, naming
the mount point and the `umount` to run, `disk list` keeps showing the
attachment as stale instead of cleaning it away, and `--force` overrides.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from blockcrypt import errors
from blockcrypt.system import devices, proc

from support.env import Env, assert_nothing_started

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _loops_of(env: Env, name: str) -> list[str]:
    return devices.loop_devices_backed_by(env.home / "run" / name / "fuse" / "disk")


def _mounted_and_killed(env: Env, name: str):
    """Attach, make and mount ext4, write a file, then kill -9 the disk's nbdkit."""
    d = env.attach(name)
    subprocess.run(["mkfs.ext4", "-q", d["device"]], check=True, capture_output=True)
    mp = env.mount(d["device"], f"mnt-{name}")
    (mp / "f").write_bytes(b"x" * 4096)
    os.kill(d["nbdkit_pid"], signal.SIGKILL)
    assert proc.wait_gone(d["nbdkit_pid"], "nbdkit", None, 10)
    return d, mp


def test_attach_refuses_while_the_dead_servers_device_is_mounted(env: Env):
    env.create("st", "64M")
    d, mp = _mounted_and_killed(env, "st")
    loops_before = _loops_of(env, "st")
    assert loops_before == [d["device"]]

    err = env.refused(errors.StaleMount, "disk", "attach", "st")
    assert f"mounted at {mp}" in err and f"run `umount {mp}`" in err and "--force" in err
    assert _loops_of(env, "st") == loops_before        # no second device
    # list/show report it and keep it: attach still refuses afterwards
    assert env.json("disk", "show", "st")["state"] == "stale"
    assert [x["state"] for x in env.json("disk", "list")] == ["stale"]
    env.refused(errors.StaleMount, "disk", "attach", "st")
    # detach refuses as for any mounted device, naming the mount point
    err = env.refused(errors.DeviceBusy, "disk", "detach", "st")
    assert str(mp) in err

    # After the umount the stale attachment is cleaned and attach works again.
    env.umount(mp)
    d2 = env.attach("st")
    assert _loops_of(env, "st") == [d2["device"]]
    env.detach("st")
    assert_nothing_started(env, "st")


def test_attach_force_overrides_a_stale_mount(env: Env):
    env.create("sf", "64M")
    d, mp = _mounted_and_killed(env, "sf")
    d2 = env.json("disk", "attach", "sf", "--force")
    assert d2["state"] == "attached" and d2["device"] != d["device"]
    env.detach("sf")
    env.umount(mp)
    assert env.json("disk", "show", "sf")["state"] == "available"
