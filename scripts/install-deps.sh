#!/usr/bin/env bash
# Installs the server binaries the tests and the demo start privately (idempotent).
# Nothing is started here: tests and the demo run their own instances on random ports.
set -euo pipefail

need=()
have_pg_server() {
  local bindir
  bindir=$(pg_config --bindir 2>/dev/null || true)
  [ -n "$bindir" ] && [ -x "$bindir/postgres" ] && [ -x "$bindir/initdb" ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null
}
have_pg_server || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# redis-cli builds the test clusters (redis-cli --cluster create).
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
# The Python producer example runs in a virtual environment the tests create (psycopg from PyPI).
if ! python3 -m venv --help >/dev/null 2>&1; then
  need+=(python3 python3-venv)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The Debian packages start system-wide services; the project never uses them.

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
