"""A ``pkcs11`` provider's configuration, and the PIN file it names.

The configuration (kept as JSON in ``kms_providers.config``) is where the token
is: the PKCS#11 module's path, the token's label and the *path* of a file holding
the user PIN.  The PIN itself is never stored by blockcrypt, never taken from
argv or the environment, and never printed: it is read from the file each time a
process logs in, and the file must be a regular file that only its owner can read
or write (mode 0600 or 0400), else the provider is refused with the ``chmod``
to run.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from ... import errors
from ...crypto.secret import Secret

PKCS11 = "pkcs11"
MAX_PIN_BYTES = 256
MAX_LABEL_CHARS = 32            # CK_TOKEN_INFO.label is 32 bytes
CKA_ID_BYTES = 16               # random CKA_ID of each token object blockcrypt makes
GCM_TAG_BITS = 128


@dataclass(frozen=True)
class Pkcs11Config:
    """Where a pkcs11 provider's token is (no secret in here)."""

    module: str
    token_label: str
    pin_file: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Pkcs11Config:
        d = json.loads(text)
        return cls(module=d["module"], token_label=d["token_label"], pin_file=d["pin_file"])

    @classmethod
    def validated(cls, provider: str, module: str | None, token_label: str | None,
                  pin_file: str | None) -> Pkcs11Config:
        """Check the options of ``provider add --type pkcs11`` (InvalidInput naming each)."""
        missing = [opt for opt, v in (("--module", module), ("--token-label", token_label),
                                      ("--pin-file", pin_file)) if not v]
        if missing:
            raise errors.InvalidInput(
                detail=f"a pkcs11 provider needs {', '.join(missing)}; e.g. `blockcrypt "
                       f"provider add {provider} --type pkcs11 --module "
                       "/usr/lib/softhsm/libsofthsm2.so --token-label LABEL --pin-file FILE`")
        if (len(token_label) > MAX_LABEL_CHARS
                or any(ord(c) < 32 or ord(c) == 127 for c in token_label)):
            raise errors.InvalidInput(
                detail=f"token label {token_label!r} must be 1-{MAX_LABEL_CHARS} printable "
                       "characters")
        mod = Path(module)
        if not mod.is_absolute() or not mod.is_file():
            raise errors.ProviderModuleError(provider=provider, module=module,
                                             reason="no such file (give an absolute path)")
        pin = Path(pin_file)
        if not pin.is_absolute():
            raise errors.InvalidInput(detail=f"--pin-file {pin_file!r} must be an absolute path "
                                             "(the boot units read it from another directory)")
        return cls(module=str(mod), token_label=token_label, pin_file=str(pin))


def read_pin(provider: str, path: str) -> Secret:
    """The PIN in ``path`` without its trailing newline; PinFileError if the file is not
    private to its owner, missing, empty or too long."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.PinFileError(provider=provider, path=path,
                                  reason="no such file; write the token's user PIN into it "
                                         f"and run `chmod 600 {path}`") from None
    except OSError as e:
        raise errors.PinFileError(provider=provider, path=path,
                                  reason=f"cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.PinFileError(provider=provider, path=path, reason="not a regular file")
        if st.st_mode & 0o077:
            raise errors.PinFileError(
                provider=provider, path=path,
                reason=f"it is accessible to group or others (mode "
                       f"{stat.S_IMODE(st.st_mode):04o}); nothing was changed; run "
                       f"`chmod 600 {path}`")
        buf = Secret(MAX_PIN_BYTES + 2)
        n = os.readv(fd, [buf.view()])
    finally:
        os.close(fd)
    with buf:
        v = buf.view()[:n]
        while n and v[n - 1] in (0x0A, 0x0D):
            n -= 1
        if n == 0 or n > MAX_PIN_BYTES:
            raise errors.PinFileError(provider=provider, path=path,
                                      reason="it must hold the PIN (1-256 bytes) and nothing "
                                             "else")
        return Secret(buf.view()[:n])
