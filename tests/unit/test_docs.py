"""The documentation against the code: exit codes and test references.

README.md and every docs/*.md are read as a user would read them:

- exit-code range tables (header ``codes | meaning``) must list exactly the
  ranges of the table in :mod:`blockcrypt.errors`' docstring, with the same
  meanings, and each range must hold exactly the error classes of its base class
  (the class whose code opens the range);
- error tables (header ``code | error | ...``) must give each named class its
  ``exit_code``; a phrase in the row that belongs to another error (see
  ``PHRASES``) must have that error's code too;
- every prose mention of a code ("exits 53", "exit code (42)", "exit codes
  60-69") must belong to the error the sentence names: by class name, by a
  quoted message (the start of the class's message template), or by a phrase of
  ``PHRASES``; a mention that names no error fails, so name the class;
- every ``tests/...py`` (and ``::test_name``, ``::Class::test_name``; a bare
  ``::test_name`` refers to the last file named before it in the paragraph)
  must exist, and so must every ``tests/.../`` folder.

Each checker returns a list of problems; the ``test_checker_*`` tests feed them
known-bad text to show they catch what they are for.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockcrypt import errors

from support.cli import REPO

GENERIC_CODES = {0: "success", 2: "command-line usage"}   # no error class behind these

# Phrases that name an error without its class name (lower case; longest first wins).
PHRASES: dict[str, type[errors.BlockcryptError]] = {
    "audit verify": errors.AuditTampered,
    "audit trail tampered": errors.AuditTampered,
    "wrong passphrase": errors.WrongPassphrase,
}

CLASSES = {c.__name__: c for c in errors.all_error_classes()}
BY_CODE: dict[int, list[type[errors.BlockcryptError]]] = {}
for _cls in CLASSES.values():
    BY_CODE.setdefault(_cls.exit_code, []).append(_cls)

EXIT_MENTION = re.compile(r"\bexit(?:s|ed|ing)?(?:\s+(?:with\s+)?(?:code|codes|status))?"
                          r"\s*\(?\s*(\d{1,3})(?:\s*[-\u2013]\s*(\d{1,3}))?\b", re.IGNORECASE)
TEST_REF = re.compile(r"(?<![\w/.-])(tests/[\w/.-]*?\.py)((?:::[\w\[\]-]+)+)?")
BARE_REF = re.compile(r"(?<![\w/.)])((?:::[A-Za-z_][\w\[\]-]*)+)")
TEST_DIR = re.compile(r"(?<![\w/.-])(tests/(?:[\w-]+/)+)(?![\w.])")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass
class Table:
    doc: str
    line: int
    header: list[str]
    rows: list[tuple[int, list[str]]]


def cells(line: str) -> list[str]:
    return [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]


def tables(doc: str, text: str) -> list[Table]:
    out: list[Table] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", lines[i + 1])):
            t = Table(doc, i + 1, [c.lower() for c in cells(lines[i])], [])
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                t.rows.append((i + 1, cells(lines[i])))
                i += 1
            out.append(t)
        else:
            i += 1
    return out


def code_range(cell: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+)(?:\s*[-\u2013]\s*(\d+))?", cell.strip())
    if not m:
        return None
    lo = int(m.group(1))
    return lo, int(m.group(2) or lo)


def errors_py_ranges() -> dict[tuple[int, int], str]:
    """The range table in errors.py's docstring: (lo, hi) -> meaning."""
    doc = errors.__doc__ or ""
    out = {}
    for m in re.finditer(r"^\s+(\d+(?:-\d+)?)\s{2,}(\S.*)$", doc.split("Exit code table", 1)[1],
                         re.MULTILINE):
        out[code_range(m.group(1))] = m.group(2).strip()
    assert out, "no exit code table in blockcrypt/errors.py's docstring"
    return out


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9/-]+", re.sub(r"\(.*?\)", "", text.lower())))


def subtree(cls: type) -> set[type]:
    return {c for c in CLASSES.values() if issubclass(c, cls)}


# -- exit-code checkers ----------------------------------------------------------------

