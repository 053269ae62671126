#!/usr/bin/env bash
# Side-by-side benchmark of the L4 gateways: etcd-proxy's, etcd's own (`etcd gateway start`), and no
# gateway at all (clients straight to etcd), in ONE run, interleaved, so that a noisy shared machine
# hurts all three alike.
#
# Starts a 1-member etcd (temp data dir, --unsafe-no-fsync) and both gateways on free loopback ports,
# then for each round and each workload runs `etcd-proxy bench` against the three targets in a rotating
# order. For each gateway it records the CPU time the gateway process used during the run
# (utime+stime from /proc/PID/stat) and its RSS (VmRSS) after the run. Prints every run, then a table
# with medians over the rounds and the ratios ours / etcd's. Every process it starts is stopped on exit.
#
# Usage: scripts/bench-gateway.sh [--quick] [--rounds N] [--total N] [--conns N] [--clients N]
#                                 [--no-build] [--raw FILE]
#   --quick      short run (smoke test of the script, numbers are not worth much): 1 round, 3000 requests
#   --rounds N   rounds per workload (default 3)
#   --total N    requests per run (default 100000: about 5 s a run on 2 shared cores)
#   --conns N    HTTP/2 connections of the load generator (default 8)
#   --clients N  concurrent requests of the load generator (default 64)
#   --no-build   use the existing target/release/etcd-proxy
#   --raw FILE   also write the per-run results (TSV) to FILE
set -euo pipefail

bench_name=bench-gateway
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh" "$@"
etcd_gw_port="$(free_port)"
ours_port="$(free_port)"

"$etcd_bin/etcd" gateway start --listen-addr="127.0.0.1:$etcd_gw_port" --endpoints="127.0.0.1:$ep" \
    >"$work/etcd-gateway.log" 2>&1 &
etcd_gw_pid=$!
pids+=("$etcd_gw_pid")

"$ours" gateway start --listen-addr="127.0.0.1:$ours_port" --endpoints="127.0.0.1:$ep" \
    >"$work/etcd-proxy.log" 2>&1 &
ours_pid=$!
pids+=("$ours_pid")

wait_port etcd-gateway "$etcd_gw_pid" "$etcd_gw_port"
wait_port etcd-proxy "$ours_pid" "$ours_port"

declare -A port_of=([direct]="$ep" [etcd-gateway]="$etcd_gw_port" [etcd-proxy]="$ours_port")
declare -A pid_of=([direct]="" [etcd-gateway]="$etcd_gw_pid" [etcd-proxy]="$ours_pid")
theirs=etcd-gateway
tag=gw
note=""
workloads=(put range-s)
run_comparison
