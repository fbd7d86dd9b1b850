"""The CLI entry point: passphrase sourcing and error -> exit code mapping."""

import pytest

from blockcrypt import errors
from blockcrypt.cli import App, read_passphrase_file

from support.cli import run_cli


def secret_file(p, data: bytes):
    """Write a passphrase file as a user must: mode 0600."""
    p.write_bytes(data)
    p.chmod(0o600)
    return p


def test_passphrase_file_strips_one_newline(tmp_path):
    p = tmp_path / "pw"
    secret_file(p, b"pass word\n")
    assert read_passphrase_file(str(p)) == b"pass word"
    secret_file(p, b"pass\n\n")
    assert read_passphrase_file(str(p)) == b"pass\n"
    secret_file(p, b"crlf\r\n")
    assert read_passphrase_file(str(p)) == b"crlf"
    secret_file(p, b"\r\n")
    with pytest.raises(errors.PassphraseFileError):
        read_passphrase_file(str(p))
    secret_file(p, b"x" * 65535 + b"\n")
    assert len(read_passphrase_file(str(p))) == 65535


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_passphrase_file_others_may_access_is_refused(tmp_path, mode):
    """Issue 12 item 3: a passphrase file group or others can read (or write) is
    refused, naming the file and the chmod to run; the CLI changes nothing."""
    p = secret_file(tmp_path / "pw", b"pass word\n")
    p.chmod(mode)
    with pytest.raises(errors.InsecureFile) as ei:
        read_passphrase_file(str(p))
    assert f"chmod 600 {p}" in ei.value.message and f"{mode:04o}" in ei.value.message
    cp = run_cli("--passphrase-file", p, "init", home=tmp_path / "h", check=False)
    assert cp.returncode == errors.InsecureFile.exit_code, cp.stderr
    assert f"run `chmod 600 {p}`".encode() in cp.stderr
    assert b"Traceback" not in cp.stderr
    assert not (tmp_path / "h" / "blockcrypt.db").exists()


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"\n", "empty"),
                                            (b"x" * 70000, "64 KiB")])
def test_passphrase_file_rejections(tmp_path, content, reason):
    p = secret_file(tmp_path / "pw", content)
    with pytest.raises(errors.PassphraseFileError) as ei:
        read_passphrase_file(str(p))
    assert reason in ei.value.message and str(p) in ei.value.message


def test_passphrase_file_missing(tmp_path):
    with pytest.raises(errors.PassphraseFileError) as ei:
        read_passphrase_file(str(tmp_path / "nope"))
    assert "nope" in ei.value.message


def test_passphrase_sources_in_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    secret_file(a, b"from-option")
    secret_file(b, b"from-env")
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


def test_passphrase_through_a_pipe_is_accepted():
    """An anonymous pipe (`--passphrase-file <(...)`) is 0600 by nature: accepted."""
    import os
    r, w = os.pipe()
    try:
        os.write(w, b"piped passphrase\n")
        os.close(w)
        assert read_passphrase_file(f"/dev/fd/{r}") == b"piped passphrase"
    finally:
        os.close(r)
