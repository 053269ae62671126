#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs every test
# (unit, real-etcd integration, end-to-end with etcdctl) with nextest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/install-deps.sh
export ETCD_BIN="${ETCD_BIN:-$repo/.etcd/bin}"
profile="default"
[ -n "${CI:-}" ] && profile="ci"
cargo nextest run --workspace --profile "$profile" "$@"
