#!/usr/bin/env bash
# The main job on a fresh machine: builds etcd-proxy, installs etcd if missing, starts a local
# 3-member etcd cluster on loopback with the gateway in front, prints the endpoints and commands
# to try, and stops everything on Ctrl-C. Free ports are picked, so it never collides with an
# etcd already running on 2379.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

scripts/install-etcd.sh >/dev/null
echo "building etcd-proxy (release)..."
cargo build --release --quiet -p etcd-proxy
bin="$repo/.etcd/bin"
proxy="$repo/target/release/etcd-proxy"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work="$(mktemp -d -t etcd-proxy-local.XXXXXX)"
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
  echo "stopped; removed $work"
}
trap cleanup INT TERM EXIT

names=(m0 m1 m2); client_ports=(); peer_ports=(); cluster=""
for n in "${names[@]}"; do
  c=$(free_port); p=$(free_port)
  client_ports+=("$c"); peer_ports+=("$p")
  cluster+="${cluster:+,}$n=http://127.0.0.1:$p"
done
token="local-$$"
for i in 0 1 2; do
  n=${names[$i]}
  "$bin/etcd" --name "$n" --data-dir "$work/$n" \
    --listen-client-urls "http://127.0.0.1:${client_ports[$i]}" --advertise-client-urls "http://127.0.0.1:${client_ports[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${peer_ports[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${peer_ports[$i]}" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "$token" \
    >"$work/$n.log" 2>&1 &
  pids+=($!)
done
endpoints="http://127.0.0.1:${client_ports[0]},http://127.0.0.1:${client_ports[1]},http://127.0.0.1:${client_ports[2]}"
echo "waiting for etcd..."
for _ in $(seq 1 150); do
  if ETCDCTL_API=3 "$bin/etcdctl" --endpoints "$endpoints" endpoint health >/dev/null 2>&1; then break; fi
  sleep 0.2
done
ETCDCTL_API=3 "$bin/etcdctl" --endpoints "$endpoints" endpoint health >/dev/null

gw_port=$(free_port); metrics_port=$(free_port)
"$proxy" gateway start --listen-addr "127.0.0.1:$gw_port" --endpoints "$endpoints" \
  --metrics-addr "127.0.0.1:$metrics_port" --retry-delay 10s 2>"$work/gateway.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q "ready to proxy client requests" "$work/gateway.log" && break; sleep 0.1; done

cat <<TXT

etcd cluster (3 members):  $endpoints
gateway (L4):              127.0.0.1:$gw_port
gateway metrics:           http://127.0.0.1:$metrics_port/metrics
logs:                      $work/*.log

Try:
  export ETCDCTL_API=3 PATH="$bin:\$PATH"
  etcdctl --endpoints 127.0.0.1:$gw_port put foo bar
  etcdctl --endpoints 127.0.0.1:$gw_port get foo
  etcdctl --endpoints 127.0.0.1:$gw_port watch foo      # then put from another shell
  curl -s -X POST http://127.0.0.1:$gw_port/v3/kv/range -d '{"key":"Zm9v"}'
  curl -s http://127.0.0.1:$metrics_port/metrics | grep etcd_gateway_endpoint_up
  kill -STOP ${pids[0]}   # freeze member m0: the gateway's probe takes it out within seconds
  kill -CONT ${pids[0]}   # and puts it back after --retry-delay (10s here)

Ctrl-C stops everything.
TXT
wait "${pids[3]}"
