"""`blockcrypt snapshot ...`."""
import click

from . import cli


@cli.group("snapshot")
def snapshot_group():
    """Snapshots of disks (ciphertext plus the wrapped data key)."""
