"""Where the nbdkit plugin is and the environment nbdkit needs to run it.

The one place that knows how nbdkit finds blockcrypt: the services, the tests
and ``scripts/bench.py`` all start nbdkit with :func:`plugin_path` and
:func:`plugin_env`.  The plugin ships inside the package, so a blockcrypt
installed from a wheel serves disks exactly like a source checkout.
"""
from __future__ import annotations

import importlib.resources
import os
import sysconfig
from pathlib import Path

import blockcrypt

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def plugin_path() -> Path:
    """The plugin script nbdkit loads (``nbdkit python PATH``).

    An installed package is a directory of files (pip never installs
    blockcrypt zipped), so the resource is a real path nbdkit can open.
    """
    return Path(str(importlib.resources.files("blockcrypt.nbd").joinpath("plugin.py")))


def plugin_pythonpath() -> list[str]:
    """Directories nbdkit's embedded /usr/bin/python3 must search: the one that
    holds this ``blockcrypt`` package (a checkout or site-packages) and this
    interpreter's site-packages (the virtualenv's: cryptography, click)."""
    paths = [str(Path(blockcrypt.__file__).resolve().parent.parent)]
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p and p not in paths:
            paths.append(p)
    return paths


# Test-only: slow the background snapshot copy (seconds per chunk) so a test can
# overwrite ranges before the copier reaches them.  Never set outside tests.
TESTONLY_COW_DELAY = "BLOCKCRYPT_TESTONLY_COW_CHUNK_DELAY_S"


def plugin_env() -> dict[str, str]:
    """The whole environment for nbdkit: PATH, PYTHONPATH and a fixed locale.

    Nothing else of the caller's environment is passed on, so nothing secret
    can reach nbdkit that way (the data key travels through a pipe), except
    the test-only knob :data:`TESTONLY_COW_DELAY` (see :mod:`.cow`).
    """
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH),
           "PYTHONPATH": os.pathsep.join(plugin_pythonpath()),
           "PYTHONNOUSERSITE": "1",
           "LC_ALL": "C.UTF-8"}
    if TESTONLY_COW_DELAY in os.environ:
        env[TESTONLY_COW_DELAY] = os.environ[TESTONLY_COW_DELAY]
    return env
