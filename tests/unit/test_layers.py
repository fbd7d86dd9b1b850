"""The layers of docs/ARCHITECTURE.md, checked from the imports of every module.

A module of one layer may import only what its row below allows: dependencies
point down, the services know key management only through the provider seam
and the NBD side only through its launcher, and the key store never sees the
disk catalog.  A new import that breaks the drawing fails here first.
"""
from __future__ import annotations

import ast
from pathlib import Path

import blockcrypt

PACKAGE = Path(blockcrypt.__file__).resolve().parent

BASE = ("blockcrypt.errors", "blockcrypt.constants")

# layer -> module prefixes of blockcrypt it may import (its own layer always allowed)
ALLOWED: dict[str, tuple[str, ...]] = {
    "errors": (),
    "constants": (),
    "names": BASE,
    "testing": (),
    "system": BASE,
    "crypto": BASE + ("blockcrypt.system.libc",),
    "storage": BASE + ("blockcrypt.names", "blockcrypt.system", "blockcrypt.testing"),
    "kms": BASE + ("blockcrypt.crypto", "blockcrypt.storage.db", "blockcrypt.storage.home",
                   "blockcrypt.testing"),
    "nbd": BASE + ("blockcrypt.crypto", "blockcrypt.storage.volume", "blockcrypt.storage.header",
                   "blockcrypt.storage.rbd_volume",
                   "blockcrypt.storage.container", "blockcrypt.storage.fastcopy",
                   "blockcrypt.system.libc"),
    "services": BASE + ("blockcrypt.names", "blockcrypt.crypto.secret", "blockcrypt.kms.provider",
                        "blockcrypt.kms.audit",
                        "blockcrypt.nbd.launch", "blockcrypt.storage", "blockcrypt.system",
                        "blockcrypt.testing"),
    "cli": BASE + ("blockcrypt.names", "blockcrypt.crypto.secret", "blockcrypt.kms",
                   "blockcrypt.services", "blockcrypt.storage.catalog",
                   "blockcrypt.storage.db", "blockcrypt.storage.home"),
    "__main__": ("blockcrypt.cli",),
    "__init__": (),
}


def _module_name(path: Path) -> tuple[str, bool]:
    parts = ("blockcrypt",) + path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute name) of every blockcrypt module or name ``path`` imports."""
    module, is_package = _module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("blockcrypt"):
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("blockcrypt")]
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _allowed(layer: str, target: str) -> bool:
    if target == "blockcrypt" or _layer(target) == layer:
        return True
    return any(target == p or target.startswith(p + ".") for p in ALLOWED[layer])


def test_every_module_imports_only_what_its_layer_allows():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40
    wrong = []
    for path in modules:
        module, _ = _module_name(path)
        layer = _layer(module)
        assert layer in ALLOWED, f"{module}: a layer the drawing does not have"
        for line, target in _imports(path):
            if not _allowed(layer, target):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {layer} imports {target}")
    assert not wrong, "imports against the layering of docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_the_checker_catches_a_wrong_import():
    """The rules are not vacuous: the imports the seams exist to prevent are refused."""
    assert not _allowed("kms", "blockcrypt.storage.catalog.key_dependants")
    assert not _allowed("services", "blockcrypt.kms.local.KeyStore")
    assert not _allowed("services", "blockcrypt.nbd.backend.DiskBackend")
    assert not _allowed("storage", "blockcrypt.kms.envelope")
    assert not _allowed("crypto", "blockcrypt.storage.container")
    assert _allowed("services", "blockcrypt.kms.provider.KeyProvider")
