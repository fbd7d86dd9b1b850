"""`disk import`: adding a container file made on another host to this host's catalog.

The file is checked before anything changes: its header must parse (a damaged
header is refused with the container format error), it must be a disk (not a
snapshot), its id and the name must be new here, and an encrypted disk's key must
be one this host can ask for: a kmip key (adopted into the key catalog in this
host's kmip provider, :mod:`blockcrypt.kms.local.adopt`) or a key already known.
Nothing secret travels with the file but the wrapped data key, which only the key
manager can open, and only for a host it authorises (checked at attach).

The file is copied into the home (a reflink where the file system allows) with
the same crash-safe create as ``disk create`` (:func:`.disks.publishing`); the
source file is left as it was.  The copy's header is read again and must equal
the one checked.

An RBD image (:func:`import_image`, ``disk import NAME IMAGE --store S``) is not
copied: it already lives where every host of the store reaches it, so only this
host's catalog learns of it, after the same checks, plus one: the data key must
unwrap here now (the key manager authorises this host), so a disk this host
could never attach is not recorded.
"""
from __future__ import annotations

from pathlib import Path

from .. import errors, names
from ..constants import utc_timestamp
from ..storage import catalog, container, db
from ..storage.header import Kind
from ..testing.crashpoints import crashpoint
from .disks import DiskService, publishing


def _check_new(disks: DiskService, header, what: str, path: str,
               provider: str | None) -> None:
    """A disk header whose id is new here, with a key this host can ask for."""
    if header.kind != Kind.DISK:
        raise errors.InvalidInput(detail=f"{what} is a {header.kind.value}, not a disk; only "
                                         "disks are imported")
    same = catalog.get_disk_by_id(disks.conn, header.uid_hex)
    if same is not None:
        raise errors.StateError(detail=f"{what} is disk {same['name']!r} of this host already "
                                       "(same container id); nothing was changed")
    if header.encrypted:
        key = disks.keys.adopt_key(header.wrapped_dk, provider, what)
        if key["id"] != header.cmk_id:
            raise errors.MalformedHeader(path=path, reason="its CMK id and the key named "
                                                           "in its wrapped data key differ")


def _insert(disks: DiskService, name: str, header, ref: str):
    catalog.insert_disk(
        disks.conn, id=header.uid_hex, name=name, path=ref,
        size_bytes=header.size_bytes, sector_size=header.sector_size,
        encrypted=int(header.encrypted), cmk_id=header.cmk_id,
        lineage_id=header.lineage_hex, discard=0, source_snapshot_id=None,
        created_at=utc_timestamp())
    return catalog.get_disk_by_id(disks.conn, header.uid_hex)


def import_image(disks: DiskService, name: str, store: str, image: str,
                 provider: str | None = None) -> dict:
    """Add the RBD image ``image`` of ``store`` (made by another host) as disk ``name``."""
    names.validate_name(name)
    target = disks.store.named(store)
    disks.recover_files()
    if catalog.get_disk(disks.conn, name) is not None:
        raise errors.AlreadyExists(what="disk", name=name)
    ref = f"rbd:{store}/{image}"
    loc = target.locate(ref, owner=f"image {image!r}")     # a blockcrypt image name
    header = target.read_header(loc, repair=False)          # never writes the image
    what = f"image {image!r} of store {store!r}"
    if loc.image != target.new_ref("disks", header.uid_hex).split("/", 1)[1]:
        raise errors.MalformedHeader(path=ref, reason=f"its header's id {header.uid_hex} is not "
                                                      "the one its name says")
    _check_new(disks, header, what, ref, provider)
    dk = disks.unwrap(None, header)         # the key manager authorises this host now
    if dk is not None:
        dk.wipe()
    with db.write_txn(disks.conn):
        if catalog.get_disk(disks.conn, name) is not None:
            raise errors.AlreadyExists(what="disk", name=name)
        row = _insert(disks, name, header, ref)
    return disks.describe(row, None)


def import_disk(disks: DiskService, name: str, file: str | Path,
                provider: str | None = None) -> dict:
    """Add the container ``file`` as disk ``name``; returns its description."""
    names.validate_name(name)
    disks.recover_files()
    if catalog.get_disk(disks.conn, name) is not None:
        raise errors.AlreadyExists(what="disk", name=name)
    src = Path(file).absolute()
    if not src.is_file():
        raise errors.NotFound(what="container file", name=str(src))
    header = container.read_header(src, repair=False)      # never writes the source
    what = f"container {src}"
    _check_new(disks, header, what, str(src), provider)
    disks.home.create_dirs()
    rel_path = disks.store.new_ref("disks", header.uid_hex)
    with publishing(disks.store, disks.store.locate(rel_path),
                    after_commit="disk-import.after-row") as tmp:
        disks.store.clone(src, tmp)
        if container.read_header(tmp, repair=False) != header:
            raise errors.StateError(detail=f"{what} changed while it was being copied; "
                                           "nothing was imported; run the import again")
        with db.write_txn(disks.conn):
            if catalog.get_disk(disks.conn, name) is not None:
                raise errors.AlreadyExists(what="disk", name=name)
            row = _insert(disks, name, header, rel_path)
            crashpoint("disk-import.in-txn")
    return disks.describe(row, None)
