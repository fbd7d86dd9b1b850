#!/usr/bin/env python3
"""blockcrypt, end to end, in a temporary home: `make demo`.

Walks the whole story with the CLI, as a user would type it: a customer master
key, an encrypted disk used as a real block device, a snapshot taken while the
file system is mounted, a disk made from that snapshot, proof that the disk
file holds only ciphertext, the encryption rules refusing a conversion, the
supported migration with `disk copy`, growing a disk (`disk resize`, resize2fs),
a disk whose CMK is held in an HSM
(a SoftHSM2 token, over PKCS#11) and attached without the store passphrase,
and the audit trail.

Every step checks that what happened is what the text says; the demo exits
non-zero at the first step that does not behave as described.  Everything it
creates (mounts, attached disks, the temporary home) is removed at the end,
also on failure or Ctrl-C.  Needs root (attaching disks).  The key store uses
the production Argon2id parameters (each command that needs key material
spends a second or two deriving the key-encryption key).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from blockcrypt import errors  # noqa: E402  (exit codes of the refusals)

MiB = 1024 * 1024


class DemoFailed(Exception):
    pass


class Demo:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.home = workdir / "home"
        self.passphrase_file = workdir / "passphrase"
        self.mounts: list[Path] = []
        self.env = dict(os.environ)
        # The demo shows the real thing: never the test-only weak KDF.
        self.env.pop("BLOCKCRYPT_TESTONLY_WEAK_KDF", None)
        self.env.pop("BLOCKCRYPT_PASSPHRASE_FILE", None)
        self.env.pop("BLOCKCRYPT_HOME", None)
        self.step_no = 0
        self.marker = f"BLOCKCRYPT-DEMO-{secrets.token_hex(8)}"

    # -- presentation ------------------------------------------------------------
    def step(self, title: str, text: str) -> None:
        self.step_no += 1
        print(f"\n\033[1m== {self.step_no}. {title}\033[0m" if sys.stdout.isatty()
              else f"\n== {self.step_no}. {title}")
        print(textwrap.fill(textwrap.dedent(text).strip(), width=78))
        sys.stdout.flush()

    def show(self, text: str) -> None:
        print(textwrap.indent(text.rstrip("\n"), "   "))
        sys.stdout.flush()

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            raise DemoFailed(what)
        print(f"   ok: {what}")

    # -- running the CLI -----------------------------------------------------------
    def bc(self, *args: str, expect_exit: int = 0, quiet: bool = False,
           passphrase: bool = True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "blockcrypt", "--home", str(self.home),
                *(["--passphrase-file", str(self.passphrase_file)] if passphrase else []),
                *map(str, args)]
        shown = "blockcrypt " + shlex.join(map(str, args))
        print(f"   $ {shown}")
        cp = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=REPO)
        if not quiet:
            out = (cp.stdout + cp.stderr).strip()
            if out:
                self.show(textwrap.indent(out, "  "))
        if cp.returncode != expect_exit:
            raise DemoFailed(f"`{shown}` exited {cp.returncode}, expected {expect_exit}:\n"
                             f"{cp.stdout}{cp.stderr}")
        return cp

    def bc_json(self, *args: str, passphrase: bool = True):
        return json.loads(self.bc(*args, "--json", quiet=True, passphrase=passphrase).stdout)

    def sh(self, *argv: str) -> subprocess.CompletedProcess:
        print(f"   $ {shlex.join(argv)}")
        cp = subprocess.run(argv, capture_output=True, text=True)
        if cp.returncode != 0:
            raise DemoFailed(f"`{shlex.join(argv)}` exited {cp.returncode}: {cp.stderr.strip()}")
        return cp

    def mount(self, device: str, name: str) -> Path:
        mnt = self.workdir / f"mnt-{name}"
        mnt.mkdir(exist_ok=True)
        self.sh("mount", device, str(mnt))
        self.mounts.append(mnt)
        return mnt

    def umount(self, mnt: Path) -> None:
        self.sh("umount", str(mnt))
        self.mounts.remove(mnt)

    def disk_file(self, name: str) -> Path:
        return Path(self.bc_json("disk", "show", name)["path"])

    # -- the story ---------------------------------------------------------------------
    def run(self) -> None:
        self.passphrase_file.write_text(secrets.token_urlsafe(24) + "\n")
        self.passphrase_file.chmod(0o600)

        self.step("Create the key store", f"""
            A temporary blockcrypt home ({self.home}) holds the key store, the disk
            catalog and the disk files.  Key material is encrypted under a key derived
            from the store passphrase with Argon2id.""")
        self.bc("init")
        kdf = self.bc_json("audit")[0]["details"]["kdf"]
        self.show(f"KEK derivation: {kdf['algorithm']}, {kdf['iterations']} iterations, "
                  f"{kdf['memory_cost_kib'] // 1024} MiB, {kdf['lanes']} lanes")
        self.check(not kdf["test_only_weak"], "the store uses the production KDF parameters")

        self.step("Create a customer master key (CMK)", """
            As in a cloud KMS, a CMK never leaves the key store; it only wraps and
            unwraps the per-disk data keys.""")
        key = self.bc_json("key", "create", "--alias", "demo", "--description",
                           "blockcrypt demo key")
        self.show(f"key id {key['id']}, alias {key['alias']}, state {key['state']}")
        self.check(key["state"] == "Enabled", "the new key is Enabled")

        self.step("Create an encrypted disk", """
            The disk gets its own random 512-bit AES-XTS data key, stored in the disk
            file only wrapped by the CMK.  The file is sparse: 256 MiB that take no
            space yet.""")
        self.bc("disk", "create", "secret", "--size", "256M", "--key", "demo")
        secret_file = self.disk_file("secret")
        self.check(secret_file.stat().st_blocks * 512 < MiB, "the new disk file is sparse")

        self.step("Attach it, make a file system, mount it and write files", """
            `disk attach` unwraps the data key through the key store, hands it to an
            nbdkit server over an inherited pipe (never argv, environment or a file),
            and connects a kernel block device to it.""")
        dev = self.bc_json("disk", "attach", "secret")["device"]
        self.show(f"attached at {dev}")
        self.sh("mkfs.ext4", "-q", dev)
        mnt = self.mount(dev, "secret")
        (mnt / "notes.txt").write_text(f"{self.marker}: the launch codes are 0000\n" * 100)
        (mnt / "photos").mkdir()
        (mnt / "photos" / "holiday.raw").write_bytes(os.urandom(8 * MiB))
        self.sh("sync", "-f", str(mnt / "notes.txt"))
        manifest = _manifest(mnt)
        self.show("\n".join(f"{h[:16]}  {p}" for p, h in sorted(manifest.items())))

        self.step("Snapshot the disk while it is mounted", """
            I/O is paused through nbdkit's pause filter (in-flight writes complete
            first), the disk file is copied thin (reflink, or a sparse copy that keeps
            holes), and I/O resumes.  The snapshot holds the same ciphertext and the same
            data key, re-wrapped for the snapshot; nothing is decrypted.""")
        snap = self.bc_json("snapshot", "create", "secret", "snap1")
        self.show(f"snapshot snap1: {snap['copy_method']} copy, I/O paused: "
                  f"{snap['quiesced']}, {snap['allocated_bytes'] // MiB} MiB allocated")
        self.check(snap["quiesced"], "I/O was paused for the copy of the attached disk")
        (mnt / "after-snapshot.txt").write_text("written after the snapshot\n")
        synced = self.sh("sync", "-f", str(mnt / "after-snapshot.txt"))
        self.check(synced.returncode == 0, "the mounted file system kept working after the "
                                           "snapshot (a new file written and synced)")
        self.umount(mnt)
        self.bc("disk", "detach", "secret")

        self.step("Create a disk from the snapshot and look at its files", """
            A disk made from an encrypted snapshot is encrypted with the same data key
            under the same CMK: no key choice to make, nothing to re-encrypt.""")
        self.bc("disk", "create", "restored", "--from-snapshot", "snap1")
        restored = self.bc_json("disk", "show", "restored")
        self.check(restored["encrypted"] and restored["cmk_id"] == key["id"],
                   "the new disk is encrypted under the same CMK")
        dev = self.bc_json("disk", "attach", "restored")["device"]
        mnt = self.mount(dev, "restored")
        self.show(self.sh("ls", "-lR", str(mnt)).stdout)
        got = _manifest(mnt)
        self.check(got == manifest, "every file written before the snapshot is there, "
                                    "byte for byte")
        self.check(not (mnt / "after-snapshot.txt").exists(),
                   "the file written after the snapshot is not")

        self.step("The disk file is ciphertext", f"""
            The text files above contain the string {self.marker}.  Searching the raw
            disk files for it finds nothing: every sector is AES-256-XTS encrypted.""")
        for name in ("secret", "restored"):
            path = self.disk_file(name)
            found = _file_contains(path, self.marker.encode())
            self.show(f"grep -c {self.marker} {path}: {'found' if found else 'not found'}")
            self.check(not found, f"disk {name}'s file does not contain the plaintext")

        self.step("Conversions are refused", """
            The encryption model has firm rules: an encrypted disk or snapshot never
            becomes unencrypted (nor the reverse), a disk's CMK never changes, and
            encrypted snapshots are not exported.  Each refusal names the supported
            way: copy the files with `blockcrypt disk copy`.""")
        self.bc("disk", "create", "leak", "--from-snapshot", "snap1", "--no-encrypted",
                expect_exit=errors.ConversionRefused.exit_code)
        self.bc("snapshot", "export", "snap1", str(self.workdir / "snap1.img"),
                expect_exit=errors.ExportRefused.exit_code)
        self.check(not (self.workdir / "snap1.img").exists(), "nothing was exported")

        self.step("Migrate to an unencrypted disk with `disk copy`", """
            The supported conversion: a new unencrypted disk, and `disk copy` attaches
            both (the source read-only), mounts them, copies the files with rsync -aHAX,
            and detaches both again.""")
        self.umount(mnt)
        self.bc("disk", "detach", "restored")
        self.bc("disk", "create", "public", "--size", "256M", "--no-encrypted")
        self.bc("disk", "copy", "restored", "public")
        dev = self.bc_json("disk", "attach", "public", "--read-only")["device"]
        mnt = self.mount(dev, "public")
        self.check(_manifest(mnt) == manifest, "the unencrypted disk has the same files")
        self.umount(mnt)
        self.bc("disk", "detach", "public")
        found = _file_contains(self.disk_file("public"), self.marker.encode())
        self.check(found, "the unencrypted disk's file contains the plaintext, as it should")

        self.step("Grow a disk", """
            `disk resize` grows a disk in place (never shrinks): the file is extended
            sparsely and both header copies take the new size (an encrypted disk's data
            key is re-wrapped for it).  Then resize2fs grows the file system.""")
        self.bc("disk", "resize", "public", "--size", "384M")
        dev = self.bc_json("disk", "attach", "public")["device"]
        self.sh("e2fsck", "-fy", dev)
        grown = self.sh("resize2fs", dev)
        self.show((grown.stdout.strip() or grown.stderr.strip()).splitlines()[-1])
        mnt = self.mount(dev, "public")
        size_bytes = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
        self.check(size_bytes > 300 * MiB and _manifest(mnt) == manifest,
                   "after resize2fs the file system has grown and the files are intact")
        self.umount(mnt)
        self.bc("disk", "detach", "public")

        self.step("Crypto-shred: destroy a key, keep the proof", """
            Deleting a key is scheduled (7-30 days); when the window has passed its
            material is destroyed and the audit chain gains one record listing every
            disk and snapshot that can no longer be decrypted.  The demo moves
            blockcrypt's key clock 8 days on with a test-only setting.""")
        self.bc("key", "create", "--alias", "retired", quiet=True)
        self.bc("disk", "create", "scratch", "--size", "16M", "--key", "retired", quiet=True)
        self.bc("key", "schedule-deletion", "retired", "--pending-days", "7", "--force")
        self.env["BLOCKCRYPT_TESTONLY_CLOCK_SKEW_DAYS"] = "8"
        try:
            self.bc("key", "list", quiet=True)       # opening the store destroys due keys
        finally:
            del self.env["BLOCKCRYPT_TESTONLY_CLOCK_SKEW_DAYS"]
        report = self.bc_json("audit", "shred-report", "retired")
        self.bc("audit", "shred-report", "retired")
        names = [i["name"] for i in report["records"][0]["details"]["unrecoverable"]]
        self.check(names == ["scratch"] and report["chain"]["ok"],
                   "the shred record names the disk that can no longer be read, unedited")

        self.hsm()

        self.step("The audit trail", """
            Every key operation (create, generate, decrypt, reencrypt) and every
            management operation (disk create, attach, snapshot...; successful or
            refused) is recorded with time, key or disk, and caller, in a hash chain
            that `audit verify` checks.""")
        records = self.bc_json("audit")

        def subject(r: dict) -> str:
            objects = r.get("objects") or []
            return ", ".join(f"{o['type']} {o['name']}" for o in objects) or \
                (r["key_id"] or "-")[:8]
        self.show("\n".join(f"{r['seq']:>3} {r['time']} {r['operation']:<16} "
                            f"{r['result']:<8} {subject(r)}" for r in records))
        ops = {r["operation"] for r in records}
        self.check({"create", "generate", "decrypt", "reencrypt"} <= ops,
                   "creating, unwrapping and re-wrapping data keys were all audited")
        self.check({"disk-create", "disk-attach", "disk-detach"} <= ops,
                   "creating, attaching and detaching disks were audited too")
        self.bc("audit", "verify")
        self.bc("disk", "list")

    def hsm(self) -> None:
        self.step("A disk under a CMK held in an HSM", """
            A key provider of type pkcs11 keeps CMKs inside a token (here SoftHSM2) as
            non-extractable AES-256 keys; data keys are wrapped inside the token.  The
            token's PIN comes from a 0600 file; the store passphrase is not needed, so
            such disks can attach unattended at boot.""")
        hsm_dir = self.workdir / "softhsm"
        (hsm_dir / "tokens").mkdir(parents=True)
        conf = hsm_dir / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {hsm_dir / 'tokens'}\n"
                        "objectstore.backend = file\nlog.level = ERROR\n")
        self.env["SOFTHSM2_CONF"] = str(conf)
        pin = secrets.token_hex(8)
        pin_file = self.workdir / "hsm.pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        # A throwaway demo token: softhsm2-util takes its PINs only from argv or a tty.
        print("   $ softhsm2-util --init-token --free --label demo-hsm --so-pin ... --pin ...")
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "demo-hsm",
                        "--so-pin", secrets.token_hex(8), "--pin", pin], env=self.env,
                       check=True, capture_output=True)
        self.bc("provider", "add", "hsm", "--type", "pkcs11", "--module",
                "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "demo-hsm",
                "--pin-file", str(pin_file), passphrase=False)
        key = self.bc_json("key", "create", "--alias", "hsm-key", "--provider", "hsm",
                           passphrase=False)
        self.check(key["provider"] == "hsm" and key["state"] == "Enabled",
                   "the key was generated inside the token, without the store passphrase")
        self.bc("disk", "create", "vault", "--size", "64M", "--key", "hsm-key",
                passphrase=False)
        dev = self.bc_json("disk", "attach", "vault", passphrase=False)["device"]
        self.show(f"attached at {dev}")
        block = (self.marker.encode() * 512)[:4096]
        with open(dev, "r+b", buffering=0) as f:
            f.write(block)
            os.fsync(f.fileno())
        self.bc("disk", "detach", "vault", passphrase=False)
        dev = self.bc_json("disk", "attach", "vault", "--read-only", passphrase=False)["device"]
        with open(dev, "rb", buffering=0) as f:
            self.check(f.read(4096) == block, "the data reads back after re-attaching")
        self.bc("disk", "detach", "vault", passphrase=False)
        self.check(not _file_contains(self.disk_file("vault"), self.marker.encode()),
                   "the disk file holds only ciphertext")
        pin_file.chmod(0o644)
        self.bc("disk", "attach", "vault", passphrase=False,
                expect_exit=errors.PinFileError.exit_code)
        pin_file.chmod(0o600)
        records = [r for r in self.bc_json("audit", "--key", "hsm-key")]
        self.check(all(r["details"].get("provider") == "hsm" for r in records),
                   "every audit record of the key names its provider")

    # -- cleanup ---------------------------------------------------------------------------
    def cleanup(self) -> None:
        for mnt in reversed(self.mounts):
            subprocess.run(["umount", str(mnt)], capture_output=True)
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        self.mounts.clear()
        if (self.home / "blockcrypt.db").exists():
            argv = [sys.executable, "-m", "blockcrypt", "--home", str(self.home),
                    "--passphrase-file", str(self.passphrase_file), "disk", "list", "--json"]
            cp = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=REPO)
            if cp.returncode == 0:
                for d in json.loads(cp.stdout):
                    if d["state"] != "available":
                        subprocess.run(argv[:-3] + ["disk", "detach", d["name"]],
                                       capture_output=True, env=self.env, cwd=REPO)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _manifest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = Path(dirpath) / n
            if "lost+found" not in p.parts:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _file_contains(path: Path, needle: bytes) -> bool:
    overlap = len(needle) - 1
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            if needle in tail + chunk:
                return True
            tail = chunk[-overlap:]
    return False


def main() -> int:
    if os.geteuid() != 0:
        print("the demo attaches disks as block devices, which needs root: "
              "run `sudo make demo`", file=sys.stderr)
        return 1
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="blockcrypt-demo-"))
    os.chmod(workdir, 0o700)
    demo = Demo(workdir)
    try:
        demo.run()
    except DemoFailed as e:
        print(f"\nDEMO FAILED at step {demo.step_no}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        demo.cleanup()
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s; the temporary home "
          "and everything in it have been removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
