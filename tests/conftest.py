"""Shared fixtures.  Helpers (prerequisites, CLI runner, waiting, nbdkit,
headers) live in the ``support`` package; the end-to-end policy is
:func:`support.prereq.require`: a missing prerequisite skips, and fails under
BLOCKCRYPT_REQUIRE_E2E=1 (CI).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.env import Env
from support.prereq import require_block_devices, require_root, require_tools
from support.providers import PROVIDER_NAMES
from support.providers import provider_args as provider_add_args

# The KDF is weakened for tests only through this explicitly test-only switch.
os.environ.setdefault("BLOCKCRYPT_TESTONLY_WEAK_KDF", "1")

MiB = 1 << 20


@pytest.fixture
def home(tmp_path) -> Path:
    """A fresh, not yet initialised blockcrypt home."""
    return tmp_path / "home"


@pytest.fixture
def passphrase_file(tmp_path) -> Path:
    p = tmp_path / "passphrase"
    p.write_bytes(b"correct horse battery staple\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def xfs_reflink_dir(tmp_path):
    """A small XFS file system with reflink=1 on a loop device, mounted."""
    require_root()
    require_tools("mkfs.xfs", "losetup", "mount")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(512 * MiB)        # XFS needs ~300 MiB minimum
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def env(home, passphrase_file, tmp_path):
    """An initialised home (root, block devices); every attachment torn down after."""
    require_block_devices()
    e = Env(home, passphrase_file, tmp_path)
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """One real SoftHSM2 token for the whole test session (see support.softhsm);
    ``SOFTHSM2_CONF`` is set for this process and the CLI subprocesses it starts."""
    from support.softhsm import make_token
    token = make_token(tmp_path_factory.mktemp("softhsm"))
    os.environ["SOFTHSM2_CONF"] = str(token.conf)
    return token


@pytest.fixture(scope="session")
def kmip_server(tmp_path_factory):
    """One real PyKMIP server on 127.0.0.1 for the whole test session, with its CA and
    client certificates made by the tests (see support.kmip_server)."""
    from support.kmip_server import start_server
    srv = start_server(tmp_path_factory.mktemp("kmip"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory):
    """One real single-node Ceph cluster (mon, mgr, one bluestore OSD on 127.0.0.1)
    for the whole test session (see support.ceph); about 6 s to start."""
    from support.ceph import start_cluster
    cluster = start_cluster(tmp_path_factory.mktemp("ceph"))
    yield cluster
    cluster.stop()


@pytest.fixture(params=["file", "rbd"])
def store_name(request) -> str:
    """Every disk store, for the tests that must hold for each: the home's files, and
    an RBD pool of the session's Ceph cluster (``ceph_cluster``)."""
    if request.param == "rbd":
        request.getfixturevalue("ceph_cluster")
    return request.param


@pytest.fixture
def store_cluster(store_name, request):
    """The Ceph cluster behind the ``rbd`` store under test; None for the home's files."""
    return request.getfixturevalue("ceph_cluster") if store_name == "rbd" else None


@pytest.fixture
def store_args(store_name, request, tmp_path):
    """``disk create`` arguments for each store in turn: call it with the test's CLI
    runner (for ``rbd`` it adds the store ``ceph`` to that home, reached as a cephx user
    with ``profile rbd`` on the pool, as an administrator would set up a host) and
    append the result."""
    def setup(cli) -> list[str]:
        if store_name == "file":
            return []
        cluster = request.getfixturevalue("ceph_cluster")
        keyring = cluster.add_client("blockcrypt", tmp_path / "ceph.client.blockcrypt.keyring")
        cli("store", "add", "ceph", "--type", "rbd", "--conf", str(cluster.conf),
            "--pool", cluster.pool, "--client-id", "blockcrypt", "--keyring", str(keyring))
        return ["--store", "ceph"]
    return setup


@pytest.fixture(params=["local", "pkcs11", "kmip"])
def provider_name(request) -> str:
    """Every key provider, for the tests that must hold for each: ``local``, the name of
    a pkcs11 provider on the session's SoftHSM2 token (``hsm``), or of a kmip provider on
    the session's PyKMIP server (``kms``, as client identity ``host-a``)."""
    if request.param != "local":
        request.getfixturevalue("softhsm" if request.param == "pkcs11" else "kmip_server")
    return PROVIDER_NAMES.get(request.param, "local")


@pytest.fixture
def provider_args(provider_name, request):
    """``key create`` arguments for each provider in turn: call it with the test's CLI
    runner (it adds the provider ``provider_name`` names to that home) and append the
    result."""
    def setup(cli) -> list[str]:
        if provider_name != "local":
            cli(*provider_add_args(request, provider_name))
        return ["--provider", provider_name]
    return setup
