"""The audited operations that need a block device: disk attach, detach, serve and
copy leave one record each in the audit chain, successful or refused, with who
(uid, pid) and which disk (issue 12 item 11); `audit verify` still proves the chain.
The others are in tests/unit/cli/test_cli_audit_operations.py."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from blockcrypt import errors

from support.prereq import require_tools
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _new(env, before: int, operation: str) -> list[dict]:
    return [r for r in env.json("audit")[before:] if r["operation"] == operation]


def _check(rec: dict, result: str, disks: list[str], env) -> None:
    assert rec["result"] == result
    assert rec["caller"]["uid"] == os.getuid() and rec["caller"]["pid"] > 0
    assert [(o["type"], o["name"]) for o in rec["objects"]] == [("disk", d) for d in disks]
    ids = {d["name"]: d["id"] for d in env.json("disk", "list")}
    assert [o["id"] for o in rec["objects"]] == [ids.get(d) for d in disks]


def _verified(env) -> None:
    assert env.json("audit", "verify")["ok"] is True


def _audited(env, operation: str, run, result: str, disks: list[str]) -> dict:
    """Run ``run()``; it must add exactly one ``operation`` record, as described."""
    n = len(env.json("audit"))
    run()
    [rec] = _new(env, n, operation)
    _check(rec, result, disks, env)
    return rec


def test_attach_and_detach_are_audited(env):
    env.create("a", "64M")
    _audited(env, "disk-attach", lambda: env.attach("a"), "success", ["a"])
    rec = _audited(env, "disk-attach", lambda: env.refused(errors.DiskAttached, "disk",
                                                           "attach", "a"), "refused", ["a"])
    assert rec["exit_code"] == errors.DiskAttached.exit_code
    _audited(env, "disk-detach", lambda: env.detach("a"), "success", ["a"])
    _audited(env, "disk-detach", lambda: env.refused(errors.DiskNotAttached, "disk",
                                                     "detach", "a"), "refused", ["a"])
    _verified(env)


def test_serve_is_audited_when_it_starts_and_when_it_stops(env):
    from test_attach import start_serve  # the serve helper of the attach tests
    env.create("s", "64M")
    n = len(env.json("audit"))
    p, info = start_serve(env, "s", "--unix", str(env.tmp / "s.sock"))
    try:
        [rec] = _new(env, n, "disk-serve-started")
        _check(rec, "success", ["s"], env)
        assert rec["caller"]["pid"] == p.pid and rec["details"]["endpoint"] == info["endpoint"]
        env.refused(errors.DiskAttached, "disk", "serve", "s", "--unix", str(env.tmp / "t.sock"))
        refused = _new(env, n, "disk-serve")
        assert [r["result"] for r in refused] == ["refused"]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    stopped = [r for r in _new(env, n, "disk-serve") if r["result"] == "success"]
    assert len(stopped) == 1 and stopped[0]["caller"]["pid"] == p.pid
    wait_for(lambda: env.json("disk", "show", "s")["state"] == "available", 30,
             "the serve row is released")
    _verified(env)


def test_copy_is_audited(env):
    require_tools("rsync", "blkid", "mkfs.ext4")
    env.create("src", "64M")
    env.create("dst", "64M")
    dev = env.attach("src")["device"]
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    env.detach("src")
    n = len(env.json("audit"))
    env.cli("disk", "copy", "src", "dst")
    [rec] = _new(env, n, "disk-copy")
    _check(rec, "success", ["src", "dst"], env)
    # the attaches and detaches copy makes are recorded too, inside it
    assert len(_new(env, n, "disk-attach")) == 2 and len(_new(env, n, "disk-detach")) == 2
    n = len(env.json("audit"))
    env.refused(errors.DiskNotFound, "disk", "copy", "src", "nope")
    [rec] = _new(env, n, "disk-copy")
    _check(rec, "refused", ["src", "nope"], env)
    _verified(env)
