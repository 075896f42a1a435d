#!/usr/bin/env bash
# Copy the iPXE loaders Bootfleet hands out (undionly.kpxe for BIOS, ipxe.efi and snponly.efi for UEFI) from
# Debian's `ipxe` package into a TFTP root. Says which are missing and how to get them; never fails `make up`
# for a missing loader (exit 0), only for a bad argument (exit 2).
#   usage: deploy/install-loaders.sh ROOT
set -u
root="${1:-}"
if [ -z "$root" ]; then
  echo "usage: $0 TFTP_ROOT" >&2
  exit 2
fi
mkdir -p "$root"
loaders=(undionly.kpxe ipxe.efi snponly.efi)
# IPXE_DIR (for tests or a self-built iPXE) else where the package put them (dpkg -L), /usr/lib/ipxe first
search=()
if [ -n "${IPXE_DIR:-}" ]; then
  for name in "${loaders[@]}"; do search+=("$IPXE_DIR/$name"); done
else
  for name in "${loaders[@]}"; do search+=("/usr/lib/ipxe/$name"); done
  if command -v dpkg >/dev/null 2>&1 && dpkg -s ipxe >/dev/null 2>&1; then
    while IFS= read -r path; do search+=("$path"); done < <(dpkg -L ipxe 2>/dev/null)
  fi
fi
missing=()
for name in "${loaders[@]}"; do
  source=""
  for path in "${search[@]}"; do
    if [ "$(basename "$path")" = "$name" ] && [ -f "$path" ]; then source="$path"; break; fi
  done
  if [ -z "$source" ]; then
    missing+=("$name")
    continue
  fi
  if [ -f "$root/$name" ] && cmp -s "$source" "$root/$name"; then
    echo "tftp: $name is up to date in $root"
  else
    install -m 0644 "$source" "$root/$name" && echo "tftp: copied $source to $root/$name"
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tftp: MISSING loader(s): ${missing[*]} (not found in Debian's ipxe package)." >&2
  echo "tftp: PXE clients asking for them will get 'File not found'. Install them with:" >&2
  echo "tftp:     apt-get install ipxe" >&2
  echo "tftp: then run: $0 $root" >&2
fi
exit 0
