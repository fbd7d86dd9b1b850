"""Unattended attach at boot: persistent disks, the systemd unit, run the way systemd runs it.

systemd is installed here but is not PID 1, so the unit is checked with
``systemd-analyze verify`` and its ExecStart / ExecStop lines are run as systemd
would run them: no terminal (stdin /dev/null, a new session), a minimal
environment (systemd's PATH, the unit's Environment= lines), ``%d`` and
``$CREDENTIALS_DIRECTORY`` pointing at a directory holding the LoadCredential=
file for local keys, and nothing at all for keys in the HSM.  Each disk's data
is checked through its block device after the unit attached it.

The SoftHSM2 token here is this test's own (its directory is moved away to make
the token "unplugged"), so the session token of the other tests is untouched.
"""
from __future__ import annotations

import json
import random
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from blockcrypt import errors

from support.env import dd_read, dd_write
from support.prereq import require_tools
from support.softhsm import make_token
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
NET_UNIT = "blockcrypt-netdisks.service"
MiB = 2**20


def read_unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def systemd_run(unit: dict[str, list[str]], which: str, creds: Path | None,
                **popen) -> subprocess.Popen:
    """Start the unit's ExecStart or ExecStop as systemd would (see the module doc)."""
    env = {"PATH": SYSTEMD_PATH, "INVOCATION_ID": "0" * 32}
    for assignment in unit.get("Environment", []):
        k, v = shlex.split(assignment)[0].split("=", 1)
        env[k] = v
    line = unit[which][0]
    if creds is not None:
        env["CREDENTIALS_DIRECTORY"] = str(creds)
        line = line.replace("%d", str(creds))
    assert "%" not in line, line
    return subprocess.Popen(shlex.split(line), env=env, cwd="/", stdin=subprocess.DEVNULL,
                            start_new_session=True, **popen)


