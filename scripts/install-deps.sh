#!/usr/bin/env bash
# Installs every Debian package blockway needs to build, test and benchmark.
# Idempotent: installs only what is missing, so a second run costs one dpkg query.
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake ninja-build pkg-config
  libboost1.81-dev libspdlog-dev libfmt-dev libsqlite3-dev libtomlplusplus-dev
  libgtest-dev libgmock-dev libnbd-dev libiscsi-dev libnfs-dev libfuse3-dev
  nlohmann-json3-dev scdoc libgnutls28-dev
  librbd-dev librados-dev
  nbdkit-plugin-dev
)
TEST_PKGS=(
  nbdkit qemu-utils fio libnbd-bin python3 python3-libnbd jq
  tgt libiscsi-bin nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils vblade qemu-block-extra
  fuse3 iproute2 e2fsprogs util-linux sqlite3 tmux strace
  rpm prometheus python3-matplotlib gnutls-bin
  clang libclang-rt-14-dev systemd systemd-container
  ceph-mon ceph-osd ceph-mgr ceph-common
  bonnie++ postmark busybox-static qemu-system-x86 nbd-client time linux-perf
)

want=("${BUILD_PKGS[@]}")
[[ "${1:-}" == "--build-only" ]] || want+=("${TEST_PKGS[@]}")

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
