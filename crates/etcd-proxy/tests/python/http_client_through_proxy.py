"""etcd3gw (a Python client of etcd's HTTP/JSON gateway, on `requests`) through the proxy's
HTTP/JSON API: put, get, prefix, delete, transaction, watch and leases, each checked against a
direct read or write on an etcd member with the same client.

Usage: http_client_through_proxy.py PROXY_HOST:PORT MEMBER_HOST:PORT
Exits non-zero with a message on the first mismatch; bounded in time by itself.
"""

import sys
import threading
import time

from etcd3gw.client import Etcd3Client

DEADLINE = time.monotonic() + 120


def client(addr):
    host, port = addr.rsplit(":", 1)
    return Etcd3Client(host=host, port=int(port), protocol="http", timeout=20)


def check(what, got, want):
    if got != want:
        sys.exit(f"{what}: got {got!r}, want {want!r}")
    print(f"ok: {what}")


def main():
    proxy, direct = client(sys.argv[1]), client(sys.argv[2])
    # /version decides the API path: /v3/ for etcd 3.5.
    check("api path", proxy.api_path, "/v3/")

    check("put", proxy.put("gw/a", "1"), True)
    check("get through the proxy", proxy.get("gw/a"), [b"1"])
    check("get directly", direct.get("gw/a"), [b"1"])
    direct.put("gw/b", "2")
    got = sorted(v for v, _ in proxy.get_prefix("gw/"))
    check("get_prefix", got, [b"1", b"2"])
    check("delete", proxy.delete("gw/b"), True)
    check("deleted", direct.get("gw/b"), [])

    # A compare-and-swap transaction.
    swapped = proxy.replace("gw/a", "1", "one")
    check("replace succeeded", swapped, True)
    check("replace result", direct.get("gw/a"), [b"one"])
    check("replace with a stale value", proxy.replace("gw/a", "1", "uno"), False)

    # Watch: events of writes made directly on the member.
    events, cancel = proxy.watch("gw/w")
    got = []

    def reader():
        for ev in events:
            got.append((ev["kv"]["key"], ev["kv"].get("value"), ev.get("type", "PUT")))
            if len(got) == 2:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(1)
    direct.put("gw/w", "x")
    direct.delete("gw/w")
    t.join(timeout=max(1, DEADLINE - time.monotonic()))
    cancel()
    check("watch events", got, [(b"gw/w", b"x", "PUT"), (b"gw/w", None, "DELETE")])

    # Leases: grant, keep alive, time to live, keys, revoke.
    lease = proxy.lease(ttl=30)
    proxy.put("gw/leased", "v", lease=lease)
    check("lease keep-alive TTL", lease.refresh(), 30)
    ttl = lease.ttl()
    if not 0 < ttl <= 30:
        sys.exit(f"lease ttl {ttl}")
    print("ok: lease ttl")
    check("lease keys", lease.keys(), [b"gw/leased"])
    check("lease revoke", lease.revoke(), True)
    check("leased key gone", direct.get("gw/leased"), [])
    print("all ok")


if __name__ == "__main__":
    main()
