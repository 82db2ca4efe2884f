#!/usr/bin/env bash
# `make run`: a local Mosquitto from mosquitto/dev.conf (unless MQTT_BACKUP_BROKER points elsewhere),
# then the bridge in the foreground. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=1883

ensure_mosquitto() {
  if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then return; fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "mqtt-backup: mosquitto is not installed. Run: sudo apt-get install -y mosquitto mosquitto-clients" >&2
    exit 2
  fi
  echo "Installing mosquitto with apt-get..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  # The package starts a system broker on 1883; this project runs its own, configured one.
  if command -v systemctl >/dev/null; then systemctl stop mosquitto 2>/dev/null || true; fi
  pkill -x mosquitto 2>/dev/null || true
  sleep 0.5
}

port_in_use() {
  .venv/bin/python -c "import sys; from tools.devbroker import port_open; sys.exit(0 if port_open($PORT) else 1)"
}

broker_pid=""
cleanup() {
  if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
    kill -TERM "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if [ -z "${MQTT_BACKUP_BROKER:-}" ]; then
  ensure_mosquitto
  if port_in_use; then
    # A second `make run` in the same checkout lands here too: its bridge would find the data
    # directory locked by the first, so the hint names the data directory as well.
    echo "mqtt-backup: port $PORT is already taken (another broker, or a make run already running?). Try: to back up that broker, MQTT_BACKUP_BROKER=mqtt://127.0.0.1:$PORT make run (beside a bridge that runs, with its own MQTT_BACKUP_DATA=DIR)" >&2
    exit 2
  fi
  mkdir -p .run/mosquitto
  .venv/bin/python -m tools.devbroker render --conf dev.conf --port "$PORT" --state-dir .run/mosquitto > .run/mosquitto.conf
  mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  # Its own session: Ctrl-C reaches the bridge only, which then stores, acks and disconnects
  # before the trap below stops the broker. The sed that prefixes its log is in our group, so it
  # ignores Ctrl-C: it ends when the broker closes its stderr, after the broker's last lines.
  setsid "$mosquitto_bin" -c .run/mosquitto.conf \
    2> >(trap '' INT; exec sed -u 's/^/[mosquitto] /' >&2) &
  broker_pid=$!
  for _ in $(seq 100); do port_in_use && break; sleep 0.05; done
  port_in_use || { echo "mqtt-backup: mosquitto did not start; see the lines above" >&2; exit 3; }
  echo "Mosquitto listening on 127.0.0.1:$PORT (config .run/mosquitto.conf)" >&2
fi

# Not exec: the trap must stop the broker after the bridge has flushed and disconnected.
.venv/bin/mqtt-backup run "$@" &
bridge_pid=$!
trap 'kill -TERM $bridge_pid 2>/dev/null || true' INT TERM
# A trapped Ctrl-C or TERM cuts a `wait` short (status 130 or 143) while the bridge is still
# stopping: wait again until it is gone, then once more for its own status (bash keeps it).
while kill -0 "$bridge_pid" 2>/dev/null; do wait "$bridge_pid" || true; done
rc=0
wait "$bridge_pid" || rc=$?
exit "$rc"
