#!/usr/bin/env bash
# What watch coalescing saves, side by side in ONE run: N watchers of one key receiving E events,
# straight on etcd ("direct", the baseline), through etcd's own proxy (`etcd grpc-proxy start`) and
# through ours (`etcd-proxy grpc-proxy start`), all in front of the same 1-member etcd (temp data
# dir, --unsafe-no-fsync), with the same client (`etcd-proxy bench watch`).
#
# Each run opens --watchers watchers of one key over --streams Watch streams (over --conns
# connections), waits until all are created, writes --events puts straight to etcd and waits until
# every watcher has every event, checking that each sees each event exactly once, in order
# (`bench watch` reports missing, repeated or reordered events as errors; a run with errors is
# flagged). Per run it records:
#   - etcd's `etcd_debugging_mvcc_watcher_total` (its /metrics) before the watchers, once they are
#     all created, and after the events (before they close): the upstream watchers the target costs
#     etcd (created minus before);
#   - deliveries per second and the latency from each put's answer to each delivery (p50, p99);
#   - the CPU time (utime+stime, /proc/PID/stat) of the proxy during the event phase (read by
#     `bench watch --cpu-pid`), per delivery, and of etcd over the whole run;
#   - the proxy's peak RSS (VmHWM) and its RSS after the run (VmRSS).
# Each proxy run uses a FRESH proxy process, started before the run and stopped after it, so that
# RSS and watcher counts belong to that run alone. Targets run in a rotating order each round.
# Prints every run, then medians over rounds and the ratios ours / etcd's. Every process it starts
# is stopped on exit.
#
# Usage: scripts/bench-watch.sh [--quick] [--rounds N] [--watchers N] [--streams N] [--events N]
#                               [--val-size N] [--put-rate R] [--conns N] [--clients N] [--timeout S]
#                               [--no-build] [--raw FILE]
#   --quick      smoke test of the script (numbers not worth quoting): 1 round, 200 watchers, 20 events
#   --rounds N   rounds (default 3)
#   --watchers N watchers per run (default 2000)
#   --streams N  Watch streams they are spread over (default 20)
#   --events N   puts per run (default 200)
#   --val-size N bytes per value (default 100)
#   --put-rate R puts a second at most (default 0: as fast as etcd answers them, a burst)
#   --conns N    HTTP/2 connections the streams are spread over (default 4)
#   --clients N  puts in flight (default 1: one at a time)
#   --timeout S  seconds a run may wait for creates, and for the last delivery (default 30)
#   --no-build   use the existing target/release/etcd-proxy
#   --raw FILE   also write the per-run results (TSV) to FILE
set -euo pipefail

bench_name=bench-watch
watchers=2000
streams=20
events=200
val_size=100
timeout_s=30
put_rate=0
quick=0
set_conns=0
set_clients=0
common_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --watchers) watchers="$2"; shift ;;
        --streams) streams="$2"; shift ;;
        --events) events="$2"; shift ;;
        --val-size) val_size="$2"; shift ;;
        --timeout) timeout_s="$2"; shift ;;
        --put-rate) put_rate="$2"; shift ;;
        --total) echo "$bench_name: --total does not apply: use --watchers and --events" >&2; exit 2 ;;
        *)
            case "$1" in
                --quick) quick=1 ;;
                --conns) set_conns=1 ;;
                --clients) set_clients=1 ;;
            esac
            common_args+=("$1")
            ;;
    esac
    shift
done
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh" ${common_args[@]+"${common_args[@]}"}
[[ $set_conns -eq 1 ]] || conns=4
[[ $set_clients -eq 1 ]] || clients=1
if [[ $quick -eq 1 ]]; then
    watchers=200
    events=20
    streams=$(( streams < watchers ? streams : watchers ))
fi
metrics_url="http://127.0.0.1:$ep/metrics"
clk_tck="$(getconf CLK_TCK)"

# Peak RSS of PID (VmHWM), in kB.
hwm_kb() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

# etcd's watcher count.
etcd_watchers() {
    curl -sf --max-time 5 "$metrics_url" | awk '$1 == "etcd_debugging_mvcc_watcher_total" { print $2 }'
}

