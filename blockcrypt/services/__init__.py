"""Services: what the CLI asks for (disks, attach/serve, copy, snapshots).

They talk to key providers through :mod:`blockcrypt.kms.provider`, to storage
through :mod:`blockcrypt.storage`, to processes through :mod:`blockcrypt.system`;
never to the user (that is :mod:`blockcrypt.cli`).
"""
