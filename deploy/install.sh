#!/usr/bin/env bash
# make install / make uninstall: Bootfleet as a systemd service.
#   install:   the tracked files of this checkout -> $DESTDIR/opt/bootfleet (with its own virtual environment),
#              deploy/bootfleet.yaml -> $DESTDIR/etc/bootfleet/bootfleet.yaml (kept if present),
#              deploy/bootfleet.service -> $DESTDIR/etc/systemd/system/bootfleet.service,
#              state in /var/lib/bootfleet (systemd creates it: StateDirectory=).
#   uninstall: removes the unit and /opt/bootfleet; keeps /etc/bootfleet and /var/lib/bootfleet (leases, images,
#              events: remove them by hand if you mean it) unless PURGE=1.
# DESTDIR stages the files under another root (packaging, tests); systemctl is called only without DESTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
dest=${DESTDIR:-}
prefix=$dest/opt/bootfleet
unit=$dest/etc/systemd/system/bootfleet.service
python=${PYTHON:-python3}
have_systemd() { [ -z "$dest" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if [ -z "$dest" ] && [ "$(id -u)" != 0 ]; then
  echo "bootfleet: make $action needs root (or DESTDIR=... to stage the files)" >&2
  exit 1
fi
case $action in
install)
  mkdir -p "$prefix" "$dest/etc/bootfleet" "$(dirname "$unit")" "$dest/var/lib/bootfleet"
  chmod 0700 "$dest/var/lib/bootfleet"
  # the checkout's tracked files only: no venv, no state, no caches
  git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$prefix"
  "$python" -m venv "$prefix/.venv"
  "$prefix/.venv/bin/pip" install -q "$prefix"
  rm -rf "$prefix/build" "$prefix"/*.egg-info
  [ -f "$dest/etc/bootfleet/bootfleet.yaml" ] || install -m 0644 deploy/bootfleet.yaml "$dest/etc/bootfleet/bootfleet.yaml"
  install -m 0644 deploy/bootfleet.service "$unit"
  if have_systemd; then
    systemctl daemon-reload
    echo "bootfleet: installed; start it with: systemctl enable --now bootfleet"
  else
    echo "bootfleet: installed under ${dest:-/}; systemd is not running here, so nothing was started"
  fi
  ;;
uninstall)
  if have_systemd && systemctl is-active --quiet bootfleet; then systemctl disable --now bootfleet; fi
  rm -f "$unit"
  rm -rf "$prefix"
  if [ "${PURGE:-0}" = 1 ]; then rm -rf "$dest/etc/bootfleet" "$dest/var/lib/bootfleet"; fi
  if have_systemd; then systemctl daemon-reload; fi
  echo "bootfleet: uninstalled$([ "${PURGE:-0}" = 1 ] || echo "; kept ${dest}/etc/bootfleet and ${dest}/var/lib/bootfleet (PURGE=1 removes them)")"
  ;;
*) echo "usage: install.sh install|uninstall" >&2; exit 2 ;;
esac
