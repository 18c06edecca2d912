#!/usr/bin/env bash
# The Home Widget Platform on one machine, in one command:
#
#   scripts/demo.sh            # run until Ctrl-C
#   scripts/demo.sh --check    # (or DEMO_CHECK=1) set up, show the home screen, stop everything, exit 0
#
# Installs Postgres and Redis if missing (Debian/Ubuntu, apt-get), starts private instances
# with their data under .dev/ on free loopback ports (no system service is used or touched),
# builds and starts `widget-runtime dev` (migrations, outbox-worker, ingester, core API in one
# process) with examples/dev-config.yaml, starts the example product service
# (runtime/examples/deals.rs), publishes a few deals through it, and prints the home screen and
# the curl commands to try next. Ctrl-C stops everything this script started; the data in .dev/
# is kept (delete .dev/ for a fresh start). DEMO_DIR overrides where the data lives.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CHECK=${DEMO_CHECK:-0}
for arg in "$@"; do
  case "$arg" in
    --check | --once) CHECK=1 ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
exec 4>&2 # die() reports through fd 4, also from checks whose output wait_for silences
die() { printf 'demo: %s\n' "$*" >&4; exit 1; }

# --- 1. Tools ----------------------------------------------------------------------------------
pg_bindir() {
  local d
  d=$(pg_config --bindir 2>/dev/null || true)
  if [ -n "$d" ] && [ -x "$d/postgres" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/postgres" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  done
}
need=()
[ -n "$(pg_bindir)" ] || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} (apt-get)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  # The Debian packages may start system-wide services; the demo never uses them.
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust from https://rustup.rs"
PG_BIN=$(pg_bindir)
[ -n "$PG_BIN" ] || die "postgres server binaries not found after install"
PSQL="$PG_BIN/psql"
[ -x "$PSQL" ] || PSQL=psql

# --- 2. Where the private instances live -------------------------------------------------------
# initdb and postgres refuse to run as root: as root, Postgres runs as the `postgres` user.
PG_USER=""
if [ "$(id -u)" -eq 0 ]; then
  if id postgres >/dev/null 2>&1; then PG_USER=postgres; else PG_USER=nobody; fi
fi
# --pdeathsig: if this script dies without its cleanup (kill -9), its children still stop.
as_pg() {
  if [ -n "$PG_USER" ]; then
    exec setpriv --reuid="$PG_USER" --regid="$PG_USER" --init-groups --pdeathsig=TERM "$@"
  else
    exec setpriv --pdeathsig=TERM "$@"
  fi
}
STATE=${DEMO_DIR:-$ROOT/.dev}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
if [ -n "$PG_USER" ] && ! setpriv --reuid="$PG_USER" --regid="$PG_USER" --init-groups test -x "$STATE"; then
  # The repo is not reachable for the postgres user (e.g. under /root): keep the data in /tmp.
  STATE="${TMPDIR:-/tmp}/widget-demo-$(id -u)"
  mkdir -p "$STATE"
  chmod 755 "$STATE"
  echo "note: the repo is not readable by user $PG_USER; keeping the demo data in $STATE"
fi
mkdir -p "$STATE/pg" "$STATE/redis" "$STATE/logs"
[ -z "$PG_USER" ] || chown "$PG_USER:" "$STATE/pg"
PGDATA="$STATE/pg/data"

# One demo per data directory. A previous run that was killed leaves a stale pid file: ignore it.
if [ -f "$STATE/demo.pid" ]; then
  old=$(cat "$STATE/demo.pid" 2>/dev/null || true)
  if [ -n "$old" ] && [ "$old" != "$$" ] && kill -0 "$old" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q 'demo\.sh'; then
    die "another demo (pid $old) is using $STATE: stop it (Ctrl-C) first, or set DEMO_DIR"
  fi
fi
echo $$ >"$STATE/demo.pid"
# A Postgres from an earlier run still shutting down: give it a moment. A pid file whose process
# is gone (or is now something else) is stale: Postgres would refuse a reused pid, so remove it.
pg_holder() {
  local old
  old=$(head -1 "$PGDATA/postmaster.pid" 2>/dev/null || true)
  [ -n "$old" ] && kill -0 "$old" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q -- "$PGDATA" && echo "$old"
}
if [ -f "$PGDATA/postmaster.pid" ]; then
  for _ in $(seq 1 100); do [ -n "$(pg_holder)" ] || break; sleep 0.1; done
  holder=$(pg_holder || true)
  [ -z "$holder" ] || die "a Postgres (pid $holder) still serves $PGDATA; stop it first (kill -INT $holder)"
  rm -f "$PGDATA/postmaster.pid"
