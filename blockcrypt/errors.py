"""The one exception tree of blockcrypt.

Every error a user can meet is a subclass of :class:`BlockcryptError`.  The class
docstring's first line is the message template (``str.format`` fields filled from
the constructor's keyword arguments); ``exit_code`` is the process exit status the
CLI uses.  Only the CLI entry point prints errors and exits.  Tests compare
against ``SomeError.exit_code``, never a bare number.

Messages say what failed, on which object, and the next step.  They never
contain key material: pass names and ids, never bytes of a secret.

Exit code table (ranges, one place):

    0       success
    1       internal error (a bug: please report it)
    2       command-line usage error (click)
    10-19   invalid input (names, sizes, arguments)
    20-29   object not found (store, key, disk, snapshot)
    30-39   object in the wrong state for the request
    40-49   passphrase / authentication
    50-59   cryptographic failure (unwrap, tampered blob, weak key)
    60-69   container format (header parsing)
    70-79   refused by the encryption model (no conversion, no CMK change)
    80-89   environment (missing tool, not root, no block device, server)
    90-99   storage I/O
"""
from __future__ import annotations


class BlockcryptError(Exception):
    """blockcrypt failed: {detail}"""

    exit_code = 1

    def __init__(self, message: str | None = None, **fields):
        self.fields = fields
        if message is None:
            template = (type(self).__doc__ or "").strip().splitlines()[0]
            try:
                message = template.format(**fields)
            except (KeyError, IndexError):  # a bug in a raise site; keep the template
                message = template
        self.message = message
        super().__init__(message)

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": self.message,
                "exit_code": self.exit_code}


# 10-19: invalid input -------------------------------------------------------

class InvalidInput(BlockcryptError):
    """invalid input: {detail}"""
    exit_code = 10


class InvalidName(InvalidInput):
    """invalid {what} name {name!r}: {reason}; use 1-64 characters of A-Z a-z 0-9 . _ - not starting with '.'"""
    exit_code = 11


class InvalidSize(InvalidInput):
    """invalid size {size!r}: {reason}"""
    exit_code = 12


class InvalidKeyMaterial(InvalidInput):
    """invalid key: {reason}"""
    exit_code = 13


class InsecureFile(InvalidInput):
    """{what} {path} can be read or changed by other users (mode {mode}); run `chmod 600 {path}` and retry"""
    exit_code = 14


class HeaderBackupMismatch(InvalidInput):
    """refused: {file} is the header backup of another disk ({reason}), not of disk {name!r}; nothing was written: give the backup made with `blockcrypt disk header-backup {name} FILE`"""
    exit_code = 15


class InvalidHeaderBackup(InvalidInput):
    """{file} is not a usable blockcrypt header backup: {reason}; give a file made by `blockcrypt disk header-backup NAME FILE`"""
    exit_code = 16


# 20-29: not found ------------------------------------------------------------

class NotFound(BlockcryptError):
    """{what} {name!r} not found"""
    exit_code = 20


class StoreNotFound(NotFound):
    """no blockcrypt store at {home}; run `blockcrypt init` first"""
    exit_code = 21


class KeyNotFound(NotFound):
    """key {name!r} not found; run `blockcrypt key list` to see the keys"""
    exit_code = 22


class DiskNotFound(NotFound):
    """disk {name!r} not found; run `blockcrypt disk list` to see the disks"""
    exit_code = 23


class SnapshotNotFound(NotFound):
    """snapshot {name!r} not found; run `blockcrypt snapshot list` to see the snapshots"""
    exit_code = 24


class DiskStoreNotFound(NotFound):
    """disk store {name!r} not found; run `blockcrypt store list` to see the stores (files are the default store)"""
    exit_code = 25


class ImageMissing(NotFound):
    """the RBD image {image!r} of {owner} is missing from store {store!r} (removed outside blockcrypt?); restore it with Ceph's tools, or remove the catalog entry with `blockcrypt disk delete`"""
    exit_code = 26


class ProviderNotFound(NotFound):
    """key provider {name!r} not found; run `blockcrypt provider list` to see the providers"""
    exit_code = 27


class TokenObjectMissing(NotFound):
    """key {key_id} version {version}: its key object is missing from the token of provider {provider!r} (deleted outside blockcrypt?); data wrapped by that version cannot be unwrapped until the token object is restored from the token's backup"""
    exit_code = 28


class KeyProviderUnknown(NotFound):
    """{what}: its data key is wrapped by key {key_id} of a {kind} provider that this host does not know; {next_step}"""
    exit_code = 29


# 30-39: wrong state ----------------------------------------------------------

class StateError(BlockcryptError):
    """{detail}"""
    exit_code = 30


class AlreadyExists(StateError):
    """{what} {name!r} already exists; choose another name"""
    exit_code = 31


class KeyStateError(StateError):
    """key {key_id} is {state}: {detail}"""
    exit_code = 32


class KeyInUse(StateError):
    """key {key_id} is used by {dependants}; {next_step}"""
    exit_code = 33


