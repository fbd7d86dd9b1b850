"""Fixtures of the CLI tests."""
from __future__ import annotations

import pytest

from support.cli import run_cli


@pytest.fixture
def bc_home(home, passphrase_file):
    """run_cli bound to an initialised home: ``bc_home(*argv, check=True)``."""
    def run(*args, check=True):
        return run_cli(*args, home=home, passphrase_file=passphrase_file, check=check)
    run("init")
    return run