def run_unit(unit, which, creds) -> subprocess.CompletedProcess:
    p = systemd_run(unit, which, creds, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def load_credentials(unit: dict[str, list[str]], into: Path) -> Path:
    """What PID 1 does for LoadCredential=NAME:FILE: a private copy under NAME."""
    into.mkdir(mode=0o700)
    for spec in unit["LoadCredential"]:
        name, source = spec.split(":", 1)
        shutil.copyfile(source, into / name)
        (into / name).chmod(0o400)
    return into


def states(env) -> dict[str, str]:
    return {d["name"]: d["state"] for d in env.json("disk", "list")}


@pytest.fixture
def boot(env, tmp_path, ceph_cluster):
    """A home with disk `ld` under a local key, `hd` under a key in a SoftHSM2 token and
    `rd` on an RBD store (it needs the network: the second unit's), all persistent,
    detached, each holding a known pattern."""
    require_tools("systemd-analyze", "softhsm2-util", "dd")
    token = make_token(tmp_path / "hsm", label="boot-token")
    hsm_env = {"SOFTHSM2_CONF": str(token.conf)}

    def cli(*args, check=True):
        return env.cli(*args, check=check, env=hsm_env)
    cli(*token.provider_args("hsm"))
    cli("key", "create", "--alias", "hk", "--provider", "hsm")
    cli("key", "create", "--alias", "lk")
    keyring = ceph_cluster.add_client("boot", tmp_path / "boot.keyring")
    cli("store", "add", "ceph", "--type", "rbd", "--conf", str(ceph_cluster.conf), "--pool",
        ceph_cluster.pool, "--client-id", "boot", "--keyring", str(keyring))
    data = {}
    for name, where in (("hd", ["--key", "hk"]), ("ld", ["--key", "lk"]),
                        ("rd", ["--no-encrypted", "--store", "ceph"])):
        cli("disk", "create", name, "--size", "64M", *where)
        extra = ["--persistent"] if name != "ld" else []
        dev = json.loads(cli("disk", "attach", name, *extra, "--json").stdout)["device"]
        data[name] = random.Random(name).randbytes(MiB)
        dd_write(dev, data[name], 4 * MiB)
        cli("disk", "detach", name)
    cli("disk", "set", "ld", "--persistent")
    shown = json.loads(cli("disk", "show", "ld", "--json").stdout)
    assert shown["persistent"] is True
    units = {}
    for variant, extra in (("hsm-only", []),
                           ("with-credential", ["--passphrase-credential",
                                                str(env.passphrase_file)])):
        d = tmp_path / variant
        cp = cli("service", "install", "--unit-dir", str(d), *extra)
        if not extra:     # `ld` is under a local key: the install says it will not attach
            assert b"ld" in cp.stderr and b"--passphrase-credential" in cp.stderr
        units[variant] = d / "blockcrypt-disks.service"
    token_dir = next(p for p in token.tokens.iterdir() if p.is_dir())
    return env, cli, data, units, token_dir


def check_data(env, data, names):
    for d in env.json("disk", "list"):
        if d["name"] in names:
            assert d["state"] == "attached", d
            assert dd_read(d["device"], MiB, 4 * MiB) == data[d["name"]], d["name"]


def test_generated_unit_passes_systemd_analyze_verify(boot):
    env, cli, data, units, _ = boot
    for path in units.values():
        for unit_path in (path, path.with_name(NET_UNIT)):
            cp = subprocess.run(["systemd-analyze", "verify", str(unit_path)],
                                capture_output=True, text=True)
            assert cp.returncode == 0, cp.stderr
            assert cp.stderr.strip() == "", cp.stderr
        unit, net = read_unit(path), read_unit(path.with_name(NET_UNIT))
        assert unit["Before"] == ["local-fs.target shutdown.target"]
        assert unit["WantedBy"] == ["local-fs.target"]
        assert " --local " in unit["ExecStart"][0] and unit["ExecStop"][0].endswith("--local")
        # disks on Ceph or under KMIP keys: after the network, like a _netdev volume
        assert "network-online.target" in net["After"][0] and \
            net["Wants"] == ["network-online.target"]
        assert net["Before"] == ["remote-fs.target"] and net["WantedBy"] == ["remote-fs.target"]
        assert " --network " in net["ExecStart"][0] and net["ExecStop"][0].endswith("--network")
        for u in (unit, net):
            assert u["Environment"] == [f"SOFTHSM2_CONF={env_token_conf(u)}"]
    assert "LoadCredential" not in read_unit(units["hsm-only"])
    # The check is real: a unit systemd would reject fails it.
    bad = units["hsm-only"].with_name("bad.service")
    bad.write_text(units["hsm-only"].read_text().replace("ExecStart=/", "ExecStart=rel/"))
    assert subprocess.run(["systemd-analyze", "verify", str(bad)],
                          capture_output=True).returncode != 0


def env_token_conf(unit) -> str:
    (line,) = unit["Environment"]
    return line.split("=", 1)[1]


def test_boot_unit_attaches_serves_and_detaches_unattended(boot, tmp_path):
    env, cli, data, units, token_dir = boot
    # Without any credential (an HSM-only unit): the HSM disk attaches, the local one
    # fails for want of the passphrase, and that does not stop the other.
    hsm_only = read_unit(units["hsm-only"])
    cp = run_unit(hsm_only, "ExecStart", None)
    assert cp.returncode == errors.SomeDisksFailed.exit_code, cp.stderr
    assert b"1 of 2 disks could not be attached" in cp.stderr     # rd is not its disk
    assert b"disk ld" in cp.stderr and b"passphrase" in cp.stderr
    assert states(env) == {"hd": "attached", "ld": "available", "rd": "available"}
    check_data(env, data, {"hd"})
    # The network unit (once the network is up) attaches the disk on Ceph, only it.
    net = read_unit(units["hsm-only"].with_name(NET_UNIT))
    cp = run_unit(net, "ExecStart", None)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.decode().split("\n")[0] == "attached disk rd"
    assert states(env) == {"hd": "attached", "ld": "available", "rd": "attached"}
    check_data(env, data, {"hd", "rd"})

    # With the credential unit: the local-key disk attaches too; hd was attached already.
    unit = read_unit(units["with-credential"])
    creds = load_credentials(unit, tmp_path / "creds")
    cp = run_unit(unit, "ExecStart", creds)
    assert cp.returncode == 0, cp.stderr
    assert b"attached disk ld" in cp.stdout and b"disk hd was attached already" in cp.stdout
    check_data(env, data, {"hd", "ld"})

    # The token goes away: the attached HSM disk keeps serving (its DK is in nbdkit).
    away = tmp_path / "token-away"
    token_dir.rename(away)
    try:
        hd = {d["name"]: d for d in env.json("disk", "list")}["hd"]
        fresh = random.Random("after").randbytes(MiB)
        dd_write(hd["device"], fresh, 8 * MiB)
        assert dd_read(hd["device"], MiB, 8 * MiB) == fresh
        assert dd_read(hd["device"], MiB, 4 * MiB) == data["hd"]
    finally:
        away.rename(token_dir)

    # Shutdown, in the reverse order: the network unit's ExecStop detaches its disk
    # only, then the other unit's the rest.
    cp = run_unit(net, "ExecStop", None)
    assert cp.returncode == 0, cp.stderr
    assert states(env) == {"hd": "attached", "ld": "attached", "rd": "available"}
    cp = run_unit(unit, "ExecStop", creds)
    assert cp.returncode == 0, cp.stderr
    assert states(env) == {"hd": "available", "ld": "available", "rd": "available"}


def test_boot_waits_for_a_token_that_is_not_there_yet(boot, tmp_path):
    env, cli, data, units, token_dir = boot
    cli("disk", "set", "ld", "--no-persistent")
    unit = read_unit(units["hsm-only"])
    away = tmp_path / "token-away"
    token_dir.rename(away)
    log = tmp_path / "unit.stderr"
    with open(log, "wb") as err:
        p = systemd_run(unit, "ExecStart", None, stdout=subprocess.PIPE, stderr=err)
    try:
        wait_for(lambda: b"waiting: disk hd" in log.read_bytes(), 60,
                 "the unit to report that disk hd waits for its token")
        text = log.read_text()
        assert "key provider 'hsm' is unavailable" in text and "boot-token" in text
        assert states(env)["hd"] == "available"
        away.rename(token_dir)                    # the token arrives
        out, _ = p.communicate(timeout=120)
    finally:
        if away.exists():
            away.rename(token_dir)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, log.read_text()
    assert b"attached disk hd" in out
    check_data(env, data, {"hd"})
    assert run_unit(unit, "ExecStop", None).returncode == 0
    assert states(env)["hd"] == "available"
