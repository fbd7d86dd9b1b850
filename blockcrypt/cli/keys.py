"""`blockcrypt key ...` (owned by the key-store work)."""
import click

from . import cli


@cli.group("key")
def key_group():
    """Customer master keys (CMKs) in the local key store."""
