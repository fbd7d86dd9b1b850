"""storage/ceph.py: loading Debian's rados/rbd modules into the venv, the keyring
checks, and the one mapping of librados/librbd exceptions to blockcrypt errors
(the real exception classes, raised by hand; the e2e tests meet them from a real
cluster: tests/e2e/test_rbd.py)."""
from __future__ import annotations

import errno
import socket
import time

import pytest

from blockcrypt import errors
from blockcrypt.storage import ceph
from blockcrypt.storage.ceph import StoreConfig, ceph_error

from support.ceph import require_ceph

CFG = StoreConfig(name="ceph1", conf="/etc/ceph/ceph.conf", pool="rbd", client_id="bc",
                  keyring="/etc/ceph/bc.keyring")


@pytest.fixture(scope="module")
def mods():
    require_ceph()
    return ceph.modules()


def test_modules_load_debians_extensions_into_the_venv(mods):
    rados, rbd = mods
    assert rados.__file__.startswith("/usr/lib/python3/dist-packages/")
    assert rbd.__file__.startswith("/usr/lib/python3/dist-packages/")
    assert ceph.modules() is ceph.modules()          # loaded once


@pytest.mark.parametrize("cls,code,expected", [
    ("PermissionDeniedError", errno.EACCES, errors.StoreAuthRefused),
    ("ObjectNotFound", errno.ENOENT, errors.StoreAuthRefused),    # no such cephx user
    ("TimedOut", errno.ETIMEDOUT, errors.StoreUnreachable),
    ("InvalidArgumentError", errno.EINVAL, errors.StoreUnreachable),   # bad mon address
])
def test_connect_errors(mods, cls, code, expected):
    rados, _ = mods
    e = ceph_error(CFG, getattr(rados, cls)("x", errno=code), connecting=True)
    assert type(e) is expected
    assert "'ceph1'" in e.message
    if expected is errors.StoreAuthRefused:
        assert "client.bc" in e.message and "/etc/ceph/bc.keyring" in e.message


def test_image_missing_names_the_disk_and_store(mods):
    _, rbd = mods
    e = ceph_error(CFG, rbd.ImageNotFound("gone", errno=errno.ENOENT), image="bc-01",
                   owner="disk 'db'")
    assert type(e) is errors.ImageMissing
    assert "disk 'db'" in e.message and "'ceph1'" in e.message and "bc-01" in e.message
    assert e.exit_code == 26


def test_other_errors(mods):
    rados, rbd = mods
    assert type(ceph_error(CFG, rbd.NoSpace("full", errno=errno.ENOSPC), image="i")) \
        is errors.NoSpace
    e = ceph_error(CFG, rbd.IOError("bad", errno=errno.EIO), image="bc-02")
    assert type(e) is errors.StorageError and "rbd:ceph1/bc-02" in e.message
    e = ceph_error(CFG, rados.PermissionError("no", errno=errno.EPERM))
    assert type(e) is errors.StoreAuthRefused and "permission denied" in e.message


def test_an_operation_timed_out_once_connected_is_not_an_unreachable_cluster(mods):
    """Connected, an OSD (or monitor) operation past its bound: the cluster answered
    the connect, so the next step is its health, not the monitors in the conf."""
    rados, rbd = mods
    e = ceph_error(CFG, rbd.Timeout("t", errno=errno.ETIMEDOUT), image="bc-03",
                   owner="disk 'db'")
    assert type(e) is errors.StoreNotAnswering and e.exit_code == 99
    assert "disk 'db'" in e.message and "'ceph1'" in e.message and "ceph -s" in e.message
    e = ceph_error(CFG, rados.TimedOut("t", errno=errno.ETIMEDOUT))
    assert type(e) is errors.StoreNotAnswering and "pool" in e.message


def test_keyring_must_be_private(tmp_path):
    k = tmp_path / "k"
    k.write_text("[client.bc]\n")
    k.chmod(0o644)
    with pytest.raises(errors.InsecureFile):
        ceph.check_keyring(StoreConfig("s", "c", "p", "bc", str(k)))
    with pytest.raises(errors.StoreAuthRefused, match="cannot read the keyring"):
        ceph.check_keyring(StoreConfig("s", "c", "p", "bc", str(tmp_path / "missing")))


def test_unreachable_cluster_times_out_promptly(mods, tmp_path, monkeypatch):
    """A monitor address nobody listens on: StoreUnreachable within the bound, no hang."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon_host = v2:127.0.0.1:{port}\nauth_client_required = none\n")
    monkeypatch.setattr(ceph, "CONNECT_TIMEOUT_S", 2)
    t0 = time.monotonic()
    with pytest.raises(errors.StoreUnreachable, match="cannot be reached"):
        ceph.connect(StoreConfig("s", str(conf), "rbd", "admin", None))
    assert time.monotonic() - t0 < 10
