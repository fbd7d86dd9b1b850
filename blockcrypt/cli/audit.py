"""`blockcrypt audit ...` (owned by the key-store work)."""
from . import cli  # noqa: F401
