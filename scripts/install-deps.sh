#!/usr/bin/env bash
# Install what blockcrypt needs on Debian 12, skipping what is already there.
#   scripts/install-deps.sh            system packages + .venv + the `blockcrypt` link
#   scripts/install-deps.sh --apt-only system packages only
# System packages need root; a non-root user is told the exact apt command.
# As root it also puts `blockcrypt` on PATH: a symlink $BLOCKCRYPT_LINK (default
# /usr/local/bin/blockcrypt) to this checkout's .venv/bin/blockcrypt.  The link is
# created or replaced only if it is absent or already points into a blockcrypt
# virtualenv (another checkout's); anything else there is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

# nbdkit's Python plugin embeds /usr/bin/python3, so the venv must be built from
# that interpreter (see ../shared/ENVIRONMENT.md).  gcc, python3-dev and libssl-dev
# build the compiled data path (blockcrypt/crypto/_datapath_src/) at `pip install`;
# valgrind checks it (make test-sanitize).  The Ceph daemons and python3-rados/rbd
# serve RBD stores and the tests' throwaway cluster (scripts/ceph-test-cluster.sh);
# qemu-block-extra gives qemu-nbd its rbd driver, the C peer in `make bench`.
APT_PACKAGES=(
  nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd nbd-client
  fuse3 e2fsprogs python3-venv util-linux kmod rsync cryptsetup-bin
  openssl fio qemu-utils qemu-system-x86 busybox-static xfsprogs
  softhsm2 systemd
  gcc python3-dev libssl-dev valgrind
  ceph-mon ceph-mgr ceph-osd ceph-common python3-rados python3-rbd qemu-block-extra
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
# The stamp covers the C sources too: an editable install compiles them once, so
# a changed extension is rebuilt by the next `make install`.
stamp=$VENV/.installed-$(cat pyproject.toml blockcrypt/crypto/_datapath_src/* | sha256sum | cut -c1-16)
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

# Put `blockcrypt` on PATH (README's Quick start types it bare).
LINK=${BLOCKCRYPT_LINK:-/usr/local/bin/blockcrypt}
TARGET=$PWD/$VENV/bin/blockcrypt
is_blockcrypt_venv_link() {   # a symlink to some venv's bin/blockcrypt (or a dangling one)
  local to
  [[ -L $1 ]] || return 1
  to=$(readlink "$1")
  [[ $to == /*/bin/blockcrypt ]] || return 1
  [[ ! -e $to ]] || [[ -f ${to%/bin/blockcrypt}/pyvenv.cfg ]]
}
if [[ $(id -u) -ne 0 ]]; then
  echo "blockcrypt: not root, so not linking $LINK; run $TARGET (or add $PWD/$VENV/bin to PATH)" >&2
elif [[ $(readlink "$LINK" 2>/dev/null) == "$TARGET" ]]; then
  :
elif [[ ! -e $LINK && ! -L $LINK ]] || is_blockcrypt_venv_link "$LINK"; then
  mkdir -p "$(dirname "$LINK")"
  ln -sfn "$TARGET" "$LINK"
  echo "blockcrypt: $LINK -> $TARGET"
else
  echo "blockcrypt: $LINK exists and is not a link to a blockcrypt virtualenv; left alone." >&2
  echo "blockcrypt: run $TARGET instead, or remove $LINK and run make install again" >&2
fi
