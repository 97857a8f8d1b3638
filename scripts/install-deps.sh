#!/usr/bin/env bash
# Installs the Debian tools the test suite drives as oracles and clients (Debian 12 package names).
# Needs root (or sudo). Safe to run again.
set -euo pipefail
PKGS=(cryptsetup-bin qemu-utils nbdkit libnbd-bin fio fuse3 fuse2fs e2fsprogs argon2 xz-utils jq xxd
      nbd-client util-linux mount openssl g++ make python3 python3-libnbd python3-prometheus-client thin-provisioning-tools keyutils systemd
      ceph-mon ceph-osd ceph-common qemu-block-extra iproute2 nbd-server etcd-server gdisk)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
