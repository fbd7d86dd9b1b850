"""`blockcrypt disk ...`."""
import click

from . import cli


@cli.group("disk")
def disk_group():
    """Encrypted and plain virtual disks."""
