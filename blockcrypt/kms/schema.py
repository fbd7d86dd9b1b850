"""Registers the key management tables with the shared database (:mod:`blockcrypt.storage.db`).

The audit trail's tables (:mod:`.audit`, shared by every provider) and the local
provider's (:mod:`.local.schema`).  :func:`blockcrypt.storage.db.connect` imports
this module itself (``SCHEMA_MODULES``, after the disk catalog), so every
connection has every table and nothing in blockcrypt imports it for that.  Keeping
the registration here, and only here, also keeps the order in which a new home
creates its tables (catalog, audit, kms) what it has always been.
"""
from __future__ import annotations

from ..storage.db import register_schema
from . import audit, providers_schema
from .local import schema as local_schema

register_schema("audit", audit.SCHEMA)
register_schema("kms", local_schema.SCHEMA)
register_schema("kms-providers", providers_schema.SCHEMA)
