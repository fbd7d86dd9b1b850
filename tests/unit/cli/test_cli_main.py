"""The CLI entry point: passphrase sourcing and error -> exit code mapping."""

import pytest

from blockcrypt import errors
from blockcrypt.cli import App, read_passphrase_file

from support.cli import run_cli


def test_passphrase_file_strips_one_newline(tmp_path):
    p = tmp_path / "pw"
    p.write_bytes(b"pass word\n")
    assert read_passphrase_file(str(p)) == b"pass word"
    p.write_bytes(b"pass\n\n")
    assert read_passphrase_file(str(p)) == b"pass\n"
    p.write_bytes(b"crlf\r\n")
    assert read_passphrase_file(str(p)) == b"crlf"


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"\n", "empty"),
                                            (b"x" * 70000, "64 KiB")])
def test_passphrase_file_rejections(tmp_path, content, reason):
    p = tmp_path / "pw"
    p.write_bytes(content)
    with pytest.raises(errors.PassphraseFileError) as ei:
        read_passphrase_file(str(p))
    assert reason in ei.value.message and str(p) in ei.value.message


def test_passphrase_file_missing(tmp_path):
    with pytest.raises(errors.PassphraseFileError) as ei:
        read_passphrase_file(str(tmp_path / "nope"))
    assert "nope" in ei.value.message


def test_passphrase_sources_in_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"from-option")
    b.write_bytes(b"from-env")
    monkeypatch.setenv("BLOCKCRYPT_PASSPHRASE_FILE", str(b))
    assert App(tmp_path, str(a)).passphrase() == b"from-option"
    assert App(tmp_path, None).passphrase() == b"from-env"
    monkeypatch.delenv("BLOCKCRYPT_PASSPHRASE_FILE")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(errors.PassphraseRequired):
        App(tmp_path, None).passphrase()


def test_help_works():
    cp = run_cli("--help")
    assert b"disk" in cp.stdout and b"key" in cp.stdout


def test_unreadable_passphrase_file_exit_code(tmp_path):
    cp = run_cli("--passphrase-file", tmp_path / "missing", "init", home=tmp_path / "h",
                 check=False)
    assert cp.returncode == errors.PassphraseFileError.exit_code, cp.stderr
    assert cp.stderr.decode().startswith("error: cannot read passphrase file")
    assert not (tmp_path / "h" / "blockcrypt.db").exists()
