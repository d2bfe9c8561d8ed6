#!/usr/bin/env bash
# `make test`: the whole suite. On CI (CI=true) the job store is also tested on a throwaway PostgreSQL from
# Debian's packages on loopback; elsewhere set MOEDISCO_TEST_POSTGRES_URL (or MOEDISCO_TEST_POSTGRES=1 to start
# one the same way), otherwise those tests skip with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MOEDISCO_TEST_POSTGRES_URL:-}" ] && { [ "${CI:-}" = "true" ] || [ "${MOEDISCO_TEST_POSTGRES:-}" = "1" ]; }; then
  if MOEDISCO_TEST_POSTGRES_URL="$(bash service/scripts/start_postgres.sh)"; then
    export MOEDISCO_TEST_POSTGRES_URL
    trap 'bash service/scripts/start_postgres.sh --stop' EXIT
  else
    echo "run_tests: could not start PostgreSQL; its tests will skip" >&2
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${@:-tests}"
