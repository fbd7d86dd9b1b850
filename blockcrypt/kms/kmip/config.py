"""A ``kmip`` provider's configuration, and the check of its client key file.

The configuration (kept as JSON in ``kms_providers.config``) says where the key
manager is and which files authenticate this host to it: the server's host and
port, the CA certificate that signed the server's certificate, and this host's
client certificate and private key.  Only *paths* are stored; the private key is
read by the TLS library from its file each time a connection opens, and the file
must be a regular file that only its owner can read or write (mode 0600 or
0400), else the provider is refused with the ``chmod`` to run.

Each host has its own client certificate: the key manager authorises hosts by
the identity in it (the subject CN for PyKMIP).
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from ... import errors

KMIP = "kmip"
DEFAULT_PORT = 5696               # IANA port of KMIP over TLS
MAX_HOST_CHARS = 253


@dataclass(frozen=True)
class KmipConfig:
    """Where a kmip provider's server is and which files identify this host (no secret)."""

    host: str
    port: int
    ca: str
    cert: str
    key: str

    @property
    def server(self) -> str:
        """The server as messages name it."""
        return f"{self.host}:{self.port}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KmipConfig:
        d = json.loads(text)
        return cls(host=d["host"], port=int(d["port"]), ca=d["ca"], cert=d["cert"],
                   key=d["key"])

    @classmethod
    def validated(cls, provider: str, host, port, ca, cert, key) -> KmipConfig:
        """Check the options of ``provider add --type kmip`` (InvalidInput naming each)."""
        missing = [opt for opt, v in (("--host", host), ("--ca", ca), ("--cert", cert),
                                      ("--key", key)) if not v]
        if missing:
            raise errors.InvalidInput(
                detail=f"a kmip provider needs {', '.join(missing)}; e.g. `blockcrypt provider "
                       f"add {provider} --type kmip --host kms.example --port {DEFAULT_PORT} "
                       "--ca /etc/blockcrypt/kmip/ca.crt --cert /etc/blockcrypt/kmip/host.crt "
                       "--key /etc/blockcrypt/kmip/host.key`")
        if (not isinstance(host, str) or len(host) > MAX_HOST_CHARS
                or any(c.isspace() or ord(c) < 33 or c in "/@" for c in host)):
            raise errors.InvalidInput(detail=f"--host {host!r} is not a host name or address")
        if port is None:
            port = DEFAULT_PORT
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise errors.InvalidInput(detail=f"--port {port!r} must be 1..65535")
        paths = {}
        for opt, value in (("--ca", ca), ("--cert", cert), ("--key", key)):
            p = Path(value)
            if not p.is_absolute():
                raise errors.InvalidInput(
                    detail=f"{opt} {value!r} must be an absolute path (the boot units and "
                           "other directories read it)")
            if not p.is_file():
                raise errors.InvalidInput(detail=f"{opt} {value}: no such file")
            paths[opt] = str(p)
        check_key_file(provider, paths["--key"])
        return cls(host=host, port=port, ca=paths["--ca"], cert=paths["--cert"],
                   key=paths["--key"])


def check_key_file(provider: str, path: str) -> None:
    """ClientKeyFileError unless ``path`` is a regular file private to its owner."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise errors.ClientKeyFileError(
            provider=provider, path=path,
            reason="no such file; put this host's private key there and run "
                   f"`chmod 600 {path}`") from None
    except OSError as e:
        raise errors.ClientKeyFileError(provider=provider, path=path,
                                        reason=f"cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise errors.ClientKeyFileError(provider=provider, path=path,
                                        reason="not a regular file (a symlink is refused)")
    if st.st_mode & 0o077:
        raise errors.ClientKeyFileError(
            provider=provider, path=path,
            reason=f"it is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                   f"nothing was changed; run `chmod 600 {path}`")
