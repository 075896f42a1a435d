#!/usr/bin/env bash
# Installs the Debian packages the tests drive (real peers and reference servers).
# Reference servers (tgt, tftpd-hpa, kea, dnsmasq; nginx for bench/http.py) must not start on install: they
# would take ports 67, 69, 3260 and 80. A policy-rc.d that exits 101 keeps them stopped.
set -euo pipefail

PACKAGES=(
  iproute2 procps psmisc curl systemd
  libiscsi-bin qemu-utils qemu-block-extra tgt open-iscsi python3-libvhdi
  isc-dhcp-client udhcpc kea-admin kea-dhcp4-server dnsmasq-base
  tftp-hpa atftp tftpd-hpa
  qemu-system-x86 ipxe-qemu ipxe
  ovmf grub-efi-amd64-bin grub-common
  syslinux extlinux syslinux-common mtools dosfstools fdisk busybox-static cpio lz4
  xorriso isolinux e2fsprogs util-linux
  nginx
  chromium chromium-driver prometheus openssl  # tests/web: a browser, a real Prometheus (its daemon kept stopped too)
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ]; then
  echo "bootfleet: the tests need these Debian packages; install them as root with:" >&2
  echo "  apt-get update && $cmd" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
had_policy=0
[ -e "$policy" ] && had_policy=1
if [ $had_policy = 0 ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
$cmd