class ServiceKeyProtected(StateError):
    """{key_id} is the service key (alias blockcrypt/default) and cannot be {action}"""
    exit_code = 34


class DiskAttached(StateError):
    """disk {name!r} is attached at {device}; run `blockcrypt disk detach {name}` first"""
    exit_code = 35


class DiskNotAttached(StateError):
    """disk {name!r} is not attached"""
    exit_code = 36


class DeviceBusy(StateError):
    """disk {name!r} is mounted at {mountpoint}; unmount it (umount {mountpoint}) and retry"""
    exit_code = 37


class ImportTokenError(StateError):
    """import for key {key_id} refused: {detail}"""
    exit_code = 38


class StaleMount(StateError):
    """disk {name!r}: its server stopped while {device} was still mounted at {mountpoint}; run `umount {mountpoint}` and retry (or pass --force to attach it again anyway)"""
    exit_code = 39


# 40-49: passphrase ------------------------------------------------------------

class PassphraseError(BlockcryptError):
    """passphrase problem: {detail}"""
    exit_code = 40


class PassphraseRequired(PassphraseError):
    """the store passphrase is needed: pass --passphrase-file FILE, set BLOCKCRYPT_PASSPHRASE_FILE, or run on a terminal to be prompted"""
    exit_code = 41


class WrongPassphrase(PassphraseError):
    """wrong passphrase for the store at {home}; nothing was changed"""
    exit_code = 42


class PassphraseFileError(PassphraseError):
    """cannot read passphrase file {path}: {reason}"""
    exit_code = 43


class PinIncorrect(PassphraseError):
    """the token of key provider {provider!r} refused the PIN in {pin_file}; nothing was changed; put the token's user PIN in that file (mode 0600)"""
    exit_code = 44


class PinFileError(PassphraseError):
    """PIN file {path} of key provider {provider!r}: {reason}"""
    exit_code = 45


class KeyManagerNotAuthorised(PassphraseError):
    """key {key_id} is not authorised by the key manager: the KMIP server {server} of provider {provider!r} refused this host's certificate (CN {identity!r}) for {operation}; ask the key manager's administrator to authorise this host for the key, or use the disk on a host that is"""
    exit_code = 46


class ClientKeyFileError(PassphraseError):
    """client key file {path} of key provider {provider!r}: {reason}"""
    exit_code = 47


# 50-59: cryptography ----------------------------------------------------------

class CryptoError(BlockcryptError):
    """cryptographic failure: {detail}"""
    exit_code = 50


class UnwrapError(CryptoError):
    """cannot unwrap the data key of {what}: {reason}"""
    exit_code = 51


class BlobFormatError(CryptoError):
    """wrapped data key is malformed: {reason}"""
    exit_code = 52


class AuditTampered(CryptoError):
    """the audit trail was tampered with: {detail}"""
    exit_code = 53


class TokenOperationFailed(CryptoError):
    """the token of key provider {provider!r} refused {operation}: {reason}"""
    exit_code = 55


class KeyManagerStateError(CryptoError):
    """key {key_id} version {version} is {state} on the KMIP server {server} of provider {provider!r} (changed outside blockcrypt); {detail}"""
    exit_code = 58


class ContextBindingUnsupported(CryptoError):
    """key provider {provider!r}: the KMIP server {server} {reason}; blockcrypt never wraps a data key without binding its encryption context, so nothing was changed"""
    exit_code = 59


class CatalogTampered(CryptoError):
    """refused: the catalog records {what} at {path!r}, outside {where} of the blockcrypt home {home}; the database was tampered with, so nothing was touched: restore blockcrypt.db from a backup"""
    exit_code = 54


# 60-69: container format -----------------------------------------------------

class FormatError(BlockcryptError):
    """{path}: not a usable blockcrypt container: {reason}"""
    exit_code = 60


class BadMagic(FormatError):
    """{path}: not a blockcrypt container (bad magic)"""
    exit_code = 61


class UnknownVersion(FormatError):
    """{path}: container format version {version} is not supported by this blockcrypt; upgrade blockcrypt"""
    exit_code = 62


class ChecksumMismatch(FormatError):
    """{path}: both header copies fail their checksum; the container is damaged"""
    exit_code = 63


class Truncated(FormatError):
    """{path}: file is truncated ({size} bytes, need {need})"""
    exit_code = 64


class BadGeometry(FormatError):
    """{path}: inconsistent geometry: {reason}"""
    exit_code = 65


class UnsupportedSectorSize(FormatError):
    """{path}: sector size {sector_size} is not supported (use 512 or 4096)"""
    exit_code = 66


class UnknownCipher(FormatError):
    """{path}: unknown cipher {cipher!r}"""
    exit_code = 67


class MalformedHeader(FormatError):
    """{path}: malformed header field: {reason}"""
    exit_code = 68


# 70-79: encryption model refusals --------------------------------------------

