#!/usr/bin/env bash
# Start a throwaway Redis on 127.0.0.1 (a free port) and print its address (host:port) on stdout: the external store
# a Ray head with GCS fault tolerance keeps its tables in (RAY_REDIS_ADDRESS, `ray_cluster.simulated.gcs_ft_env`).
#
#   export MOEDISCO_TEST_REDIS="$(bash service/scripts/start_redis.sh)"
#   ... run the tests ...
#   bash service/scripts/start_redis.sh --stop 127.0.0.1:PORT   # stops that one, by its PID
#   bash service/scripts/start_redis.sh --stop        # stops every Redis this script started, by its PID
#
# Installs Debian's `redis-server` package when it is missing (apt-get; needs root, as on CI), without letting the
# package start its own service. The server lives in a fresh temporary folder, listens on loopback only, and keeps
# its data in memory alone (no RDB snapshots, no append-only file): it must outlive a Ray head, not itself. Logs go
# to that folder's redis.log; messages to stderr.
set -euo pipefail

STATE_FILE="${MOEDISCO_REDIS_STATE:-/tmp/moedisco-redis-servers}"
START_TIMEOUT_S=30

log() { echo "start_redis: $*" >&2; }

stop_server() {
  local root="$1" pid
  if pid=$(cat "$root/redis.pid" 2>/dev/null) && [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$root"
}

# Stop the server listening on $1 (host:port), or every one this script started; forget what was stopped.
stop_servers() {
  [ -f "$STATE_FILE" ] || exit 0
  local only="${1:-}" root kept=()
  while read -r root; do
    [ -d "$root" ] || continue
    if [ -z "$only" ] || [ "$(cat "$root/address" 2>/dev/null)" = "$only" ]; then
      stop_server "$root"
    else
      kept+=("$root")
    fi
  done < "$STATE_FILE"
  if [ "${#kept[@]}" -gt 0 ]; then printf '%s\n' "${kept[@]}" > "$STATE_FILE"; else rm -f "$STATE_FILE"; fi
}

install_redis() {
  log "installing redis-server (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's postinst starts the packaged service (on 6379, Ray's default GCS port) unless policy-rc.d says no;
  # Docker images ship one that does, a bare machine may not.
  local own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  apt-get update -qq >&2 && apt-get install -y -qq redis-server >&2 || status=$?
  [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
  return "${status:-0}"
}

if [ "${1:-}" = "--stop" ]; then
  stop_servers "${2:-}"
  exit 0
fi

command -v redis-server > /dev/null || install_redis
command -v redis-server > /dev/null || { log "redis-server is not installed and could not be"; exit 1; }

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ROOT=$(mktemp -d /tmp/moedisco-redis.XXXXXX)
chmod 700 "$ROOT"

redis-server --bind 127.0.0.1 --port "$PORT" --protected-mode yes --save '' --appendonly no \
  --dir "$ROOT" --daemonize yes --pidfile "$ROOT/redis.pid" --logfile "$ROOT/redis.log" >&2
echo "127.0.0.1:$PORT" > "$ROOT/address"
echo "$ROOT" >> "$STATE_FILE"

deadline=$((SECONDS + START_TIMEOUT_S))
until [ "$(redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = "PONG" ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "Redis did not answer within ${START_TIMEOUT_S}s"; cat "$ROOT/redis.log" >&2; exit 1
  fi
  sleep 0.1
done
log "Redis $(redis-server --version | awk '{print $3}' | cut -d= -f2) on 127.0.0.1:$PORT (pid $(cat "$ROOT/redis.pid")), in $ROOT"
echo "127.0.0.1:$PORT"
