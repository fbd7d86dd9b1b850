#!/usr/bin/env bash
# Install what blockcrypt needs on Debian 12, skipping what is already there.
#   scripts/install-deps.sh            system packages + .venv
#   scripts/install-deps.sh --apt-only system packages only
# System packages need root; a non-root user is told the exact apt command.
set -euo pipefail
cd "$(dirname "$0")/.."

# nbdkit's Python plugin embeds /usr/bin/python3, so the venv must be built from
# that interpreter (see ../shared/ENVIRONMENT.md).
APT_PACKAGES=(
  nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd nbd-client
  fuse3 e2fsprogs python3-venv util-linux kmod rsync cryptsetup-bin
  openssl fio qemu-utils qemu-system-x86 busybox-static xfsprogs
)
APT_PACKAGES+=(${BLOCKCRYPT_EXTRA_APT:-})

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "blockcrypt: missing system packages: ${missing[*]}" >&2
    echo "Run as root:  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "Installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[[ ${1:-} == --apt-only ]] && exit 0

VENV=.venv
stamp=$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
  if [[ ! -x $VENV/bin/python ]] || [[ $(readlink -f $VENV/bin/python) != $(readlink -f /usr/bin/python3) ]]; then
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]'
  rm -f $VENV/.installed-*
  touch "$stamp"
fi
