"""How the CLI formats what it prints for people: tables, aligned fields, sizes.

One home for each text helper the command modules share; ``--json`` output is
:meth:`blockcrypt.cli.App.emit`'s and does not come through here.  Pure string
functions: nothing here prints, reads state or raises BlockcryptError.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def format_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """Left-aligned columns separated by two spaces (the last column is not padded);
    None shows as '-'."""
    cells = [[str(c) if c is not None else "-" for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_fields(rows: Sequence[tuple[str, object]], *, colon: bool = True) -> str:
    """One object's details, the values aligned: ``name: value`` lines, or with
    ``colon=False`` ``Name  value`` lines (two spaces, as `key show` prints them)."""
    suffix, gap = (":", " ") if colon else ("", "  ")
    width = max(len(k) for k, _ in rows) + len(suffix)
    return "\n".join(f"{k + suffix:<{width}}{gap}{v}" for k, v in rows)


def indent(text: str, prefix: str = "  ") -> str:
    """Every line of text, indented (a block under a heading)."""
    return "\n".join(prefix + line for line in text.splitlines())


def human_size(size_bytes: int) -> str:
    """1073741824 -> '1 GiB', 1610612736 -> '1.5 GiB', 1000 -> '1000 B'."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
