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
# Workloads: put; range-s (serializable range of one key: etcd's proxy answers those from its cache,
# ours forwards them, so it is not like for like); range-l (linearizable range: both forward it).
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

clk_tck="$(getconf CLK_TCK)"

# CPU ticks of PID as "utime stime" (all threads). The command name, field 2, may hold spaces: cut up
# to ") ", after which utime and stime are the 12th and 13th fields.
cpu_ticks() {
    local rest
    rest="$(sed 's/^.*) //' "/proc/$1/stat")"
    awk '{ print $12, $13 }' <<<"$rest"
}

rss_kb() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

declare -A port_of=([direct]="$ep" [etcd-grpc-proxy]="$etcd_px_port" [etcd-proxy]="$ours_port")
declare -A pid_of=([direct]="" [etcd-grpc-proxy]="$etcd_px_pid" [etcd-proxy]="$ours_pid")
targets=(direct etcd-grpc-proxy etcd-proxy)
workloads=(put range-s range-l)

workload_args() {
    case "$1" in
        put) echo "put" ;;
        range-s) echo "range --consistency=s" ;;
        range-l) echo "range --consistency=l" ;;
    esac
}

results="$work/results.tsv"
printf 'round\tworkload\ttarget\treq_per_s\tp99_ms\tcpu_us_per_req\tsys_pct\trss_kb\terrors\n' >"$results"

# run_one ROUND WORKLOAD TARGET TOTAL: one bench run; appends a line to $results unless ROUND is "warm".
run_one() {
    local round="$1" workload="$2" target="$3" n="$4"
    local port="${port_of[$target]}" pid="${pid_of[$target]}"
    local u0=0 s0=0 u1=0 s1=0 rss="" json
    local -a wl
    read -r -a wl <<<"$(workload_args "$workload")"
    [[ -n "$pid" ]] && read -r u0 s0 <<<"$(cpu_ticks "$pid")"
    json="$("$ours" bench "${wl[@]}" --endpoints="127.0.0.1:$port" --conns="$conns" \
        --clients="$clients" --total="$n" --json)"
    if [[ -n "$pid" ]]; then
        read -r u1 s1 <<<"$(cpu_ticks "$pid")"
        rss="$(rss_kb "$pid")"
    fi
    [[ "$round" == warm ]] && return 0
    jq -r --arg round "$round" --arg wl "$workload" --arg target "$target" \
        --argjson utime "$((u1 - u0))" --argjson stime "$((s1 - s0))" --argjson hz "$clk_tck" \
        --arg rss "$rss" '
        ($utime + $stime) as $ticks
        | [ $round, $wl, $target,
            (.requests_per_sec | floor),
            (.latency_secs.p99 * 1000 * 100 | round / 100),
            (if $target == "direct" then "" else ($ticks * 1000000 / $hz / .succeeded * 10 | round / 10) end),
            (if $target == "direct" or $ticks == 0 then "" else ($stime * 100 / $ticks | round) end),
            $rss, .errors ] | @tsv' <<<"$json" | tee -a "$results" | tr '\t' ' ' | sed 's/^/  /'
}

echo "etcd $("$etcd_bin/etcd" --version | awk '/etcd Version/ { print $3 }') on 127.0.0.1:$ep;" \
    "etcd grpc-proxy on :$etcd_px_port (pid $etcd_px_pid); etcd-proxy grpc-proxy on :$ours_port (pid $ours_pid)"
echo "load: --conns=$conns --clients=$clients --total=$total, $rounds round(s), CLK_TCK=$clk_tck;" \
    "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# Warm up each path once (connections, Go's heap, etcd's proxy cache) before anything is recorded.
for workload in "${workloads[@]}"; do
    for target in "${targets[@]}"; do
        run_one warm "$workload" "$target" "$(( total < 5000 ? total : 5000 ))"
    done
done

echo "round workload target req/s p99_ms px_cpu_us/req px_sys_% px_rss_kb errors"
for ((round = 1; round <= rounds; round++)); do
    for workload in "${workloads[@]}"; do
        # Rotate the order each round so no target always runs first (or last) on a warming machine.
        for ((k = 0; k < ${#targets[@]}; k++)); do
            target="${targets[$(((k + round - 1) % ${#targets[@]}))]}"
            run_one "$round" "$workload" "$target" "$total"
        done
    done
done

echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ -n "$raw_out" ]]; then
    cp "$results" "$raw_out"
fi

python3 - "$results" <<'PY'
import csv, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def med(values):
    values = [float(v) for v in values if v != ""]
    return statistics.median(values) if values else None

table = {}
for r in rows:
    table.setdefault((r["workload"], r["target"]), []).append(r)

def fmt(v, spec):
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if v is None else format(v, spec)

print()
print(f"{'workload':<9} {'target':<16} {'req/s':>9} {'p99 ms':>8} {'px CPU us/req':>14} {'px sys %':>9} {'px RSS MiB':>11} {'errors':>7}")
summary = {}
for (wl, target), rs in table.items():
    rps = med(r["req_per_s"] for r in rs)
    p99 = med(r["p99_ms"] for r in rs)
    cpu = med(r["cpu_us_per_req"] for r in rs)
    sys_pct = med(r["sys_pct"] for r in rs)
    rss = max((float(r["rss_kb"]) for r in rs if r["rss_kb"]), default=None)
    errors = sum(int(r["errors"]) for r in rs)
    summary[(wl, target)] = (rps, cpu, rss)
    print(f"{wl:<9} {target:<16} {fmt(rps, '9.0f')} {fmt(p99, '8.2f')} {fmt(cpu, '14.1f')} "
          f"{fmt(sys_pct, '9.0f')} {fmt(rss and rss / 1024, '11.1f')} {errors:>7}")

print()
print("medians over rounds; px = the proxy process only; px sys % = share of its CPU spent in the kernel;")
print("px RSS = the largest seen after a run; range-s is served from etcd's proxy cache, not like for like")
def ratio(a, b):
    return a / b if a is not None and b else float("nan")
for wl in dict.fromkeys(w for w, _ in table):
    ours, theirs = summary.get((wl, "etcd-proxy")), summary.get((wl, "etcd-grpc-proxy"))
    if not ours or not theirs:
        continue
    print(f"{wl}: etcd-proxy / etcd grpc-proxy: req/s x{ratio(ours[0], theirs[0]):.2f}, "
          f"CPU per request x{ratio(ours[1], theirs[1]):.2f}, RSS x{ratio(ours[2], theirs[2]):.2f}")
PY
