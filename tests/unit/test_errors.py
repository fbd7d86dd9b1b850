"""The exception tree: one root, unique exit codes in documented ranges, templates that format."""
import inspect
import re

import pytest

from blockcrypt import errors

CLASSES = [c for c in errors.all_error_classes()]


def test_every_error_derives_from_root():
    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, Exception) and cls.__module__ == errors.__name__:
            assert issubclass(cls, errors.BlockcryptError), cls


def test_exit_codes_unique_and_in_range():
    codes = {}
    for cls in CLASSES:
        assert cls.exit_code not in codes, f"{cls.__name__} reuses {codes.get(cls.exit_code)}"
        codes[cls.exit_code] = cls.__name__
        assert cls.exit_code == 1 or 10 <= cls.exit_code <= 99
        assert cls.exit_code != 2, "2 is click's usage error"


def test_subclass_codes_stay_in_parent_range():
    for cls in CLASSES:
        parent = cls.__mro__[1]
        if parent is not errors.BlockcryptError and issubclass(parent, errors.BlockcryptError):
            assert cls.exit_code // 10 == parent.exit_code // 10, cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_templates_format_with_their_fields(cls):
    template = cls.__doc__.strip().splitlines()[0]
    fields = {m for m in re.findall(r"{(\w+)", template)}
    e = cls(**{f: f"<{f}>" for f in fields})
    for f in fields:
        assert f"<{f}>" in e.message
    assert "{" not in e.message
    assert e.to_dict()["exit_code"] == cls.exit_code


def test_explicit_message_wins():
    e = errors.DiskNotFound("custom text")
    assert str(e) == "custom text" and e.exit_code == errors.DiskNotFound.exit_code
