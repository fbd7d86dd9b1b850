"""Services: what the CLI asks for.

- :mod:`.disks`: DiskService, create/list/show/delete disks, and the facade for
  attach, detach, serve and copy;
- :mod:`.attach`: attachment rows (claim, attach, detach, stale cleanup);
- :mod:`.runtime`: the nbdkit process and block device behind an attachment;
- :mod:`.serve`: ``disk serve`` and its TCP/TLS rules;
- :mod:`.copy`: ``disk copy`` (mount + rsync between two disks);
- :mod:`.snapshots`: LifecycleService, snapshots, disks from snapshots, reset, reinit;
- :mod:`.resize`: ``disk resize`` (grow in place, detached or attached);
- :mod:`.stores`: ``store add/list/show/remove`` (disk stores besides the home's files);
- :mod:`.rbd_snapshots`: snapshots, clones, rollbacks of disks on Ceph RBD;
- :mod:`.progress`: the copy loop's progress, routed to the CLI's display.

They talk to key providers through :mod:`blockcrypt.kms.provider`, to containers
through a :class:`blockcrypt.storage.store.Store`, to processes through
:mod:`blockcrypt.system`; never to the user (that is :mod:`blockcrypt.cli`).
"""
