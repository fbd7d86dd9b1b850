"""Names and sizes: what is accepted, and that everything else raises the right error."""
import pytest

from blockcrypt import errors, names


@pytest.mark.parametrize("name", ["a", "disk1", "my-disk_2.img", "A" * 64, "0", "a..b", "x."])
def test_valid_names(name):
    assert names.validate_name(name) == name


@pytest.mark.parametrize("name,reason", [
    ("", "empty"),
    ("a" * 65, "65 characters"),
    (".hidden", "starts with '.'"),
    (".", "starts with '.'"),
    ("..", "starts with '.'"),
    ("a/b", "'/'"),
    ("../etc", "starts with '.'"),
    ("x/..", "'/'"),
    ("nul\0byte", "'\\x00'"),
    ("new\nline", "'\\n'"),
    ("space name", "' '"),
    ("star*", "'*'"),
    ("dïsk", "'ï'"),
])
def test_invalid_names(name, reason):
    with pytest.raises(errors.InvalidName) as ei:
        names.validate_name(name, what="disk")
    assert reason in ei.value.message
    assert ei.value.exit_code == errors.InvalidName.exit_code
    assert "disk name" in ei.value.message


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096),
    ("512M", 512 * 2**20),
    ("512m", 512 * 2**20),
    ("10G", 10 * 2**30),
    ("10GiB", 10 * 2**30),
    ("1T", 2**40),
    ("3K", 3072),
    ("1E", 2**60),
    ("8E", 2**63),
    (" 2G ", 2 * 2**30),
])
def test_parse_size(text, expected):
    assert names.parse_size(text) == expected


@pytest.mark.parametrize("text,reason", [
    ("0", "larger than 0"),
    ("0G", "larger than 0"),
    ("-1", "negative"),
    ("-5G", "negative"),
    ("9E", "2^63"),
    (str(2**63 + 1), "2^63"),
    ("1.5G", "suffix"),
    ("ten", "suffix"),
    ("10 G", "suffix"),
    ("10X", "suffix"),
    ("", "suffix"),
])
def test_parse_size_refusals(text, reason):
    with pytest.raises(errors.InvalidSize) as ei:
        names.parse_size(text)
    assert reason in ei.value.message
    assert ei.value.exit_code == errors.InvalidSize.exit_code


def test_check_size_sector_multiple():
    assert names.check_size(8192, 4096) == 8192
    assert names.check_size(512, 512) == 512
    with pytest.raises(errors.InvalidSize, match="multiple of the sector size \\(4096"):
        names.check_size(4096 + 512, 4096)
    with pytest.raises(errors.InvalidSize, match="multiple of the sector size \\(512"):
        names.check_size(1000, 512)
    with pytest.raises(errors.InvalidInput, match="sector size 1024"):
        names.check_size(4096, 1024)
