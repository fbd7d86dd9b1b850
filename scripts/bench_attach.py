#!/usr/bin/env python3
"""Attach time under each key provider, side by side: local, pkcs11, kmip (issue 16).

    .venv/bin/python scripts/bench_attach.py [--reps 5] [--json F]
    make bench                     # runs scripts/bench.py, then this

For each provider it makes a throwaway home (``local``; ``pkcs11`` on a SoftHSM2
token made here; ``kmip`` on a PyKMIP server started here on 127.0.0.1 with a PKI
made here, as the tests do: tests/support/softhsm.py and kmip_server.py), a key
and a 16 MiB encrypted disk, then measures, median of ``--reps``:

    unwrap_ms     one decrypt_data_key of the disk's blob, in process (the provider's
                  own cost: AES-GCM in software, in the token, or a KMIP round trip)
    attach_s      `blockcrypt disk attach` as a user runs it (a new process: Python
                  start, store open, one unwrap, nbdkit, nbdfuse + loop), then detach
    decrypts      KMIP Decrypt operations the server logged per attach (must be 1)

It is separate from scripts/bench.py (the data path benchmark, worked on
elsewhere) and needs root for the attach.  Homes use the test-only weak KDF, as
bench.py does, so the local provider's figure excludes the Argon2id unlock.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ["BLOCKCRYPT_TESTONLY_WEAK_KDF"] = "1"


def cli(home: Path, pf: Path, *args: str) -> str:
    cp = subprocess.run([sys.executable, "-m", "blockcrypt", "--home", str(home),
                         "--passphrase-file", str(pf), *args], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, cwd=REPO)
    if cp.returncode:
        raise SystemExit(f"blockcrypt {' '.join(args)} failed: {cp.stderr.strip()}")
    return cp.stdout


def measure(name: str, provider_args: list[str], work: Path, reps: int, srv=None) -> dict:
    from blockcrypt.cli import read_passphrase_file
    from blockcrypt.kms.local import KeyStore
    from blockcrypt.storage import container
    from blockcrypt.storage.home import Home
    home, pf = work / f"host-{name}" / "home", work / f"host-{name}" / "pass"
    pf.parent.mkdir(parents=True)
    pf.write_bytes(b"throwaway bench passphrase\n")
    pf.chmod(0o600)
    cli(home, pf, "init")
    provider = "local"
    if provider_args:
        cli(home, pf, *provider_args)
        provider = provider_args[2]
    cli(home, pf, "key", "create", "--alias", "bench", "--provider", provider)
    disk = json.loads(cli(home, pf, "disk", "create", "vol", "--size", "16M", "--key", "bench",
                          "--json"))
    h = container.read_header(disk["path"])
    unwrap = []
    with KeyStore.open(Home(home), lambda: read_passphrase_file(str(pf))) as ks:
        ks.decrypt_data_key(h.wrapped_dk, container.key_context(h)).wipe()   # warm up
        for _ in range(reps):
            t = time.perf_counter()
            ks.decrypt_data_key(h.wrapped_dk, container.key_context(h)).wipe()
            unwrap.append((time.perf_counter() - t) * 1000)
    attach, decrypts = [], []
    for _ in range(reps):
        before = srv.decrypt_count() if srv else 0
        t = time.perf_counter()
        cli(home, pf, "disk", "attach", "vol")
        attach.append(time.perf_counter() - t)
        if srv:
            decrypts.append(srv.decrypt_count() - before)
        cli(home, pf, "disk", "detach", "vol")
    return {"provider": name, "unwrap_ms": round(statistics.median(unwrap), 3),
            "attach_s": round(statistics.median(attach), 3),
            "decrypts_per_attach": max(decrypts) if decrypts else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_attach: attaching disks needs root; run it with sudo", file=sys.stderr)
        return 1
    from support.kmip_server import start_server
    from support.softhsm import make_token
    with tempfile.TemporaryDirectory(prefix="blockcrypt-bench-attach-") as d:
        work = Path(d)
        token = make_token(work / "softhsm")
        os.environ["SOFTHSM2_CONF"] = str(token.conf)
        srv = start_server(work / "kmip")
        try:
            rows = [measure("local", [], work, args.reps),
                    measure("pkcs11", token.provider_args("hsm"), work, args.reps),
                    measure("kmip", srv.provider_args("kms", srv.client("bench-host")), work,
                            args.reps, srv)]
        finally:
            srv.stop()
    print(f"attach time per key provider (median of {args.reps}; 16 MiB disk, nbdfuse+loop)")
    print(f"{'provider':<10}{'unwrap ms':>12}{'attach s':>12}{'KMIP Decrypts/attach':>24}")
    for r in rows:
        dec = "-" if r["decrypts_per_attach"] is None else str(r["decrypts_per_attach"])
        print(f"{r['provider']:<10}{r['unwrap_ms']:>12.3f}{r['attach_s']:>12.3f}{dec:>24}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
