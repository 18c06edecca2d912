#!/usr/bin/env bash
# The test command: every crate's tests, against private Postgres and Redis servers the tests
# start themselves. The kind e2e suite (e2e/) skips itself unless WIDGET_E2E=1 and KUBECONFIG
# point at a cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
# Examples (the product service product teams copy) must keep compiling.
cargo build --workspace --examples
cargo nextest run --workspace --no-fail-fast --profile ci "$@"
