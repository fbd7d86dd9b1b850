"""The blockcrypt command line.

Only :func:`main` prints errors and chooses exit codes: commands raise
:class:`~blockcrypt.errors.BlockcryptError` subclasses and this module turns them
into one line on stderr (or a JSON object with ``--json``) and the class's exit
code.  Command groups live in sibling modules, one per subject; what they print
for people is formatted by :mod:`.output`, passphrases come from :mod:`.passphrase`
(``read_passphrase_file`` is re-exported here: tests and tools read passphrase
files the way the CLI does).
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import click

from .. import errors
from ..crypto.secret import Secret, disable_core_dumps
from ..storage import db
from ..storage.home import Home
from .passphrase import obtain_passphrase, read_passphrase_file

__all__ = ["App", "cli", "main", "json_option", "pass_app", "read_passphrase_file"]

PASSPHRASE_ENV = "BLOCKCRYPT_PASSPHRASE_FILE"


class App:
    """Per-invocation state handed to every command (``ctx.obj``)."""

    def __init__(self, home: Path | None, passphrase_file: str | None):
        self.home = Home(home)
        self._passphrase_file = passphrase_file
        self.json_output = False

    # -- passphrase -----------------------------------------------------
    def passphrase(self, prompt: str = "Store passphrase", confirm: bool = False) -> Secret:
        """The store passphrase: --passphrase-file, $BLOCKCRYPT_PASSPHRASE_FILE, or a tty prompt."""
        return obtain_passphrase(self._passphrase_file or os.environ.get(PASSPHRASE_ENV),
                                 prompt, confirm=confirm, missing=errors.PassphraseRequired())

    # -- output ------------------------------------------------------------
    def emit(self, data, human=None) -> None:
        """Print data as JSON (with --json) or as the human text/callable."""
        if self.json_output:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif callable(human):
            human(data)
        elif human is not None:
            click.echo(human)
        else:
            click.echo(data)

    def info(self, text: str) -> None:
        """A human-only progress line on stderr (never mixed into --json stdout)."""
        if not self.json_output:
            click.echo(text, err=True)


def json_option(f):
    """--json for a command: machine-readable output on stdout."""
    def callback(ctx, _param, value):
        if value:
            ctx.find_object(App).json_output = True
        return value
    return click.option("--json", "json_", is_flag=True, expose_value=False,
                        callback=callback, is_eager=True,
                        help="Print machine-readable JSON.")(f)


pass_app = click.make_pass_decorator(App)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="blockcrypt home directory (default: $BLOCKCRYPT_HOME, "
                   "/var/lib/blockcrypt for root, ~/.local/share/blockcrypt otherwise).")
@click.option("--passphrase-file", type=str, default=None,
              help="File holding the store passphrase (default: "
                   "$BLOCKCRYPT_PASSPHRASE_FILE, else a prompt on a terminal).")
@click.version_option(package_name="blockcrypt")
@click.pass_context
def cli(ctx, home, passphrase_file):
    """blockcrypt: encrypted virtual disks with KMS-style key management.

    Every encrypted disk has its own data key, stored only wrapped by a
    customer master key (CMK) from the local key store.
    """
    ctx.obj = App(home, passphrase_file)


def _register_groups() -> None:
    # Each module attaches its commands to cli (disk_import: `disk import`; shred:
    # `audit shred-report`; service: `service install`).
    from . import (  # noqa: F401
        audit,
        disk_import,
        disks,
        keys,
        providers,
        service,
        shred,
        snapshots,
        store,
        stores,
    )


_register_groups()


def main(argv=None) -> None:
    """Entry point: run the CLI, map BlockcryptError to its message and exit code."""
    disable_core_dumps()
    json_wanted = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        try:
            rv = cli.main(args=argv, standalone_mode=False)
        except sqlite3.Error as exc:   # a read outside a write transaction failed
            raise db.db_error(db.last_opened(), exc) from None
    except errors.BlockcryptError as e:
        if json_wanted:
            click.echo(json.dumps(e.to_dict()), err=True)
        else:
            click.echo(f"error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
