#!/usr/bin/env bash
# How stale can the range cache of `etcd-proxy grpc-proxy start` be? Starts a 1-member etcd (temp data
# dir, --unsafe-no-fsync) and the proxy on free loopback ports, then runs `etcd-proxy bench staleness`:
# N writes made directly to etcd, each followed by serializable reads of the key through the proxy
# (with no pause) until the new value shows; before each write the old value is read through the proxy
# so that it is cached. Prints the distribution of the delay from a put's answer to the first read
# through the proxy that shows it (Slowest = max; the 50% and 99% lines are p50 and p99), and the
# proxy's cache hit/miss counters. Every process it starts is stopped on exit.
#
# Usage: scripts/bench-cache-staleness.sh [--total N] [--no-build]
#   --total N    writes measured (default 500)
#   --no-build   use the existing target/release/etcd-proxy
set -euo pipefail

bench_name=bench-cache-staleness
explicit_total=0
for arg in "$@"; do
    [[ "$arg" == "--total" ]] && explicit_total=1
done
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh" "$@"
if [[ $explicit_total -eq 0 ]]; then
    total=500
fi

px_port="$(free_port)"
(cd "$work" && exec "$ours" grpc-proxy start --listen-addr="127.0.0.1:$px_port" \
    --endpoints="127.0.0.1:$ep") \
    >"$work/etcd-proxy.log" 2>&1 &
px_pid=$!
pids+=("$px_pid")
wait_port etcd-proxy "$px_pid" "$px_port"

"$ours" bench staleness --endpoints="127.0.0.1:$px_port" --write-endpoints="127.0.0.1:$ep" \
    --total="$total"
echo
curl -sf "http://127.0.0.1:$px_port/proxy/metrics" | grep '^etcd_grpc_proxy_cache_'
