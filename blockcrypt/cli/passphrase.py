"""Where the CLI gets passphrases from: a file, or a hidden prompt on a terminal.

The store passphrase comes from ``--passphrase-file`` or
``$BLOCKCRYPT_PASSPHRASE_FILE`` (see :meth:`blockcrypt.cli.App.passphrase`), a new
one from ``--new-passphrase-file``; without a file, a terminal is prompted.  A
passphrase is returned as a :class:`~blockcrypt.crypto.secret.Secret` and never
put in argv, the environment, a log or a message.
"""
from __future__ import annotations

import sys

import click

from .. import errors
from ..crypto.secret import Secret

MAX_PASSPHRASE_BYTES = 65536


def obtain_passphrase(path: str | None, prompt: str, *, confirm: bool,
                      missing: errors.BlockcryptError) -> Secret:
    """From the file at ``path`` if given, else a prompt on a terminal, else ``missing``."""
    if path:
        return read_passphrase_file(path)
    if sys.stdin.isatty():
        value = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
        if not value:
            raise errors.PassphraseError(detail="the passphrase must not be empty")
        return Secret(value.encode())
    raise missing


def read_passphrase_file(path: str) -> Secret:
    """The passphrase in a file (at most 64 KiB, one trailing newline dropped)."""
    try:
        with open(path, "rb") as f:
            raw = bytearray(f.read(MAX_PASSPHRASE_BYTES + 1))
    except OSError as e:
        raise errors.PassphraseFileError(path=path, reason=e.strerror or str(e)) from None
    try:
        if len(raw) > MAX_PASSPHRASE_BYTES:
            raise errors.PassphraseFileError(path=path, reason="larger than 64 KiB")
        # One trailing newline is not part of the passphrase (echo pass > file).
        if raw.endswith(b"\r\n"):
            del raw[-2:]
        elif raw.endswith(b"\n"):
            del raw[-1:]
        if not raw:
            raise errors.PassphraseFileError(path=path, reason="it is empty")
        return Secret(raw)
    finally:
        raw[:] = bytes(len(raw))