def check_range_table(t: Table) -> list[str]:
    """A `codes | meaning` table against errors.py's table and class tree."""
    where = f"{t.doc}:{t.line}"
    reference = errors_py_ranges()
    problems, seen = [], set()
    for line, row in t.rows:
        rng = code_range(row[0])
        if rng is None:
            problems.append(f"{t.doc}:{line}: {row[0]!r} is not a code or range")
            continue
        seen.add(rng)
        if rng not in reference:
            problems.append(f"{t.doc}:{line}: codes {row[0]} are not a range of errors.py "
                            f"({sorted(reference)})")
            continue
        if not words(row[1]) <= words(reference[rng]):
            problems.append(f"{t.doc}:{line}: codes {row[0]} mean {reference[rng]!r} in "
                            f"errors.py, not {row[1]!r}")
        lo, hi = rng
        if lo in GENERIC_CODES:
            continue
        base = BY_CODE.get(lo, [None])[0]
        if base is None:
            problems.append(f"{t.doc}:{line}: no error class has the code {lo} that opens {row[0]}")
            continue
        inside = {c for c in CLASSES.values() if lo <= c.exit_code <= hi}
        if lo != hi and inside != subtree(base):
            problems.append(f"{t.doc}:{line}: codes {row[0]} ({row[1]}) should hold exactly "
                            f"{base.__name__} and its subclasses; they hold "
                            f"{sorted(c.__name__ for c in inside)}, and {base.__name__}'s tree "
                            f"is {sorted(c.__name__ for c in subtree(base))}")
    for c in CLASSES.values():
        if not any(lo <= c.exit_code <= hi for lo, hi in seen):
            problems.append(f"{where}: {c.__name__}'s code {c.exit_code} is in no row")
    if missing := set(reference) - seen:
        problems.append(f"{where}: ranges of errors.py missing from the table: {sorted(missing)}")
    return problems


def phrase_classes(text: str) -> set[type]:
    low = " ".join(text.lower().split())
    return {cls for phrase, cls in PHRASES.items() if phrase in low}


def check_error_table(t: Table) -> list[str]:
    """A `code | error | when` table: each named class has the row's code."""
    problems = []
    for line, row in t.rows:
        rng = code_range(row[0])
        names = [n.strip() for n in re.split(r"[,/]| and ", row[1]) if n.strip()]
        if rng is None or not names:
            problems.append(f"{t.doc}:{line}: cannot read code {row[0]!r} / error {row[1]!r}")
            continue
        lo, hi = rng
        for name in names:
            cls = CLASSES.get(name)
            if cls is None:
                problems.append(f"{t.doc}:{line}: {name} is not an error class in errors.py")
            elif not lo <= cls.exit_code <= hi:
                problems.append(f"{t.doc}:{line}: {name} exits {cls.exit_code}, "
                                f"the table says {row[0]}")
        low = " ".join(" ".join(row[1:]).lower().split())
        for phrase, cls in PHRASES.items():
            if phrase in low and not lo <= cls.exit_code <= hi:
                problems.append(f"{t.doc}:{line}: the row for {row[0]} mentions {phrase!r}, "
                                f"which is {cls.__name__} (exit {cls.exit_code})")
    return problems


def template_classes(sentence: str) -> set[type]:
    """Classes whose message template starts like a `quoted` text of the sentence."""
    out = set()
    for quoted in re.findall(r"`([^`]+)`", sentence):
        head = quoted.split("...")[0].strip().lower()
        if len(head) < 8:
            continue
        for cls in CLASSES.values():
            template = (cls.__doc__ or "").strip().splitlines()[0].lower()
            prefix = template.split("{")[0].strip()
            if template.startswith(head) or (len(prefix) >= 8 and head.startswith(prefix)):
                out.add(cls)
    return out


def named_classes(text: str) -> set[type]:
    return {CLASSES[w] for w in re.findall(r"[A-Z][A-Za-z]+", text) if w in CLASSES}


