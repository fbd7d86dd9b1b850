"""The key providers the provider-parametrised tests run over, and how each is added.

``provider_name`` (tests/conftest.py) gives a test ``local``, ``hsm`` (a pkcs11
provider on the session's SoftHSM2 token) or ``kms`` (a kmip provider on the
session's PyKMIP server, as client identity ``host-a``).
"""
from __future__ import annotations

PROVIDER_NAMES = {"pkcs11": "hsm", "kmip": "kms"}
"""The provider name each parametrised test gives its provider of each type."""


def provider_spec(request, name: str) -> tuple[str, dict]:
    """(type, options) of the provider ``provider_name`` names, for ``add_provider``."""
    if name == PROVIDER_NAMES["pkcs11"]:
        return "pkcs11", request.getfixturevalue("softhsm").provider_options()
    srv = request.getfixturevalue("kmip_server")
    return "kmip", srv.provider_options(srv.client("host-a"))


def provider_args(request, name: str) -> list[str]:
    """The `blockcrypt provider add` arguments of that provider."""
    if name == PROVIDER_NAMES["pkcs11"]:
        return request.getfixturevalue("softhsm").provider_args(name)
    srv = request.getfixturevalue("kmip_server")
    return srv.provider_args(name, srv.client("host-a"))


def material_objects(request, name: str, ref: bytes) -> int:
    """How many objects the provider holds for one version's stored reference (1 while
    the material exists, 0 once destroyed)."""
    if name == PROVIDER_NAMES["pkcs11"]:
        from pkcs11 import Attribute

        from blockcrypt.kms.pkcs11 import token
        from blockcrypt.kms.pkcs11.config import Pkcs11Config
        cfg = Pkcs11Config(**request.getfixturevalue("softhsm").provider_options())
        return token.call(name, cfg, "count",
                          lambda s, exc: len(list(s.get_objects({Attribute.ID: bytes(ref)}))))
    from kmip.pie.exceptions import KmipOperationFailure
    srv = request.getfixturevalue("kmip_server")
    c = srv.admin(srv.client("host-a"))
    try:
        c.get_attributes(bytes(ref).decode("ascii"), ["State"])
        return 1
    except KmipOperationFailure as e:
        assert e.reason.name == "ITEM_NOT_FOUND", e
        return 0
    finally:
        c.close()
