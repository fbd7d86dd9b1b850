"""Option types of the command line that click's own would get wrong.

Owns :data:`ASCII_INT`: click's ``type=int`` calls ``int()``, which accepts digits
of every script (``--threads ٤`` is 4) and raises past 4300 digits; numbers on
blockcrypt's command line are ASCII only (:func:`blockcrypt.names.parse_int`),
refused with InvalidInput naming the option.  Ranges stay with the services.
"""
from __future__ import annotations

import click

from .. import names


class AsciiInt(click.ParamType):
    """A whole number in ASCII digits (optional leading '-')."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value                      # a default given as an int
        what = param.opts[0] if param is not None and param.opts else "number"
        return names.parse_int(str(value), what)


ASCII_INT = AsciiInt()