class PolicyRefused(BlockcryptError):
    """refused: {detail}; to move data between disks use `blockcrypt disk copy SRC DST`"""
    exit_code = 70


class ConversionRefused(PolicyRefused):
    """refused: {detail}; an encrypted disk or snapshot never becomes unencrypted in place. To move its data onto an unencrypted disk, create one and run `blockcrypt disk copy SRC DST`"""
    exit_code = 71


class EncryptionRefused(ConversionRefused):
    """refused: {detail}; an unencrypted disk or snapshot never becomes encrypted in place. To move its data onto an encrypted disk, create one and run `blockcrypt disk copy SRC DST`"""
    exit_code = 75


class CmkChangeRefused(PolicyRefused):
    """refused: a disk's customer master key never changes ({detail}); create a disk under the other key and run `blockcrypt disk copy SRC DST`"""
    exit_code = 72


class ExportRefused(PolicyRefused):
    """refused: snapshot {name!r} is encrypted and encrypted snapshots cannot be exported; create a disk from it and copy the files with `blockcrypt disk copy SRC DST`"""
    exit_code = 73


class LineageMismatch(PolicyRefused):
    """refused: snapshot {snapshot!r} does not belong to disk {disk!r} (different data key lineage); create a new disk with `blockcrypt disk create NAME --from-snapshot {snapshot}`"""
    exit_code = 74


# 80-89: environment ------------------------------------------------------------

class EnvironmentProblem(BlockcryptError):
    """{detail}"""
    exit_code = 80


class MissingTool(EnvironmentProblem):
    """{tool} not found; install it with `apt-get install {package}` (or run `make install`)"""
    exit_code = 81


class NotRoot(EnvironmentProblem):
    """{action} needs root; run it with sudo"""
    exit_code = 82


class NoBlockDevice(EnvironmentProblem):
    """cannot attach disk {name!r}: {reason}"""
    exit_code = 83


class ServerError(EnvironmentProblem):
    """nbdkit for disk {name!r} failed: {reason}"""
    exit_code = 84


class CommandFailed(EnvironmentProblem):
    """{cmd} failed (exit {rc}): {stderr}"""
    exit_code = 85


class ProviderUnavailable(EnvironmentProblem):
    """key provider {provider!r} is unavailable: {reason}"""
    exit_code = 87


class ProviderModuleError(EnvironmentProblem):
    """key provider {provider!r}: {module} is not a usable PKCS#11 library ({reason}); pass the path of the token's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so"""
    exit_code = 88


class SomeDisksFailed(EnvironmentProblem):
    """{failed} of {total} disks could not be {action} (the others were): {detail}"""
    exit_code = 89


# 90-99: storage --------------------------------------------------------------

class StorageError(BlockcryptError):
    """I/O error on {path}: {reason}"""
    exit_code = 90


class NoSpace(StorageError):
    """no space left for {path}; free space or move the blockcrypt home"""
    exit_code = 91


class DatabaseDamaged(StorageError):
    """the database {path} is damaged ({reason}); it holds the key store and the disk catalog: stop blockcrypt, keep a copy of it, and restore it from a backup of the home (or salvage it with `sqlite3 {path} .recover`)"""
    exit_code = 92


class HomeFull(NoSpace):
    """no space left in HOME {home} (writing {what}); free space there and retry"""
    exit_code = 93


class DatabaseUnusable(StorageError):
    """cannot use the database {path}: {reason}; {next_step}"""
    exit_code = 94


class StoreUnreachable(StorageError):
    """store {store!r}: the Ceph cluster cannot be reached ({reason}); check the monitors in {conf} and the network, then retry"""
    exit_code = 95


class StoreAuthRefused(StorageError):
    """store {store!r}: the Ceph cluster refused client {client!r} ({reason}); check the keyring {keyring} and that the user has `profile rbd` on pool {pool!r}"""
    exit_code = 96


class PoolMissing(StorageError):
    """store {store!r}: {reason}; create it with `ceph osd pool create {pool}` and `rbd pool init {pool}`, or name another pool"""
    exit_code = 97


class DiskHeld(StorageError):
    """disk {name!r} is {state} ({holder}); {next_step}"""
    exit_code = 98


class StoreNotAnswering(StorageError):
    """store {store!r}: the Ceph cluster did not answer an operation on {what} in time (an OSD down, a placement group inactive, or the monitors gone since connecting); check `ceph -s` and `ceph health detail`, then retry"""
    exit_code = 99


def storage_error(path, exc: OSError, what: str = "file") -> BlockcryptError:
    """The user-facing error for an OSError on path: NoSpace, NotFound or StorageError."""
    import errno
    import os
    p = os.fspath(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(path=p)
    if exc.errno == errno.ENOENT:
        return NotFound(what=what, name=p)
    return StorageError(path=p, reason=exc.strerror or str(exc))


def all_error_classes() -> list[type[BlockcryptError]]:
    """Every class in the tree (used by tests to check codes are unique)."""
    out, todo = [], [BlockcryptError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
