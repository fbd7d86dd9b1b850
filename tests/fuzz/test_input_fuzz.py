"""Property-based fuzzing of every parser of command-line text (issue 12, item 10).

Sizes, names, the TCP endpoint, whole-number options and the audit options get
arbitrary text (any Unicode, and valid forms with look-alike characters: digits
of other scripts, U+212A KELVIN SIGN, dotless i, superscripts, fullwidth forms,
thousands of digits).  Properties:

- a parser returns a value or raises its documented error, nothing else;
- whatever is accepted is ASCII: non-ASCII digits and units are refused;
- through the real entry point (`blockcrypt.cli.main`), no input gives a
  traceback or exit 1: every refusal is one line `error: ...` and its class's
  exit code, and nothing is written (the commands are chosen so that a
  valid number still ends in a refusal that changes nothing).

The example count comes from BLOCKCRYPT_FUZZ_EXAMPLES (default 300, for CI;
`make fuzz` runs 20000).
"""
from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockcrypt import errors, names
from blockcrypt.cli import main
from blockcrypt.cli.audit import parse_anchor, parse_since
from blockcrypt.cli.params import ASCII_INT
from blockcrypt.services.serve import parse_tcp_endpoint

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("BLOCKCRYPT_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Characters that look like, or case-fold or normalise to, what the parsers accept.
LOOKALIKES = ("\u212a\u0131\u0130\u017f\u00b2\u00b3\u00b9\u0660\u0661\u06f3\u0966\u09e7"
              "\uff11\uff2b\uff47\u2460\U0001d7ce\u1d0b\u041a\u043c\u0433")
ASCII_PIECES = "0123456789KMGTPEkmgtpeiIbB:.[]-_ "


def mixed_text() -> st.SearchStrategy[str]:
    """Arbitrary Unicode, and near-valid text salted with look-alikes."""
    near = st.text(alphabet=st.sampled_from(ASCII_PIECES + LOOKALIKES), max_size=24)
    return st.one_of(st.text(max_size=40), near,
                     st.integers(min_value=0, max_value=10**30).map(str),
                     st.builds(lambda n, s: n + s, st.integers(0, 10**25).map(str),
                               st.sampled_from(["", "K", "KiB", "M", "G", "T", "P", "E", "EiB",
                                                "\u212a", "\u212aiB", "\u0131B", "s", "m",
                                                "h", "d", "\u00b2"])))


def _refused_or_ascii(text: str, fn, error: type[errors.BlockcryptError]):
    """fn(text): the value if accepted (then the text must be ASCII), else ``error``."""
    try:
        value = fn(text)
    except error as e:
        assert e.message and "\n" not in e.message.strip()
        return None
    assert text.isascii(), f"non-ASCII {text!r} accepted as {value!r}"
    return value


@SETTINGS
@given(mixed_text())
@example("1\u212a")                      # the KeyError traceback of issue 12
@example("1\u212aiB")
@example("1\u0131B")
@example("\u0661\u0660M")
@example("9" * 5000)                     # int() refuses more than 4300 digits
@example("9223372036854775808")          # 2^63 + ... past the limit
def test_parse_size(text):
    size = _refused_or_ascii(text, names.parse_size, errors.InvalidSize)
    if size is not None:
        assert 0 < size <= names.MAX_SIZE_BYTES


@SETTINGS
@given(st.one_of(st.text(max_size=80), mixed_text()))
@example("a\u212a")
@example("\u0661")
@example("." * 3)
def test_validate_name(text):
    name = _refused_or_ascii(text, names.validate_name, errors.InvalidName)
    if name is not None:
        assert name == text and "/" not in name and not name.startswith(".")


@SETTINGS
@given(st.one_of(mixed_text(),
                 st.builds(lambda h, p: f"{h}:{p}",
                           st.sampled_from(["127.0.0.1", "[::1]", "::1", "0.0.0.0", "[::]",
                                            "\uff11\uff12\uff17.0.0.1", "localhost", ""]),
                           mixed_text())))
@example("127.0.0.1:\u0661\u0660\u0668\u0660\u0669")
@example("127.0.0.1:\u00b2")
@example("[::1]:" + "9" * 5000)
def test_parse_tcp_endpoint(text):
    ep = _refused_or_ascii(text, parse_tcp_endpoint, errors.InvalidInput)
    if ep is not None:
        assert 1 <= ep[1] <= 65535


@SETTINGS
@given(mixed_text())
@example("\u0664")
@example("-\u0661")
@example("\u00b2")
def test_whole_number_options(text):
    value = _refused_or_ascii(text, lambda t: ASCII_INT.convert(t, None, None),
                              errors.InvalidInput)
    if value is not None:
        assert isinstance(value, int) and value == int(text, 10)


@SETTINGS
@given(mixed_text())
@example("999999999999d")                # OverflowError in timedelta before
@example("\u0663d")
@example("0001-01-01T00:00:00")
def test_audit_since(text):
    _refused_or_ascii(text, parse_since, errors.InvalidInput)


@SETTINGS
@given(st.one_of(mixed_text(), st.builds(lambda s, h: f"{s}:{h}", mixed_text(),
                                         st.text("0123456789abcdef", min_size=64,
                                                 max_size=64))))
@example("\u00b2:" + "a" * 64)           # isdigit() accepted it, int() raised
def test_audit_anchor(text):
    _refused_or_ascii(text, parse_anchor, errors.InvalidInput)


# -- through the real entry point ---------------------------------------------------------

def run_main(argv: list[str]) -> tuple[int, str]:
    """blockcrypt.cli.main in this process: (exit code, stderr).  An exception other
    than SystemExit (a traceback for a user) fails the test."""
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def store_home():
    """An initialised home with one unencrypted disk 'd' (weak KDF, test only)."""
    with tempfile.TemporaryDirectory() as tmp:
        home, pf = Path(tmp) / "home", Path(tmp) / "passphrase"
        pf.write_bytes(b"fuzz passphrase\n")
        pf.chmod(0o600)
        base = ["--home", str(home), "--passphrase-file", str(pf)]
        assert run_main(base + ["init"])[0] == 0
        assert run_main(base + ["disk", "create", "d", "--size", "1M", "--no-encrypted"])[0] == 0
        yield home, base


def _snapshot(home: Path):
    conn = sqlite3.connect(home / "blockcrypt.db")
    try:
        return (conn.execute("SELECT * FROM disks").fetchall(),
                conn.execute("SELECT * FROM kms_keys").fetchall(),
                sorted(p.name for p in (home / "disks").iterdir()))
    finally:
        conn.close()


# Each command parses the fuzzed text, then (if it is a valid number) is refused for
# another reason, so the store never changes.
COMMANDS = [
    lambda x: ["disk", "create", "z", "--size", x, "--no-encrypted", "--key", "k"],
    lambda x: ["disk", "create", "z", "--size", x, "--from-snapshot", "nosuch"],
    lambda x: ["disk", "create", x, "--size", "1\u212a"],
    lambda x: ["disk", "attach", "nosuch", "--threads", x],
    lambda x: ["disk", "serve", "nosuch", "--threads", x, "--unix", "/nonexistent/s"],
    lambda x: ["disk", "serve", "nosuch", "--tcp", x],
    lambda x: ["key", "create", "--alias", ".bad", "--rotation-period-days", x],
    lambda x: ["key", "schedule-deletion", "nosuch", "--pending-days", x],
    lambda x: ["audit", "--since", x, "--key", "nosuch"],
    lambda x: ["audit", "verify", "--anchor", x],
]


@settings(max_examples=max(EXAMPLES // 3, 50), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(range(len(COMMANDS))), mixed_text().filter(lambda t: "\0" not in t))
@example(0, "1\u212a")
@example(6, "100")
@example(3, "\u0664")
@example(5, "127.0.0.1:\u0661\u0660\u0668")
@example(8, "999999999999d")
@example(9, "\u00b2:" + "a" * 64)
def test_no_input_gives_a_traceback(store_home, which, text):
    home, base = store_home
    before = _snapshot(home)
    code, err = run_main(base + COMMANDS[which](text))
    assert code not in (0, 1, None), (code, err)
    assert "Traceback" not in err, err
    if code != 2:                                      # 2: click's own usage errors
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert code in {c.exit_code for c in errors.all_error_classes()}, (code, err)
    assert _snapshot(home) == before
