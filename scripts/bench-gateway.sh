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

declare -A port_of=([direct]="$ep" [etcd-gateway]="$etcd_gw_port" [etcd-proxy]="$ours_port")
declare -A pid_of=([direct]="" [etcd-gateway]="$etcd_gw_pid" [etcd-proxy]="$ours_pid")
targets=(direct etcd-gateway etcd-proxy)
workloads=(put range-s)

workload_args() {
    case "$1" in
        put) echo "put" ;;
        range-s) echo "range --consistency=s" ;;
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
    "etcd gateway on :$etcd_gw_port (pid $etcd_gw_pid); etcd-proxy gateway on :$ours_port (pid $ours_pid)"
echo "load: --conns=$conns --clients=$clients --total=$total, $rounds round(s), CLK_TCK=$clk_tck;" \
    "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# Warm up each path once (connections, Go's heap, page cache) before anything is recorded.
for workload in "${workloads[@]}"; do
    for target in "${targets[@]}"; do
        run_one warm "$workload" "$target" "$(( total < 5000 ? total : 5000 ))"
    done
done

echo "round workload target req/s p99_ms gw_cpu_us/req gw_sys_% gw_rss_kb errors"
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
print(f"{'workload':<9} {'target':<13} {'req/s':>9} {'p99 ms':>8} {'gw CPU us/req':>14} {'gw sys %':>9} {'gw RSS MiB':>11} {'errors':>7}")
summary = {}
for (wl, target), rs in table.items():
    rps = med(r["req_per_s"] for r in rs)
    p99 = med(r["p99_ms"] for r in rs)
    cpu = med(r["cpu_us_per_req"] for r in rs)
    sys_pct = med(r["sys_pct"] for r in rs)
    rss = max((float(r["rss_kb"]) for r in rs if r["rss_kb"]), default=None)
    errors = sum(int(r["errors"]) for r in rs)
    summary[(wl, target)] = (rps, cpu)
    print(f"{wl:<9} {target:<13} {fmt(rps, '9.0f')} {fmt(p99, '8.2f')} {fmt(cpu, '14.1f')} "
          f"{fmt(sys_pct, '9.0f')} {fmt(rss and rss / 1024, '11.1f')} {errors:>7}")

print()
print("medians over rounds; gw = the gateway process only; gw sys % = share of its CPU spent in the kernel;")
print("gw RSS = the largest seen after a run")
for wl in dict.fromkeys(w for w, _ in table):
    ours, theirs = summary.get((wl, "etcd-proxy")), summary.get((wl, "etcd-gateway"))
    if not ours or not theirs:
        continue
    rps_ratio = ours[0] / theirs[0] if theirs[0] else float("nan")
    cpu_ratio = ours[1] / theirs[1] if ours[1] is not None and theirs[1] else float("nan")
    print(f"{wl}: etcd-proxy / etcd gateway: req/s x{rps_ratio:.2f}, CPU per request x{cpu_ratio:.2f}")
PY
