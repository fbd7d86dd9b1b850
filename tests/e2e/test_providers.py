"""Key providers end to end, for every provider: disks under an imported (BYOK) key.

Attached disks keep running when the key's material goes (as in the cloud: the DK
is in nbdkit's memory); nothing attaches again until the same material is
imported again, and then the disk comes back with its data.  Runs for a local key
and for a key in a real SoftHSM2 token; a kmip provider refuses imported material.
"""
from __future__ import annotations

import json
import os
import random

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from blockcrypt import errors

from support.env import dd_read, dd_write
from support.providers import PROVIDER_NAMES

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 2**20


def import_material(env, key: str, material: bytes, provider_name: str, *extra,
                    expect: type[errors.BlockcryptError] | None = None) -> dict | None:
    oaep = "sha1" if provider_name != "local" else "sha256"   # SoftHSM 2.6: SHA-1 only
    h = hashes.SHA1 if oaep == "sha1" else hashes.SHA256
    p = env.json("key", "get-import-params", key, "--out-dir", str(env.tmp / "params"),
                 "--oaep-hash", oaep)
    pub = serialization.load_pem_public_key(open(p["public_key_file"], "rb").read())
    wrapped = env.tmp / "material.wrapped"
    wrapped.write_bytes(pub.encrypt(material, padding.OAEP(mgf=padding.MGF1(h()),
                                                          algorithm=h(), label=None)))
    argv = ("key", "import", key, "--material", str(wrapped), "--token", p["token_file"], *extra)
    if expect is not None:
        env.refused(expect, *argv)
        return None
    return env.json(*argv)


def test_attached_disk_outlives_its_imported_material_and_comes_back(env, provider_args,
                                                                      provider_name):
    args = provider_args(env.cli)
    if provider_name == PROVIDER_NAMES["kmip"]:
        # A KMIP key manager makes its keys itself; blockcrypt never imports through the host.
        msg = env.refused(errors.InvalidInput, "key", "create", "--alias", "byok", "--origin",
                          "external", *args)
        assert "does not take imported material" in msg
        assert "byok" not in [k["alias"] for k in env.json("key", "list")]
        return
    env.cli("key", "create", "--alias", "byok", "--origin", "external", *args)
    material = os.urandom(32)
    assert import_material(env, "byok", material, provider_name)["state"] == "Enabled"
    env.create("imp", "64M", "--key", "byok")
    dev = env.attach("imp")["device"]
    data = random.Random(1).randbytes(MiB)
    dd_write(dev, data, 2 * MiB)

    gone = env.json("key", "delete-imported-material", "byok")
    assert gone["state"] == "PendingImport"
    # The attached disk keeps serving, reads and writes.
    more = random.Random(2).randbytes(MiB)
    dd_write(dev, more, 6 * MiB)
    assert dd_read(dev, MiB, 2 * MiB) == data and dd_read(dev, MiB, 6 * MiB) == more
    env.detach("imp")
    msg = env.refused(errors.KeyStateError, "disk", "attach", "imp")
    assert "PendingImport" in msg and "get-import-params byok" in msg

    # Other material is refused; the same material brings the disk back with its data.
    import_material(env, "byok", os.urandom(32), provider_name,
                    expect=errors.InvalidKeyMaterial)
    assert env.json("key", "show", "byok")["state"] == "PendingImport"
    assert import_material(env, "byok", material, provider_name)["state"] == "Enabled"
    dev = env.attach("imp")["device"]
    assert dd_read(dev, MiB, 2 * MiB) == data and dd_read(dev, MiB, 6 * MiB) == more
    env.detach("imp")
    ops = [r["operation"] for r in env.json("audit", "--key", "byok")]
    assert "delete-imported-material" in ops and ops.count("import") >= 2
    assert json.loads(env.cli("key", "show", "byok", "--json").stdout)["provider"] == (
        "hsm" if provider_name != "local" else "local")
