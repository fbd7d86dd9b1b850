"""blockcrypt: encrypted virtual disks for Linux with KMS-style envelope encryption."""

__version__ = "0.1.0"
