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