def sentences(paragraph: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", paragraph)


def paragraphs(text: str) -> list[tuple[int, str]]:
    """(first line number, text joined on spaces) of each blank-line separated block,
    table lines excluded (the table checkers read those)."""
    out, block, start = [], [], 0
    for n, line in enumerate(text.splitlines() + [""], 1):
        if not line.strip() or line.lstrip().startswith("|"):
            if block:
                out.append((start, " ".join(block)))
            block = []
        else:
            if not block:
                start = n
            block.append(line.strip())
    return out


def check_prose(doc: str, text: str) -> list[str]:
    problems = []
    for line, para in paragraphs(text):
        for sentence in sentences(para):
            for m in EXIT_MENTION.finditer(sentence):
                lo = int(m.group(1))
                hi = int(m.group(2) or lo)
                where = f"{doc}:{line}: {m.group(0)!r} in {sentence[:160]!r}"
                owners = (named_classes(sentence) or template_classes(sentence)
                          or phrase_classes(sentence) or named_classes(para))
                if lo == hi and lo in GENERIC_CODES | {1: "internal error"} and not owners:
                    continue
                if not owners:
                    problems.append(f"{where}: names no error; name the class next to the code")
                elif lo == hi:
                    if lo not in {c.exit_code for c in owners}:
                        problems.append(f"{where}: {sorted(c.__name__ for c in owners)} exit "
                                        f"{sorted({c.exit_code for c in owners})}, not {lo}")
                else:
                    for cls in owners:
                        bad = sorted(c.__name__ for c in subtree(cls)
                                     if not lo <= c.exit_code <= hi)
                        if bad:
                            problems.append(f"{where}: {bad} ({cls.__name__}'s tree) are "
                                            f"outside {lo}-{hi}")
    return problems


def check_exit_codes(doc: str, text: str) -> list[str]:
    problems = check_prose(doc, text)
    for t in tables(doc, text):
        if t.header[:1] == ["codes"] and len(t.header) >= 2:
            problems += check_range_table(t)
        elif t.header[:2] == ["code", "error"]:
            problems += check_error_table(t)
    return problems


# -- test-reference checker ------------------------------------------------------------

def defined_tests(path: Path) -> set[str]:
    """`name` of every test function and `Class::name` of every method in the file."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.ClassDef):
            out.add(node.name)
            out |= {f"{node.name}::{f.name}" for f in node.body
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return out


def check_test_references(doc: str, text: str, root: Path = REPO) -> list[str]:
    problems = []
    for line, para in paragraphs(text) + [(n, t) for n, t in enumerate(text.splitlines(), 1)
                                          if t.lstrip().startswith("|")]:
        refs: list[tuple[int, str, str | None]] = []       # (position, file, test)
        for m in TEST_REF.finditer(para):
            refs.append((m.start(), m.group(1), m.group(2)))
        for m in BARE_REF.finditer(para):
            if not para[:m.start()].endswith(".py"):
                refs.append((m.start(), "", m.group(1)))
        last_file = None
        for _pos, file, test in sorted(refs):
            if file:
                last_file = file
                if not (root / file).is_file():
                    problems.append(f"{doc}:{line}: {file} does not exist")
                    continue
            elif last_file is None:
                problems.append(f"{doc}:{line}: {test} follows no tests/...py file")
                continue
            elif not (root / last_file).is_file():
                continue                                   # reported with its file
            if test:
                name = re.sub(r"\[.*?\]", "", test[2:])
                if name not in defined_tests(root / last_file):
                    problems.append(f"{doc}:{line}: {last_file}::{name} does not exist")
        for m in TEST_DIR.finditer(para):
            if not (root / m.group(1)).is_dir():
                problems.append(f"{doc}:{line}: folder {m.group(1)} does not exist")
    return problems


# -- the docs ----------------------------------------------------------------------------

@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_exit_codes_in_docs_match_errors_py(doc):
    problems = check_exit_codes(doc.relative_to(REPO).as_posix(), doc.read_text())
    assert problems == [], "\n".join(problems)


def test_readme_has_the_exit_code_range_table():
    readme = (REPO / "README.md").read_text()
    ranges = [t for t in tables("README.md", readme) if t.header[:1] == ["codes"]]
    assert len(ranges) == 1 and check_range_table(ranges[0]) == []


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_test_references_in_docs_exist(doc):
    problems = check_test_references(doc.relative_to(REPO).as_posix(), doc.read_text())
    assert problems == [], "\n".join(problems)


def test_reliability_promises_name_tests():
    text = (REPO / "docs" / "RELIABILITY.md").read_text()
    assert len(TEST_REF.findall(text)) >= 40


# -- the checkers catch what they are for ------------------------------------------------

def test_checker_flags_a_code_that_belongs_to_another_error():
    bad = ("`audit verify` recomputes the chain and reports, with a non-zero exit code (50), "
           "a record that was edited.")
    assert len(check_exit_codes("x.md", bad)) == 1
    assert check_exit_codes("x.md", bad.replace("(50)", "(53)")) == []
    assert check_exit_codes("x.md", "It exits 22 (KeyNotFound).") == []
    assert len(check_exit_codes("x.md", "It exits 23 (KeyNotFound).")) == 1
    assert len(check_exit_codes("x.md", "Then it exits 42.")) == 1        # names no error
    quoted = "It fails with `wrong passphrase ...; nothing was changed` (exit\ncode {})."
    assert check_exit_codes("x.md", quoted.format(42)) == []
    assert len(check_exit_codes("x.md", quoted.format(41))) == 1
    assert check_exit_codes("x.md", "`errors.FormatError` (exit codes 60-69)") == []
    assert len(check_exit_codes("x.md", "`errors.FormatError` (exit codes 60-65)")) == 1


def test_checker_flags_wrong_error_table_rows():
    table = ("| code | error | when |\n|---|---|---|\n"
             "| 50 | CryptoError | stored material failed authentication{} |\n"
             "| 40-43 | PassphraseError, WrongPassphrase | passphrase problems |\n")
    assert check_exit_codes("x.md", table.format("")) == []
    assert len(check_exit_codes("x.md", table.format("; audit trail tampered with"))) == 1
    assert len(check_exit_codes("x.md", table.replace("| 50 |", "| 51 |").format(""))) == 1
    assert len(check_exit_codes("x.md", table.replace("CryptoError", "CryptError")
                                .format(""))) == 1


def test_checker_flags_wrong_range_rows():
    readme = (REPO / "README.md").read_text()
    good = next(t for t in tables("README.md", readme) if t.header[:1] == ["codes"])
    text = "| codes | meaning |\n|---|---|\n" + "".join(
        f"| {row[0]} | {row[1]} |\n" for _, row in good.rows)
    assert check_exit_codes("x.md", text) == []
    assert check_exit_codes("x.md", text.replace("| 20-29 |", "| 20-24 |")) != []
    assert check_exit_codes("x.md", text.replace("| not found", "| wrong state")) != []
    assert check_exit_codes("x.md", text.replace("| 90-99 | storage I/O |\n", "")) != []


def test_checker_flags_missing_tests(tmp_path):
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "unit" / "test_a.py").write_text(
        "def test_one():\n    pass\n\nclass TestB:\n    def test_two(self):\n        pass\n")
    ok = ("Backed by `tests/unit/test_a.py::test_one`,\n`::TestB::test_two` and "
          "`tests/unit/test_a.py` in `tests/unit/`.\n\n| a | `tests/unit/test_a.py::test_one` |\n")
    assert check_test_references("x.md", ok, tmp_path) == []
    assert len(check_test_references("x.md", ok.replace("::test_one`,", "::test_nine`,"),
                                     tmp_path)) == 1
    assert len(check_test_references("x.md", ok.replace("`::TestB", "`::TestC"),
                                     tmp_path)) == 1
    assert len(check_test_references("x.md", "`tests/test_a.py::test_one`", tmp_path)) == 1
    assert len(check_test_references("x.md", "in `tests/e2e/`", tmp_path)) == 1
