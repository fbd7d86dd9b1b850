"""Fixtures of the storage unit tests."""
from __future__ import annotations

import pytest

from blockcrypt.storage import db


@pytest.fixture
def conn(tmp_path):
    """A fresh catalog database (every registered schema applied)."""
    c = db.connect(tmp_path / "blockcrypt.db", create=True)
    yield c
    c.close()