fi

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    if port_free "$p"; then echo "$p"; return; fi
  done
  die "no free port found"
}
PG_PORT=$(free_port)
REDIS_PORT=$(free_port)
while [ "$REDIS_PORT" = "$PG_PORT" ]; do REDIS_PORT=$(free_port); done
API_PORT=${API_PORT:-8080}
port_free "$API_PORT" || API_PORT=$(free_port)
DEALS_PORT=${DEALS_PORT:-3001}
port_free "$DEALS_PORT" || DEALS_PORT=$(free_port)

# --- 3. Stop everything we start, on Ctrl-C or any exit ----------------------------------------
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT
  trap '' INT TERM # a second Ctrl-C must not cut the clean-up short (it is bounded: 10 s a process)
  echo
  say "stopping"
  local i pid
  # Newest first, one at a time: the deals service, widget-runtime, Redis, Postgres (SIGINT is a
  # clean, fast shutdown for all four; anything still there after 10 s is killed).
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[$i]}
    kill -INT "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || continue 2; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$STATE/demo.pid"
  echo "stopped everything the demo started; data kept in $STATE (delete it for a fresh start)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # what, seconds, command...
  local what=$1 secs=$2
  shift 2
  for _ in $(seq 1 $((secs * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "$what did not come up within ${secs}s (logs in $STATE/logs)"
}
alive() { # name pid: fail fast when a component died during start-up
  kill -0 "$2" 2>/dev/null || die "$1 exited; see $STATE/logs/$1.log:
$(tail -5 "$STATE/logs/$1.log" 2>/dev/null)"
}

# --- 4. Postgres and Redis ---------------------------------------------------------------------
if [ ! -f "$PGDATA/PG_VERSION" ]; then
  say "initialising a private Postgres cluster in $PGDATA"
  rm -rf "$PGDATA"
  (as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C) \
    >"$STATE/logs/initdb.log" 2>&1 || die "initdb failed: see $STATE/logs/initdb.log"
fi
say "starting Postgres on 127.0.0.1:$PG_PORT and Redis on 127.0.0.1:$REDIS_PORT"
(as_pg "$PG_BIN/postgres" -D "$PGDATA" -p "$PG_PORT" -c listen_addresses=127.0.0.1 \
  -c unix_socket_directories="$STATE/pg") >"$STATE/logs/postgres.log" 2>&1 &
PIDS+=($!)
PG_PID=$!
# Redis keeps nothing on disk (--save ""): the cache is rebuilt from Postgres by the API's
# back-fill, which is part of what the demo shows.
setpriv --pdeathsig=TERM redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE/redis" \
  --save "" --appendonly no --daemonize no --logfile "$STATE/logs/redis.log" &
PIDS+=($!)
REDIS_PID=$!
pg_up() { alive postgres "$PG_PID"; "$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'SELECT 1'; }
wait_for "Postgres" 30 pg_up
wait_for "Redis" 15 redis-cli -p "$REDIS_PORT" ping
for db in core deals; do
  if [ -z "$("$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
    "$PSQL" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE $db"
  fi
done
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
export CORE_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/core"
export SOURCE_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/deals"

# --- 5. Build and start the platform and the product service ------------------------------------
say "building widget-runtime and the example deals service (the first build takes a few minutes)"
cargo build -p widget-runtime --bin widget-runtime --example deals
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET_DIR=${TARGET_DIR:-$ROOT/target}

say "starting widget-runtime dev (outbox-worker + ingester + core API) on 127.0.0.1:$API_PORT"
setpriv --pdeathsig=TERM "$TARGET_DIR/debug/widget-runtime" dev --config examples/dev-config.yaml \
  --listen "127.0.0.1:$API_PORT" >"$STATE/logs/widget-runtime.log" 2>&1 &
PIDS+=($!)
RUNTIME_PID=$!
say "starting the deals service on 127.0.0.1:$DEALS_PORT"
DATABASE_URL="$SOURCE_DATABASE_URL" DEALS_LISTEN="127.0.0.1:$DEALS_PORT" \
  setpriv --pdeathsig=TERM "$TARGET_DIR/debug/examples/deals" >"$STATE/logs/deals.log" 2>&1 &
PIDS+=($!)
DEALS_PID=$!
api_up() { alive widget-runtime "$RUNTIME_PID"; curl -sf "http://127.0.0.1:$API_PORT/readyz"; }
deals_up() { alive deals "$DEALS_PID"; curl -sf "http://127.0.0.1:$DEALS_PORT/deals"; }
wait_for "the core API (/readyz)" 60 api_up
wait_for "the deals service" 60 deals_up

# --- 6. Publish through the product service ------------------------------------------------------
HOME_URL="http://127.0.0.1:$API_PORT/v1/screens/home?user=42"
# The version of deals.top-picks the API serves now (0 if none): on a re-run the old widgets are
# still there, so wait for the new versions, not just for some widgets.
top_version() {
  curl -sf "$HOME_URL" | sed -n 's/.*{"key":"deals.top-picks","type":"[a-z0-9_.-]*","version":\([0-9]*\).*/\1/p'
}
before=$(top_version)
before=${before:-0}
say "publishing deals through the product service (each write enqueues its widgets in the same transaction)"
for deal in \
  '{"title":"Noise-cancelling headphones","priceCents":14999,"discountPercent":40}' \
  '{"title":"Espresso machine","priceCents":29900,"discountPercent":25}' \
  '{"title":"Running shoes","priceCents":8999,"discountPercent":50}'; do
  echo "  POST /deals $deal -> $(curl -sf -X POST "http://127.0.0.1:$DEALS_PORT/deals" \
    -H 'content-type: application/json' -d "$deal" ||
    die "the deals service refused $deal (see $STATE/logs/deals.log)")"
done
published() { v=$(top_version); [ -n "$v" ] && [ "$v" -ge $((before + 3)) ]; }
wait_for "the new widget versions on the home screen" 30 published

say "the home screen:  curl -si '$HOME_URL'"
HEADERS=$(curl -s -D - -o "$STATE/screen.json" "$HOME_URL" | tr -d '\r')
ETAG=$(printf '%s\n' "$HEADERS" | sed -n 's/^[Ee][Tt][Aa][Gg]: //p')
printf '%s\n' "$HEADERS" | grep -iE '^(HTTP/|etag|x-widget-source|content-type)'
echo
if command -v python3 >/dev/null 2>&1; then
  python3 -m json.tool <"$STATE/screen.json"
else
  cat "$STATE/screen.json"
  echo
fi
cat <<MSG

Try next (while the demo runs):
  # the screen again; with the ETag above it is 304 Not Modified, no body:
  curl -si '$HOME_URL' -H 'If-None-Match: $ETAG'
  # a product write: the deals service commits the deal and its widget events together ...
  curl -s -X POST http://127.0.0.1:$DEALS_PORT/deals -H 'content-type: application/json' \\
       -d '{"title":"Gaming mouse","priceCents":3999,"discountPercent":60}'
  # ... and within a moment the same request is a 200 with a new ETag and higher "version"s:
  curl -si '$HOME_URL' -H 'If-None-Match: $ETAG'
  # explicit keys, and an error (JSON, 400):
  curl -s 'http://127.0.0.1:$API_PORT/v1/widgets?keys=deals.top-picks,deals.hot-deal'
  curl -s 'http://127.0.0.1:$API_PORT/v1/widgets?keys=Not-A-Key'
  # the product's own data, and deleting a deal (republishes the widgets):
  curl -s http://127.0.0.1:$DEALS_PORT/deals
  curl -s -X DELETE http://127.0.0.1:$DEALS_PORT/deals/1
  # metrics (cache hits/misses, Postgres fallbacks, circuit state, outbox and ingest):
  curl -s http://127.0.0.1:$API_PORT/metrics | grep -E '^widget_api_(cache|fallback|circuit)'
  # the stores themselves:
  redis-cli -p $REDIS_PORT --scan --pattern 'hw:home:*'
  $PSQL -h 127.0.0.1 -p $PG_PORT -U postgres -d core -c 'SELECT widget_key, data_version, updated_at FROM widgets'
Logs: $STATE/logs/   API docs: docs/api.md
MSG
if [ "$CHECK" = 1 ]; then
  say "--check: the home screen shows the published widgets"
  exit 0
fi
say "running; press Ctrl-C to stop everything"
while :; do
  alive postgres "$PG_PID"
  alive redis "$REDIS_PID"
  alive widget-runtime "$RUNTIME_PID"
  alive deals "$DEALS_PID"
  sleep 1
done
