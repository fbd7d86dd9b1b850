import os
import signal
import subprocess
import sys

from blockcrypt.testing.crashpoints import ENV_CRASH_AT, ENV_CRASH_LIST, crashpoint

PROG = ("from blockcrypt.testing.crashpoints import crashpoint\n"
        "crashpoint('a'); print('after-a', flush=True)\n"
        "crashpoint('b'); print('after-b', flush=True)\n")


def _run(env):
    return subprocess.run([sys.executable, "-c", PROG], capture_output=True,
                          env={**os.environ, **env})


def test_no_env_no_crash():
    crashpoint("anything")  # must return
    cp = _run({})
    assert cp.returncode == 0 and cp.stdout.split() == [b"after-a", b"after-b"]


def test_crash_at_named_step_is_sigkill(tmp_path):
    listing = tmp_path / "steps"
    cp = _run({ENV_CRASH_AT: "b", ENV_CRASH_LIST: str(listing)})
    assert cp.returncode == -signal.SIGKILL
    assert cp.stdout.split() == [b"after-a"]
    assert listing.read_text().split() == ["a", "b"]