# stop_proc PID: stops a process this script started, waits for it, and forgets it (so that the
# exit trap never signals a PID that may have been reused since).
stop_proc() {
    local pid="$1" p kept=()
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${pids[@]}"; do
        [[ "$p" == "$pid" ]] || kept+=("$p")
    done
    pids=(${kept[@]+"${kept[@]}"})
}

# start_proxy TARGET: starts a fresh proxy of TARGET on a free port; sets px_pid and px_port.
start_proxy() {
    px_port="$(free_port)"
    case "$1" in
        etcd-grpc-proxy)
            # etcd's proxy runs in the temp dir: its --data-dir default is relative.
            (cd "$work" && exec "$etcd_bin/etcd" grpc-proxy start \
                --listen-addr="127.0.0.1:$px_port" --endpoints="127.0.0.1:$ep" \
                --data-dir="$work/etcd-proxy-data") >"$work/$1.log" 2>&1 &
            ;;
        etcd-proxy)
            (cd "$work" && exec "$ours" grpc-proxy start --listen-addr="127.0.0.1:$px_port" \
                --endpoints="127.0.0.1:$ep") >"$work/$1.log" 2>&1 &
            ;;
    esac
    px_pid=$!
    pids+=("$px_pid")
    wait_port "$1" "$px_pid" "$px_port"
}

# Waits (at most 10 s) until etcd holds no more watchers than when the script started, so that a
# stopped proxy's watchers are gone before the next run counts its own.
wait_watchers_idle() {
    local i n
    for ((i = 0; i < 100; i++)); do
        n="$(etcd_watchers)"
        if [[ -n "$n" && "${n%.*}" -le "$idle_watchers" ]]; then
            return 0
        fi
        sleep 0.1
    done
    echo "  (etcd still holds $n watchers, $idle_watchers when idle)" >&2
}

results="$work/results.tsv"
printf 'round\ttarget\tetcd_watchers_held\tetcd_watchers_after\tdeliv_per_s\tp50_ms\tp99_ms\tpx_cpu_us_per_deliv\tpx_cpu_ms_run\tetcd_cpu_ms_run\tpx_rss_peak_kb\tpx_rss_after_kb\tdeliveries\tmissing\terrors\tevents_per_response\tclient_cpu_us_per_deliv\tlog_fell_behind\n' >"$results"

