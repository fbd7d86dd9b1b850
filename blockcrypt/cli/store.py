"""`blockcrypt init` and `blockcrypt passphrase ...` (owned by the key-store work)."""
from . import cli  # noqa: F401
