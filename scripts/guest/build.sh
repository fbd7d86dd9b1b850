#!/usr/bin/env bash
# Build the QEMU test guest that proves blockcrypt's main attach path: the real
# Debian nbd-client attaching a blockcrypt disk as /dev/nbd0 (the host kernel here
# has no nbd driver; see ../shared/ENVIRONMENT.md and docs/GUEST.md).
#
#   scripts/guest/build.sh          build if missing or stale, print the output dir
#   scripts/guest/build.sh --force  rebuild the initramfs even if it looks current
#
# Everything comes from Debian packages: the cloud kernel .deb (apt-get download +
# dpkg-deb -x, never installed), and busybox-static, nbd-client, e2fsprogs and
# cryptsetup-bin binaries copied from the host with the libraries ldd lists.
# Output (git-ignored), rebuilt when any input changes (this script, init, the
# kernel package, the host binaries and libraries):
#   build/guest/vmlinuz  build/guest/initrd.gz  build/guest/kernel-version  build/guest/stamp
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=scripts/guest
OUT=build/guest
DEBS=$OUT/debs
mkdir -p "$DEBS"

need() { command -v "$1" >/dev/null || { echo "guest build: '$1' missing; run: apt-get install --no-install-recommends $2" >&2; exit 1; }; }
need busybox busybox-static
need nbd-client nbd-client
need mke2fs e2fsprogs
need cryptsetup cryptsetup-bin
need dpkg-deb dpkg
need modprobe kmod
need depmod kmod

# The kernel: reuse a cached .deb, otherwise fetch the one the cloud meta-package
# points at (falling back to the newest cloud kernel apt knows).
kdeb=$(ls "$DEBS"/linux-image-6.1.0-*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -n1 || true)
kernel_package() {
  local k
  k=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9.]*-[0-9]*-cloud-amd64\)$/\1/p' | head -n1)
  [[ -n $k ]] || k=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | cut -d' ' -f1 | sort -V | tail -n1)
  echo "$k"
}
if [[ -z $kdeb ]]; then
  kpkg=$(kernel_package)
  if [[ -z $kpkg && $(id -u) -eq 0 ]]; then  # a fresh machine may have no apt lists yet
    apt-get update -qq
    kpkg=$(kernel_package)
  fi
  [[ -n $kpkg ]] || { echo "guest build: no linux-image-6.1.0-*-cloud-amd64 in apt; run apt-get update" >&2; exit 1; }
  echo "guest build: downloading $kpkg" >&2
  # apt's _apt sandbox user cannot write into build/; the warning about that is harmless.
  (cd "$DEBS" && apt-get download -q "$kpkg" 2>&1 | grep -v 'unsandboxed' >&2 || true)
  kdeb=$(ls "$DEBS"/"$kpkg"_*.deb 2>/dev/null | tail -n1 || true)
  [[ -n $kdeb ]] || { echo "guest build: apt-get download $kpkg failed" >&2; exit 1; }
fi
kver=$(basename "$kdeb" | sed 's/^linux-image-\(.*-cloud-amd64\)_.*/\1/')

# Programs for the guest (absolute host paths; copied to the same paths).
progs=(/usr/sbin/nbd-client /usr/sbin/mke2fs /usr/sbin/e2fsck "$(command -v cryptsetup)")
libs=()
for p in "${progs[@]}"; do
  while read -r lib; do libs+=("$lib"); done < <(ldd "$p" | grep -o '/[^ ]*\.so[^ ]*' | sort -u)
done
mapfile -t libs < <(printf '%s\n' "${libs[@]}" /lib64/ld-linux-x86-64.so.2 | sort -u)
busybox=$(command -v busybox)
# The guest has only the libraries of the programs above: busybox must be static.
if ldd "$busybox" >/dev/null 2>&1; then
  echo "guest build: $busybox is dynamically linked; install busybox-static" >&2
  exit 1
fi

# Contents only (not paths), so the stamp does not depend on how the script was called.
stamp_now=$( { sha256sum "$SRC/build.sh" "$SRC/init" "$kdeb" "$busybox" "${progs[@]}" /etc/mke2fs.conf;
               for l in "${libs[@]}"; do sha256sum "$(readlink -f "$l")"; done; } \
             | cut -d' ' -f1 | sha256sum | cut -c1-32)
if [[ ${1:-} != --force && -f $OUT/stamp && $(cat "$OUT/stamp") == "$stamp_now" \
      && -f $OUT/vmlinuz && -f $OUT/initrd.gz ]]; then
  echo "$OUT"
  exit 0
fi

work=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/kernel"
kmods=$work/kernel/lib/modules/$kver
depmod -b "$work/kernel" "$kver"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/sbin,usr/bin,etc,proc,sys,dev,mnt,tmp,run,lib64} "$root/lib/modules/$kver"
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
for p in "${progs[@]}" "${libs[@]}"; do
  mkdir -p "$root$(dirname "$p")"
  cp -L "$p" "$root$p"
done
ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
cp "$SRC/init" "$root/init"
chmod 0755 "$root/init"

# Modules in dependency order (no modules.dep in the guest: init insmods this list).
# -C /dev/null keeps the host's modprobe.d options out of the guest.
wanted=(qemu_fw_cfg virtio_pci virtio_net nbd dm_crypt xts ecb algif_skcipher)
: > "$root/etc/bc-modules"
for m in "${wanted[@]}"; do
  modprobe -C /dev/null -d "$work/kernel" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  rel=${ko#"$kmods"/}
  mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
  cp "$ko" "$root/lib/modules/$kver/$rel"
  echo "/lib/modules/$kver/$rel" >> "$root/etc/bc-modules"
done

(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$work/initrd.gz"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/initrd.gz" "$OUT/initrd.gz"
mv "$work/vmlinuz" "$OUT/vmlinuz"
echo "$kver" > "$OUT/kernel-version"
echo "$stamp_now" > "$OUT/stamp"
echo "$OUT"
