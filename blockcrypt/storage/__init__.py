"""Storage: where disks and snapshots live and what is recorded about them.

The container format (:mod:`.container`), the file store behind the storage
seam, the temp-file publish protocol, thin copies (:mod:`.fastcopy`), the
SQLite catalog and the home directory.  Nothing here knows about keys beyond
the wrapped blob in a header, nor about nbdkit or the CLI.
"""
