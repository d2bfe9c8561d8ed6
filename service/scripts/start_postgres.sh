#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1 (a free port) and print its SQLAlchemy URL on stdout.
#
#   export MOEDISCO_TEST_POSTGRES_URL="$(bash service/scripts/start_postgres.sh)"
#   ... run the tests ...
#   bash service/scripts/start_postgres.sh --stop        # stops every cluster this script started
#
# Installs Debian's `postgresql` package when its binaries are missing (apt-get; needs root, as on CI).
# The cluster lives in a fresh temporary folder owned by the `postgres` user (initdb refuses to run as root),
# trusts loopback connections only, and listens on no Unix socket outside that folder. Logs go to stderr.
set -euo pipefail

STATE_FILE="${MOEDISCO_PG_STATE:-/tmp/moedisco-postgres-clusters}"
DB_NAME="moedisco_test"

log() { echo "start_postgres: $*" >&2; }

as_postgres() {
  if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

stop_all() {
  [ -f "$STATE_FILE" ] || exit 0
  local bindir
  bindir=$(pg_bindir) || exit 0
  while read -r datadir; do
    [ -d "$datadir" ] || continue
    as_postgres "$bindir/pg_ctl" -D "$datadir" -m immediate stop >&2 || true
    rm -rf "$(dirname "$datadir")"
  done < "$STATE_FILE"
  rm -f "$STATE_FILE"
}

if [ "${1:-}" = "--stop" ]; then
  stop_all
  exit 0
fi

if ! pg_bindir > /dev/null; then
  log "installing postgresql (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
BINDIR=$(pg_bindir)

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ROOT=$(mktemp -d /tmp/moedisco-pg.XXXXXX)
DATADIR="$ROOT/data"
chown postgres "$ROOT" 2>/dev/null || true
chmod 700 "$ROOT"

as_postgres "$BINDIR/initdb" -D "$DATADIR" -U postgres --auth=trust --no-sync -E UTF8 > "$ROOT/initdb.log" 2>&1 \
  || { cat "$ROOT/initdb.log" >&2; exit 1; }
# fsync off: a test database need not survive a power cut, and it makes the suite much faster.
as_postgres "$BINDIR/pg_ctl" -D "$DATADIR" -l "$ROOT/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $ROOT -c fsync=off -c full_page_writes=off" start >&2 \
  || { cat "$ROOT/server.log" >&2; exit 1; }
echo "$DATADIR" >> "$STATE_FILE"

as_postgres "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB_NAME" >&2
log "PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT, data in $DATADIR"
echo "postgresql://postgres@127.0.0.1:$PORT/$DB_NAME"