# run_one ROUND TARGET: one `bench watch` run; appends a line to $results unless ROUND is "warm".
run_one() {
    local round="$1" target="$2" port pid="" cpu_pid json
    local pu0=0 ps0=0 pu1=0 ps1=0 eu0 es0 eu1 es1 hwm="" rss="" behind=""
    wait_watchers_idle
    if [[ "$target" == direct ]]; then
        port="$ep"
        cpu_pid="$etcd_pid"
    else
        start_proxy "$target"
        port="$px_port"
        pid="$px_pid"
        cpu_pid="$pid"
        read -r pu0 ps0 <<<"$(cpu_ticks "$pid")"
    fi
    read -r eu0 es0 <<<"$(cpu_ticks "$etcd_pid")"
    if ! json="$("$ours" bench watch --endpoints="127.0.0.1:$port" --put-endpoint="127.0.0.1:$ep" \
        --watchers="$watchers" --streams="$streams" --conns="$conns" --events="$events" \
        --clients="$clients" --val-size="$val_size" --put-rate="$put_rate" --timeout="$timeout_s" \
        --metrics-url="$metrics_url" --cpu-pid="$cpu_pid" --json 2>"$work/bench.err")"; then
        json=""
    fi
    read -r eu1 es1 <<<"$(cpu_ticks "$etcd_pid")"
    if [[ -n "$pid" ]]; then
        read -r pu1 ps1 <<<"$(cpu_ticks "$pid")"
        hwm="$(hwm_kb "$pid")"
        rss="$(rss_kb "$pid")"
        if [[ "$target" == etcd-proxy ]]; then
            behind="$(grep -c 'fell behind' "$work/$target.log" || true)"
        fi
        cp "$work/$target.log" "$work/$target.round-$round.log"
        stop_proc "$pid"
    fi
    [[ "$round" == warm ]] && return 0
    if [[ -z "$json" ]]; then
        printf '%s\t%s\tFAILED: %s\n' "$round" "$target" "$(tr '\n' ' ' <"$work/bench.err")" \
            | tee -a "$results" | tr '\t' ' ' | sed 's/^/  /'
        return 0
    fi
    jq -r --arg round "$round" --arg target "$target" --argjson hz "$clk_tck" \
        --argjson pticks "$((pu1 - pu0 + ps1 - ps0))" --argjson eticks "$((eu1 - eu0 + es1 - es0))" \
        --arg hwm "$hwm" --arg rss "$rss" --arg behind "$behind" '
        .watch as $w
        | (if $w.cpu_ticks_events then ($w.cpu_ticks_events[0] + $w.cpu_ticks_events[1]) else null end) as $ev
        | (if $w.client_cpu_ticks_events then ($w.client_cpu_ticks_events[0] + $w.client_cpu_ticks_events[1]) else null end) as $cl
        | [ $round, $target,
            (if $w.etcd_watchers_created != null and $w.etcd_watchers_before != null
             then $w.etcd_watchers_created - $w.etcd_watchers_before else "" end),
            (if $w.etcd_watchers_after != null and $w.etcd_watchers_before != null
             then $w.etcd_watchers_after - $w.etcd_watchers_before else "" end),
            ($w.deliveries_per_sec | floor),
            (.latency_secs.p50 * 1000 * 100 | round / 100),
            (.latency_secs.p99 * 1000 * 100 | round / 100),
            (if $target == "direct" or $ev == null or $w.deliveries == 0 then ""
             else ($ev * 1000000 / $hz / $w.deliveries * 100 | round / 100) end),
            (if $target == "direct" then "" else ($pticks * 1000 / $hz) end),
            ($eticks * 1000 / $hz),
            $hwm, $rss, $w.deliveries, $w.missing, .errors,
            (if $w.event_responses > 0 then ($w.deliveries / $w.event_responses * 100 | round / 100) else "" end),
            (if $cl == null or $w.deliveries == 0 then "" else ($cl * 1000000 / $hz / $w.deliveries * 100 | round / 100) end),
            $behind ] | @tsv' <<<"$json" \
        | tee -a "$results" | tr '\t' ' ' | sed 's/^/  /'
    # A run with errors says which, under its line.
    jq -r '.error_distribution | to_entries[] | "      ERROR [\(.value)] \(.key)"' <<<"$json"
}

idle_watchers="$(etcd_watchers)"
idle_watchers="${idle_watchers%.*}"
echo "etcd $("$etcd_bin/etcd" --version | awk '/etcd Version/ { print $3 }') on 127.0.0.1:$ep (pid $etcd_pid), $idle_watchers watchers when idle;" \
    "a fresh proxy process per run"
echo "load: --watchers=$watchers --streams=$streams --conns=$conns --events=$events --clients=$clients" \
    "--val-size=$val_size --put-rate=$put_rate, $rounds round(s), CLK_TCK=$clk_tck; $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# Warm etcd up (its watch machinery, the key's first revisions) before anything is recorded.
run_one warm direct

