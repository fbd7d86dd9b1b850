"""The retry schedule of `disk attach --all-persistent` (blockcrypt/services/boot.py).

A stand-in disk service and an injected clock and sleep: this checks only the
schedule (which disks are retried, when, and what is reported).  The real path,
with a real token that arrives late, is tests/e2e/test_boot.py.
"""
from __future__ import annotations

from blockcrypt import errors
from blockcrypt.services import boot


class FakeDisks:
    """attach() fails for each disk as scripted: a list of exceptions, then success."""

    def __init__(self, script: dict[str, list[Exception]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[str] = []
        self.attached: set[str] = set()
        self.conn = None

    def show(self, name):
        return {"state": "attached" if name in self.attached else "available"}

    def attach(self, name, read_only=False):
        self.calls.append(name)
        if self.script[name]:
            raise self.script[name].pop(0)
        self.attached.add(name)


def unavailable():
    return errors.ProviderUnavailable(provider="hsm", reason="no token labelled 't'")


def run(script, wait_s, monkeypatch):
    disks = FakeDisks(script)
    rows = [{"name": n, "persistent_read_only": 0} for n in sorted(script)]
    monkeypatch.setattr(boot.persistent, "persistent_disks", lambda conn: rows)
    now = [0.0]
    sleeps: list[float] = []
    waits: list[tuple[list[str], float]] = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s
    pd = boot.PersistentDisks(disks, sleep=sleep, clock=lambda: now[0])
    result = pd.attach_all(wait_s=wait_s, on_wait=lambda w, t: waits.append((sorted(w), t)))
    return disks, result, sleeps, waits


def test_waiting_disks_are_retried_with_backoff_and_others_are_not(monkeypatch):
    script = {"a": [unavailable()] * 3, "b": [], "c": [errors.PassphraseRequired()]}
    disks, result, sleeps, waits = run(script, 60, monkeypatch)
    assert result["attached"] == ["b", "a"] and list(result["failed"]) == ["c"]
    assert sleeps == [1.0, 2.0, 4.0]
    assert waits == [(["a"], 1.0), (["a"], 2.0), (["a"], 4.0)]
    assert disks.calls.count("c") == 1 and disks.calls.count("a") == 4
    err = boot.failures(result, "attached")
    assert err.exit_code == errors.SomeDisksFailed.exit_code
    assert err.message.startswith("1 of 3 disks could not be attached")


def test_giving_up_after_the_wait_names_the_reason(monkeypatch):
    disks, result, sleeps, _ = run({"a": [unavailable()] * 100}, 10, monkeypatch)
    assert sum(sleeps) == 10 and sleeps[-1] == 3.0          # 1 + 2 + 4, then what is left
    assert "gave up waiting after 10 s" in result["failed"]["a"]
    assert "no token labelled" in result["failed"]["a"]
    assert boot.failures({"attached": ["x"], "failed": {}}, "attached") is None
