"""Where the CLI gets passphrases from: a file, or a hidden prompt on a terminal.

The store passphrase comes from ``--passphrase-file`` or
``$BLOCKCRYPT_PASSPHRASE_FILE`` (see :meth:`blockcrypt.cli.App.passphrase`), a new
one from ``--new-passphrase-file``; without a file, a terminal is prompted.  A
passphrase is returned as a :class:`~blockcrypt.crypto.secret.Secret` and never
put in argv, the environment, a log or a message.
"""
from __future__ import annotations

import os
import sys

import click

from .. import errors
from ..crypto.secret import Secret
from ..storage.home import open_secret_file

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
    """The passphrase in a file (at most 64 KiB, one trailing newline dropped).

    The file must be private (mode 0600 or stricter: InsecureFile otherwise).  It
    is read without Python's buffering straight into a bytearray that is wiped in
    place, so no immutable copy of the passphrase is left behind in freed memory.
    """
    try:
        fd = open_secret_file(path, "passphrase file")
    except OSError as e:
        raise errors.PassphraseFileError(path=path, reason=e.strerror or str(e)) from None
    raw = bytearray(MAX_PASSPHRASE_BYTES + 1)
    try:
        view = memoryview(raw)
        n = 0
        try:
            while n < len(raw):
                k = os.readv(fd, [view[n:]])
                if k == 0:
                    break
                n += k
        except OSError as e:
            raise errors.PassphraseFileError(path=path, reason=e.strerror or str(e)) from None
        if n > MAX_PASSPHRASE_BYTES:
            raise errors.PassphraseFileError(path=path, reason="larger than 64 KiB")
        # One trailing newline is not part of the passphrase (echo pass > file).
        # (Indexing, not slicing: a slice would be an unwiped copy.)
        if n and raw[n - 1] == 0x0A:
            n -= 2 if n >= 2 and raw[n - 2] == 0x0D else 1
        if not n:
            raise errors.PassphraseFileError(path=path, reason="it is empty")
        secret = Secret(view[:n])
        view.release()
        return secret
    finally:
        os.close(fd)
        raw[:] = bytes(len(raw))