targets=(direct etcd-grpc-proxy etcd-proxy)
echo "round target etcd_watchers_held etcd_watchers_after deliv/s p50_ms p99_ms px_cpu_us/deliv px_cpu_ms_run etcd_cpu_ms_run px_rss_peak_kb px_rss_after_kb deliveries missing errors events/response client_cpu_us/deliv log_fell_behind"
for ((round = 1; round <= rounds; round++)); do
    # Rotate the order each round so no target always runs first (or last) on a drifting machine.
    for ((k = 0; k < ${#targets[@]}; k++)); do
        run_one "$round" "${targets[$(((k + round - 1) % ${#targets[@]}))]}"
    done
done

echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ -n "$raw_out" ]]; then
    cp "$results" "$raw_out"
fi

python3 - "$results" "$watchers" "$events" <<'PY'
import csv, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
watchers, events = int(sys.argv[2]), int(sys.argv[3])
failed = [r for r in rows if (r["etcd_watchers_held"] or "").startswith("FAILED")]
rows = [r for r in rows if r not in failed]

def med(rs, k):
    values = [float(r[k]) for r in rs if r.get(k) not in (None, "")]
    return statistics.median(values) if values else None

def fmt(v, spec):
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if v is None else format(v, spec)

names = {"direct": "direct (no proxy)", "etcd-grpc-proxy": "etcd grpc-proxy", "etcd-proxy": "etcd-proxy grpc-proxy"}
print()
print(f"{'target':<22} {'etcd watchers':>13} {'after events':>12} {'deliv/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
      f"{'px CPU us/deliv':>15} {'etcd CPU ms':>11} {'px peak RSS MiB':>15} {'ev/resp':>7} {'client us/deliv':>15} {'errors':>7} {'clean runs':>10}")
summary = {}
for target in ("direct", "etcd-grpc-proxy", "etcd-proxy"):
    every = [r for r in rows if r["target"] == target]
    if not every:
        continue
    # A run with errors is not a valid measurement: medians are over the clean runs (all runs if
    # none was clean, and then the errors column says so).
    rs = [r for r in every if int(r["errors"]) == 0] or every
    s = {k: med(rs, k) for k in ("etcd_watchers_held", "etcd_watchers_after", "deliv_per_s", "p50_ms",
                                 "p99_ms", "px_cpu_us_per_deliv", "etcd_cpu_ms_run", "events_per_response",
                                 "client_cpu_us_per_deliv")}
    s["rss"] = max((float(r["px_rss_peak_kb"]) for r in rs if r["px_rss_peak_kb"]), default=None)
    errors = sum(int(r["errors"]) for r in every)
    summary[target] = s
    print(f"{names[target]:<22} {fmt(s['etcd_watchers_held'], '13.0f')} {fmt(s['etcd_watchers_after'], '12.0f')} "
          f"{fmt(s['deliv_per_s'], '9.0f')} {fmt(s['p50_ms'], '7.2f')} {fmt(s['p99_ms'], '7.2f')} "
          f"{fmt(s['px_cpu_us_per_deliv'], '15.2f')} {fmt(s['etcd_cpu_ms_run'], '11.0f')} "
          f"{fmt(s['rss'] and s['rss'] / 1024, '15.1f')} {fmt(s['events_per_response'], '7.2f')} {fmt(s['client_cpu_us_per_deliv'], '15.2f')} {errors:>7} {sum(int(r['errors']) == 0 for r in every):>6} of {len(every)}")
print()
print(f"medians over the clean rounds (no watch error); errors = over all rounds; {watchers} watchers x {events} events = {watchers * events} deliveries a run;")
print("etcd watchers = etcd_debugging_mvcc_watcher_total with the watchers created, minus before;")
print("px CPU = the proxy process during the event phase, per delivery; etcd CPU = etcd over the whole run;")
print("px peak RSS = the largest VmHWM of the fresh proxy processes; ev/resp = events per watch response received;")
print("client us/deliv = CPU of the load generator (bench watch) during the event phase, per delivery")
o, t = summary.get("etcd-proxy"), summary.get("etcd-grpc-proxy")
def ratio(k):
    a, b = o.get(k), t.get(k)
    return f"x{a / b:.2f}" if a is not None and b else "n/a"
if o and t:
    print(f"etcd-proxy / etcd grpc-proxy: etcd watchers {ratio('etcd_watchers_held')}, "
          f"CPU per delivery {ratio('px_cpu_us_per_deliv')}, deliveries/s {ratio('deliv_per_s')}, "
          f"peak RSS {ratio('rss')}, etcd CPU {ratio('etcd_cpu_ms_run')}")
bad = [r for r in rows if int(r["errors"]) > 0]
if failed or bad:
    print()
    print(f"*** {len(failed)} run(s) FAILED and {len(bad)} run(s) had watch ERRORS (missing, repeated or "
          "reordered events): ***")
    for r in failed:
        print(f"  round {r['round']} {r['target']}: {r['etcd_watchers_held']}")
    for r in bad:
        print(f"  round {r['round']} {r['target']}: {r['errors']} errors, {r['missing']} deliveries missing")
PY
