"""The NBD side: the nbdkit Python plugin (a thin adapter, :mod:`.plugin`), the
sector backend it serves (:mod:`.backend`), and how to launch it (:mod:`.launch`).

:mod:`.plugin` runs inside nbdkit's embedded interpreter and is never imported
by the CLI; :mod:`.launch` locates it with :mod:`importlib.resources`.
"""
