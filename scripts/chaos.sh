#!/usr/bin/env bash
# The chaos suite, the load benchmark and the soak, against the real widget-runtime processes
# (release builds) on private Postgres and Redis servers:
#
#   scripts/chaos.sh                       every scenario of the failure table, 10 s faults
#   scripts/chaos.sh --short               the short mode CI runs (also: cargo nextest -p widget-chaos)
#   scripts/chaos.sh --only redis-failover,core-db-hang      (see --list)
#   scripts/chaos.sh --load [1000,5000,10000] [--load-secs 60]   fixed offered write rates
#   scripts/chaos.sh --soak [30m] [--soak-rate 1000]         memory and connections over time
#   any of them with --json FILE           the same figures as JSON
#
# Prints Markdown tables; exits non-zero if a scenario fails or the invariant does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
cargo build --release -q -p widget-runtime -p widget-chaos
export WIDGET_RUNTIME_BIN="$PWD/target/release/widget-runtime"
exec target/release/widget-chaos "$@"
