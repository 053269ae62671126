#!/usr/bin/env bash
# Side-by-side benchmark of the L7 gRPC proxies: etcd-proxy's (`etcd-proxy grpc-proxy start`), etcd's
# own (`etcd grpc-proxy start`), and no proxy at all (clients straight to etcd), in ONE run,
# interleaved, so that a noisy shared machine hurts all three alike. Same structure as
# scripts/bench-gateway.sh.
#
# Starts a 1-member etcd (temp data dir, --unsafe-no-fsync) and both proxies on free loopback ports,
# then for each round and each workload runs `etcd-proxy bench` against the three targets in a rotating
# order. For each proxy it records the CPU time the proxy process used during the run (utime+stime
# from /proc/PID/stat) and its RSS (VmRSS) after the run. Prints every run, then a table with medians
# over the rounds and the ratios ours / etcd's. Every process it starts is stopped on exit.
#
# Workloads: put; range-s (serializable range of one key: both proxies answer those from their
# caches, etcd's without seeing other writers, ours kept coherent by a watch); range-l (linearizable
# range: both forward it).
#
# Usage: scripts/bench-grpc-proxy.sh [--quick] [--rounds N] [--total N] [--conns N] [--clients N]
#                                    [--no-build] [--raw FILE]
#   --quick      short run (smoke test of the script, numbers are not worth much): 1 round, 3000 requests
#   --rounds N   rounds per workload (default 3)
#   --total N    requests per run (default 100000)
#   --conns N    HTTP/2 connections of the load generator (default 8)
#   --clients N  concurrent requests of the load generator (default 64)
#   --no-build   use the existing target/release/etcd-proxy
#   --raw FILE   also write the per-run results (TSV) to FILE
set -euo pipefail

bench_name=bench-grpc-proxy
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh" "$@"
etcd_px_port="$(free_port)"
ours_port="$(free_port)"

# Both proxies run in the temp dir: etcd's writes nothing there without --auto-tls, but its
# --data-dir default is relative.
(cd "$work" && exec "$etcd_bin/etcd" grpc-proxy start --listen-addr="127.0.0.1:$etcd_px_port" \
    --endpoints="127.0.0.1:$ep" --data-dir="$work/etcd-proxy-data") \
    >"$work/etcd-grpc-proxy.log" 2>&1 &
etcd_px_pid=$!
pids+=("$etcd_px_pid")

(cd "$work" && exec "$ours" grpc-proxy start --listen-addr="127.0.0.1:$ours_port" \
    --endpoints="127.0.0.1:$ep") \
    >"$work/etcd-proxy.log" 2>&1 &
ours_pid=$!
pids+=("$ours_pid")

wait_port etcd-grpc-proxy "$etcd_px_pid" "$etcd_px_port"
wait_port etcd-proxy "$ours_pid" "$ours_port"

declare -A port_of=([direct]="$ep" [etcd-grpc-proxy]="$etcd_px_port" [etcd-proxy]="$ours_port")
declare -A pid_of=([direct]="" [etcd-grpc-proxy]="$etcd_px_pid" [etcd-proxy]="$ours_pid")
theirs=etcd-grpc-proxy
tag=px
note="; range-s is served from both proxies' caches"
workloads=(put range-s range-l)
run_comparison
