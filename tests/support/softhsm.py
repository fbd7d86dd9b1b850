"""A real SoftHSM2 token for the tests of the ``pkcs11`` key provider.

:func:`make_token` makes a token directory and configuration under a temporary
directory, initialises one token in it with ``softhsm2-util`` and writes the user
PIN to a 0600 file, the way an administrator would.  ``SOFTHSM2_CONF`` (a path,
not a secret) must point at the configuration before a process loads the module,
so the session fixture sets it in this process's environment: CLI subprocesses
inherit it.  The PINs of this throwaway token are given to ``softhsm2-util`` on
its argv: it reads them only from argv or a terminal, and the token holds
nothing but test keys.  blockcrypt itself reads the PIN only from the PIN file.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.prereq import require, require_tools

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LABEL = "bc-test"
USER_PIN = "4711-test-pin"
SO_PIN = "so-4711-test-pin"


@dataclass(frozen=True)
class SoftToken:
    conf: Path
    tokens: Path
    module: str
    label: str
    pin_file: Path

    def provider_args(self, name: str = "hsm") -> list[str]:
        """The `blockcrypt provider add` arguments for this token."""
        return ["provider", "add", name, "--type", "pkcs11", "--module", self.module,
                "--token-label", self.label, "--pin-file", str(self.pin_file)]

    def provider_options(self) -> dict:
        return {"module": self.module, "token_label": self.label,
                "pin_file": str(self.pin_file)}


def make_token(base: Path, label: str = LABEL) -> SoftToken:
    require_tools("softhsm2-util")
    require(os.path.exists(MODULE), f"{MODULE} (Debian package softhsm2) is missing")
    base.mkdir(parents=True, exist_ok=True)
    tokens = base / "tokens"
    tokens.mkdir(exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    # Test-only token: softhsm2-util takes PINs from argv or a terminal (see module doc).
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--so-pin", SO_PIN, "--pin", USER_PIN], env=env, check=True,
                   capture_output=True)
    pin_file = base / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    return SoftToken(conf=conf, tokens=tokens, module=MODULE, label=label, pin_file=pin_file)
