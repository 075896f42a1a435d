#!/usr/bin/env bash
# make up / make down: supervisord with deploy/supervisord.conf, state in STATE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
action=$1
state_dir=$(mkdir -p "$2" && cd "$2" && pwd)
export BOOTFLEET_HOME=$PWD BOOTFLEET_PYTHON=$PWD/.venv/bin/python BOOTFLEET_STATE_DIR=$state_dir
pidfile=$state_dir/supervisord.pid
bootfleet=(.venv/bin/bootfleet --state-dir "$state_dir")

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case $action in
up)
  config=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
  export BOOTFLEET_CONFIG=$config
  .venv/bin/bootfleet config test "$config" >/dev/null || { .venv/bin/bootfleet config test "$config"; exit 1; }
  mkdir -p "$state_dir/log" "$state_dir/tftp"
  chmod 0700 "$state_dir"
  if [ -x deploy/install-loaders.sh ]; then bash deploy/install-loaders.sh "$state_dir/tftp" || true; fi
  if running; then
    echo "bootfleet: already running (supervisord pid $(cat "$pidfile")); applying $config"
    "${bootfleet[@]}" config apply "$config"
  else
    .venv/bin/supervisord -c deploy/supervisord.conf
    echo "bootfleet: supervisord started (pid $(cat "$pidfile" 2>/dev/null || echo '?')), config $config"
  fi
  for _ in $(seq 50); do "${bootfleet[@]}" --timeout 1 status >/dev/null 2>&1 && break; sleep 0.2; done
  # until every process has applied the running revision or failed (bounded): exit 1 naming each failure
  # on one line (`tftp[0]: cannot listen on 0.0.0.0:69: address in use (another TFTP server running?)`)
  "${bootfleet[@]}" status --wait "${BOOTFLEET_UP_WAIT:-30}"
  ;;
down)
  if running; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    echo "bootfleet: stopped (supervisord pid $pid)"
  else
    echo "bootfleet: not running"
  fi
  ;;
*) echo "usage: stack.sh up STATE_DIR CONFIG | down STATE_DIR" >&2; exit 2 ;;
esac
