"""blockcrypt.system.devices: the mount and block-device queries detach relies on."""
from pathlib import Path

from blockcrypt.system import devices


def test_mountinfo_sees_root_and_unescapes(monkeypatch, tmp_path):
    assert any(mp == "/" for _, mp in devices.mountinfo())
    assert devices.is_mountpoint(Path("/"))
    assert not devices.is_mountpoint(tmp_path)
    assert devices._unescape_mount(r"/mnt/with\040space\011tab\134") == "/mnt/with space\ttab\\"


def test_device_queries_on_missing_device(tmp_path):
    assert devices.block_device_ids("/dev/blockcrypt-none") == {}
    assert devices.device_mounts("/dev/blockcrypt-none") == []
    assert devices.device_holders("/dev/blockcrypt-none") == []
    assert devices.loop_devices_backed_by(tmp_path / "nothing") == []
    assert not devices.open_exclusively_busy(str(tmp_path / "nothing"))
