# Shared set-up of the side-by-side benchmarks (scripts/bench-gateway.sh, scripts/bench-grpc-proxy.sh),
# sourced by them with their arguments after setting `bench_name`: parses the common flags, installs
# etcd and builds etcd-proxy if needed, makes a work dir cleaned on exit, and starts a healthy 1-member
# etcd on free loopback ports. Defines: repo, rounds, total, conns, clients, raw_out, etcd_bin, ours,
# work, pids (every PID in it is stopped on exit), free_port, wait_port, ep (etcd's client port).
: "${bench_name:?set bench_name before sourcing bench-common.sh}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

rounds=3
total=100000
conns=8
clients=64
build=1
raw_out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) rounds=1; total=3000 ;;
        --rounds) rounds="$2"; shift ;;
        --total) total="$2"; shift ;;
        --conns) conns="$2"; shift ;;
        --clients) clients="$2"; shift ;;
        --no-build) build=0 ;;
        --raw) raw_out="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "$bench_name: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

etcd_bin="${ETCD_BIN:-$repo/.etcd/bin}"
ours="$repo/target/release/etcd-proxy"

if [[ ! -x "$etcd_bin/etcd" ]]; then
    scripts/install-etcd.sh
fi
if [[ $build -eq 1 ]]; then
    cargo build --release -p etcd-proxy
fi
if ! "$ours" bench --help >/dev/null 2>&1; then
    echo "$bench_name: $ours has no 'bench' command" >&2
    exit 1
fi

work="$(mktemp -d -t $bench_name.XXXXXX)"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port: bind port 0 and let go. The kernel hands out ephemeral ports (32768+), never
# etcd's 2379/2380 or the front doors' 23790.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port NAME PID PORT: poll until PORT accepts connections (30 s), failing if PID dies.
wait_port() {
    local name="$1" pid="$2" port="$3" i
    for ((i = 0; i < 300; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$bench_name: $name exited; its log:" >&2
            tail -n 30 "$work/$name.log" >&2 || true
            exit 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "$bench_name: $name not listening on 127.0.0.1:$port after 30 s" >&2
    exit 1
}

ep="$(free_port)"
peer="$(free_port)"

"$etcd_bin/etcd" --name bench --data-dir "$work/data" \
    --listen-client-urls "http://127.0.0.1:$ep" --advertise-client-urls "http://127.0.0.1:$ep" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "bench=http://127.0.0.1:$peer" --unsafe-no-fsync --log-level warn \
    >"$work/etcd.log" 2>&1 &
etcd_pid=$!
pids+=("$etcd_pid")
wait_port etcd "$etcd_pid" "$ep"
for ((i = 0; ; i++)); do
    if "$etcd_bin/etcdctl" --endpoints="127.0.0.1:$ep" endpoint health >/dev/null 2>&1; then
        break
    fi
    if ((i >= 300)); then
        echo "$bench_name: etcd not healthy after 30 s" >&2
        exit 1
    fi
    sleep 0.1
done

# ---- The measurement, shared by both scripts ----
# The caller starts its two front doors, then sets:
#   theirs    target name of etcd's own front door (etcd-gateway, etcd-grpc-proxy)
#   tag       short label of the front-door columns (gw, px)
#   note      extra text after the report's legend (may be empty)
#   workloads array of put, range-s (serializable), range-l (linearizable)
#   port_of / pid_of  associative arrays for direct, $theirs and etcd-proxy
# and calls run_comparison.
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


workload_args() {
    case "$1" in
        put) echo "put" ;;
        range-s) echo "range --consistency=s" ;;
        range-l) echo "range --consistency=l" ;;
    esac
}

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

run_comparison() {
    local targets=(direct "$theirs" etcd-proxy) workload target round k
    results="$work/results.tsv"
    printf 'round\tworkload\ttarget\treq_per_s\tp99_ms\tcpu_us_per_req\tsys_pct\trss_kb\terrors\n' >"$results"


    echo "etcd $("$etcd_bin/etcd" --version | awk '/etcd Version/ { print $3 }') on 127.0.0.1:$ep;" \
        "$theirs on :${port_of[$theirs]} (pid ${pid_of[$theirs]}); etcd-proxy on :${port_of[etcd-proxy]} (pid ${pid_of[etcd-proxy]})"
    echo "load: --conns=$conns --clients=$clients --total=$total, $rounds round(s), CLK_TCK=$clk_tck;" \
        "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

    # Warm up each path once (connections, Go's heap, caches) before anything is recorded.
    for workload in "${workloads[@]}"; do
        for target in "${targets[@]}"; do
            run_one warm "$workload" "$target" "$(( total < 5000 ? total : 5000 ))"
        done
    done

    echo "round workload target req/s p99_ms ${tag}_cpu_us/req ${tag}_sys_% ${tag}_rss_kb errors"
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

    python3 - "$results" "$theirs" "$tag" "$note" <<'PY'
import csv, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
theirs, tag, note = sys.argv[2], sys.argv[3], sys.argv[4]
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
print(f"{'workload':<9} {'target':<16} {'req/s':>9} {'p99 ms':>8} {tag + ' CPU us/req':>14} {tag + ' sys %':>9} {tag + ' RSS MiB':>11} {'errors':>7}")
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
print(f"medians over rounds; {tag} = the front door's process only; {tag} sys % = share of its CPU spent in the kernel;")
print(f"{tag} RSS = the largest seen after a run{note}")
def ratio(a, b):
    return a / b if a is not None and b else float("nan")
for wl in dict.fromkeys(w for w, _ in table):
    o, t = summary.get((wl, "etcd-proxy")), summary.get((wl, theirs))
    if not o or not t:
        continue
    print(f"{wl}: etcd-proxy / {theirs}: req/s x{ratio(o[0], t[0]):.2f}, "
          f"CPU per request x{ratio(o[1], t[1]):.2f}, RSS x{ratio(o[2], t[2]):.2f}")
PY
}
