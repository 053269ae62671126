#!/usr/bin/env python3
"""A real Python etcd v3 client (aetcd, asyncio over grpcio) used through the gRPC proxy.

    client_through_proxy.py PROXY_HOST:PORT DIRECT_HOST:PORT

Every operation goes through PROXY; DIRECT (one etcd member) is used only to check what the
proxy did and to make writes the proxy's watchers must see. Passing an etcd member as PROXY
runs the same checks against etcd itself, for comparison.

Checks: put/get, get_prefix, delete, a transaction (both branches), lease grant / put with
lease / refresh / time-to-live / revoke, a watch (direct writes seen in order, plus history
replay), a lock (a second holder waits until the first releases), and how errors come back
(compacted revision, invalid argument, unknown lease). The last step compacts the cluster.

Exits 0 with a short summary when everything matches, 1 with the failing check otherwise.
Every wait is bounded; the whole run is limited to TOTAL_TIMEOUT seconds.
"""

import asyncio
import importlib.metadata
import sys
import time
import uuid

import aetcd
import aetcd.rpc
from aetcd import exceptions

RPC_TIMEOUT = 10  # seconds, every unary call and watch creation
EVENT_TIMEOUT = 10.0  # seconds to wait for one watch event
TOTAL_TIMEOUT = 120.0


class Mismatch(Exception):
    """A check failed."""


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def check_eq(got, want, what):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")


def parse_addr(addr):
    """`host:port` or `[v6]:port` into aetcd's (host, port); aetcd joins them with ':'."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"bad address {addr!r}: want host:port")
    return host, int(port)


def client(addr):
    host, port = parse_addr(addr)
    return aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT)


def rpc_error(exc):
    """The grpc error a library exception wraps (aetcd raises `from` the AioRpcError)."""
    cause = exc if isinstance(exc, aetcd.rpc.AioRpcError) else exc.__cause__
    check(
        isinstance(cause, aetcd.rpc.AioRpcError),
        f"{type(exc).__name__}({exc}) does not wrap a gRPC error (cause: {cause!r})",
    )
    return cause


async def next_event(watch, what):
    it = watch.__aiter__()
    try:
        return await asyncio.wait_for(it.__anext__(), EVENT_TIMEOUT)
    except asyncio.TimeoutError:
        raise Mismatch(f"{what}: no watch event within {EVENT_TIMEOUT}s") from None
    except StopAsyncIteration:
        raise Mismatch(f"{what}: watch ended before the event") from None


async def check_kv(px, direct, p):
    put = await px.put(p + b"k", b"v1")
    check(put.header.revision > 0, f"put revision {put.header.revision}")
    got = await px.get(p + b"k")
    check(got is not None, "get through the proxy: key missing after put")
    check_eq(got.value, b"v1", "get through the proxy")
    check_eq(got.mod_revision, put.header.revision, "mod_revision of the put key")
    d = await direct.get(p + b"k")
    check(d is not None and d.value == b"v1", f"direct read after proxy put: {d!r}")

    # Overwrite with prev_kv: the previous value comes back through the proxy.
    put2 = await px.put(p + b"k", b"v2", prev_kv=True)
    check(
        put2.prev_kv is not None and put2.prev_kv.value == b"v1",
        f"prev_kv: {put2.prev_kv!r}",
    )
    check_eq((await direct.get(p + b"k")).value, b"v2", "direct read after overwrite")

    for k, v in [(b"pre/a", b"1"), (b"pre/b", b"2"), (b"pre/c", b"3"), (b"prf", b"x")]:
        await px.put(p + k, v)
    rng = await px.get_prefix(p + b"pre/")
    check_eq(
        [(kv.key, kv.value) for kv in rng],
        [(p + b"pre/a", b"1"), (p + b"pre/b", b"2"), (p + b"pre/c", b"3")],
        "get_prefix through the proxy",
    )
    check_eq(rng.count, 3, "get_prefix count")
    desc = await px.get_prefix(p + b"pre/", sort_order="descend", keys_only=True)
    check_eq(
        [(kv.key, kv.value) for kv in desc],
        [(p + b"pre/c", b""), (p + b"pre/b", b""), (p + b"pre/a", b"")],
        "get_prefix descending, keys only",
    )

    deleted = await px.delete(p + b"pre/a", prev_kv=True)
    check(deleted is not None and deleted.deleted == 1, f"delete: {deleted!r}")
    check(
        deleted.prev_kv is not None and deleted.prev_kv.value == b"1",
        f"delete prev_kv: {deleted.prev_kv!r}",
    )
    check((await direct.get(p + b"pre/a")) is None, "deleted key still there, read directly")
    check((await px.delete(p + b"pre/a")) is None, "deleting a missing key reports a deletion")
    dr = await px.delete_prefix(p + b"pre/")
    check_eq(dr.deleted, 2, "delete_prefix count")
    check_eq(len(await direct.get_prefix(p + b"pre/")), 0, "keys left after delete_prefix")
    check((await direct.get(p + b"prf")) is not None, "delete_prefix removed a key outside it")


async def check_txn(px, direct, p):
    t = px.transactions
    await px.put(p + b"t", b"old")
    ok, responses = await px.transaction(
        compare=[t.value(p + b"t") == b"old", t.version(p + b"t") > 0],
        success=[t.put(p + b"t", b"new"), t.get(p + b"t")],
        failure=[t.put(p + b"t-failed", b"x")],
    )
    check(ok is True, "txn: compare value == 'old' should succeed")
    check_eq(len(responses), 2, "txn success responses")
    check_eq([v for v, _ in responses[1]], [b"new"], "txn get inside the success branch")
    check_eq((await direct.get(p + b"t")).value, b"new", "direct read after txn success")
    check((await direct.get(p + b"t-failed")) is None, "txn failure branch ran on success")

    ok, responses = await px.transaction(
        compare=[t.value(p + b"t") == b"old"],
        success=[t.put(p + b"t", b"wrong")],
        failure=[t.put(p + b"t-failed", b"x"), t.get(p + b"t")],
    )
    check(ok is False, "txn: compare value == 'old' should fail after the update")
    check_eq([v for v, _ in responses[1]], [b"new"], "txn get inside the failure branch")
    check_eq((await direct.get(p + b"t")).value, b"new", "txn success branch ran on failure")
    check_eq((await direct.get(p + b"t-failed")).value, b"x", "txn failure branch put")


async def check_lease(px, direct, p):
    lease = await px.lease(60)
    check(lease.id > 0, f"lease id {lease.id}")
    check_eq(lease.ttl, 60, "granted TTL")
    await px.put(p + b"leased", b"v", lease=lease)
    d = await direct.get(p + b"leased")
    check(d is not None and d.lease == lease.id, f"direct read of leased key: {d!r}")

    reply = await lease.refresh()
    check(reply is not None, "lease refresh (keep-alive) got no reply")
    check_eq(reply.ID, lease.id, "keep-alive reply lease id")
    check_eq(reply.TTL, 60, "keep-alive reply TTL")

    info = await px.get_lease_info(lease.id, keys=True)
    check_eq(info.ID, lease.id, "time-to-live lease id")
    check_eq(info.grantedTTL, 60, "time-to-live grantedTTL")
    check(0 < info.TTL <= 60, f"time-to-live remaining TTL {info.TTL}")
    check_eq(list(info.keys), [p + b"leased"], "time-to-live keys")

    await lease.revoke()
    check((await direct.get(p + b"leased")) is None, "leased key still there after revoke")
    check((await px.get(p + b"leased")) is None, "leased key still there through the proxy")
    # etcd answers time-to-live from the leader, which may apply the revoke a moment after the
    # member that answered it: poll, bounded.
    for _ in range(20):
        ttl = (await direct.get_lease_info(lease.id)).TTL
        if ttl == -1:
            break
        await asyncio.sleep(0.1)
    check_eq(ttl, -1, "revoked lease TTL, read directly")
    return lease.id


async def check_watch(px, direct, p):
    key = p + b"w/"
    end = aetcd.utils.prefix_range_end(key)
    watch = await px.watch(key, range_end=end, prev_kv=True)
    try:
        revs = []
        revs.append((await direct.put(key + b"1", b"a")).header.revision)
        revs.append((await direct.put(key + b"2", b"b")).header.revision)
        revs.append((await direct.put(key + b"1", b"c")).header.revision)
        revs.append((await direct.delete(key + b"2")).header.revision)
        want = [
            (aetcd.rtypes.EventKind.PUT, key + b"1", b"a", None),
            (aetcd.rtypes.EventKind.PUT, key + b"2", b"b", None),
            (aetcd.rtypes.EventKind.PUT, key + b"1", b"c", b"a"),
            (aetcd.rtypes.EventKind.DELETE, key + b"2", b"", b"b"),
        ]
        for i, (kind, k, v, prev) in enumerate(want):
            ev = await next_event(watch, f"watch event {i + 1} of {len(want)}")
            # aetcd gives an empty KeyValue as prev_kv for a created key.
            prev_kv = ev.prev_kv.value if ev.prev_kv and ev.prev_kv.key else None
            got = (ev.kind, ev.kv.key, ev.kv.value, prev_kv)
            check_eq(got, (kind, k, v, prev), f"watch event {i + 1}")
            check_eq(ev.kv.mod_revision, revs[i], f"watch event {i + 1} revision")
    finally:
        await watch.cancel()

    # History: a new watch from the first revision replays the same events, in order.
    replay = await px.watch(key, range_end=end, start_revision=revs[0])
    try:
        for i, rev in enumerate(revs):
            ev = await next_event(replay, f"replayed watch event {i + 1}")
            check_eq(ev.kv.mod_revision, rev, f"replayed watch event {i + 1} revision")
    finally:
        await replay.cancel()
    return len(want)


async def check_lock(px, p):
    name = p + b"lock"
    first = px.lock(name, ttl=30)
    check(await first.acquire(timeout=5), "first lock holder could not acquire a free lock")
    check(await first.is_acquired(), "first holder does not hold the lock")

    second = px.lock(name, ttl=30)
    started = time.monotonic()
    check(
        not await second.acquire(timeout=1),
        "second holder acquired a lock that is held",
    )
    check(time.monotonic() - started >= 0.9, "second holder did not wait for its timeout")

    waiting = asyncio.create_task(second.acquire(timeout=20))
    await asyncio.sleep(0.5)
    check(not waiting.done(), "second holder stopped waiting while the lock is held")
    check(await first.release(), "first holder's release did not delete its lock key")
    try:
        got = await asyncio.wait_for(waiting, 20)
    except asyncio.TimeoutError:
        raise Mismatch("second holder still waiting 20s after the release") from None
    check(got, "second holder did not get the lock after the release")
    check(await second.is_acquired(), "second holder does not hold the lock")
    check(not await first.is_acquired(), "first holder still holds the lock")
    check(await second.release(), "second holder's release")
    check((await px.get(name)) is None, "lock key left after both released")


async def check_errors(px, direct, p, revoked_lease):
    # Invalid argument: aetcd maps INVALID_ARGUMENT to its InvalidArgumentError.
    try:
        await px.put(b"", b"v")
        raise Mismatch("put of an empty key succeeded")
    except exceptions.InvalidArgumentError as e:
        err = rpc_error(e)
        check_eq(err.code(), aetcd.rpc.StatusCode.INVALID_ARGUMENT, "empty key status")
        check_eq(err.details(), "etcdserver: key is not provided", "empty key message")

    # Unknown lease: NOT_FOUND, which aetcd leaves as its base ClientError.
    try:
        await px.revoke_lease(revoked_lease)
        raise Mismatch("revoking a revoked lease succeeded")
    except exceptions.ClientError as e:
        err = rpc_error(e)
        check_eq(err.code(), aetcd.rpc.StatusCode.NOT_FOUND, "unknown lease status")
        check_eq(err.details(), "etcdserver: requested lease not found", "unknown lease message")

    # Compaction through the proxy, then reads of a compacted revision.
    old = (await px.put(p + b"c", b"1")).header.revision
    now = (await px.put(p + b"c", b"2")).header.revision
    await px.compact(now, physical=True)

    check_eq((await px.get(p + b"c")).value, b"2", "current read after compaction")

    # A range read at the compacted revision: aetcd's public get has no `revision`, so the
    # client's own KV stub is used; etcd answers OUT_OF_RANGE, which must not become UNKNOWN.
    await px.connect()
    for rev, msg in [
        (old, "etcdserver: mvcc: required revision has been compacted"),
        (now + 1000, "etcdserver: mvcc: required revision is a future revision"),
    ]:
        try:
            await px.kvstub.Range(
                aetcd.rpc.RangeRequest(key=p + b"c", revision=rev), timeout=RPC_TIMEOUT
            )
            raise Mismatch(f"range at revision {rev} succeeded")
        except aetcd.rpc.AioRpcError as e:
            check_eq(
                (e.code(), e.details()),
                (aetcd.rpc.StatusCode.OUT_OF_RANGE, msg),
                f"range at revision {rev}: status",
            )

    # A watch from before the compaction: aetcd's RevisionCompactedError, with the revision.
    # Watch creation does not wait for the serving member to catch up with the compaction (a
    # linearizable read would), so a member a few milliseconds behind may still replay revision
    # `old`: retry, bounded.
    seen = []
    for _ in range(20):
        try:
            w = await px.watch(p + b"c", start_revision=old)
            try:
                ev = await next_event(w, "watch from a compacted revision")
            finally:
                await w.cancel()
            seen.append(ev.kv.mod_revision)
            await asyncio.sleep(0.25)
        except exceptions.RevisionCompactedError as e:
            check_eq(e.compacted_revision, now, "RevisionCompactedError.compacted_revision")
            tries = len(seen) + 1
            break
    else:
        raise Mismatch(
            f"watches from compacted revision {old} (compacted at {now}) gave events at "
            f"{seen} instead of RevisionCompactedError"
        )
    return tries


async def run(proxy_addr, direct_addr):
    p = f"pyclient-{uuid.uuid4().hex[:8]}/".encode()
    async with client(proxy_addr) as px, client(direct_addr) as direct:
        steps = []
        t0 = time.monotonic()

        async def step(name, coro):
            t = time.monotonic()
            try:
                result = await coro
            except Mismatch as e:
                raise Mismatch(f"[{name}] {e}") from None
            except Exception as e:
                raise Mismatch(f"[{name}] unexpected {type(e).__name__}: {e!r}") from e
            steps.append(f"{name} {time.monotonic() - t:.2f}s")
            return result

        status = await step("status", px.status())
        check_eq(status.version, "3.5.1", "etcd version via Maintenance.Status")
        await step("kv", check_kv(px, direct, p))
        await step("txn", check_txn(px, direct, p))
        lease_id = await step("lease", check_lease(px, direct, p))
        events = await step("watch", check_watch(px, direct, p))
        await step("lock", check_lock(px, p))
        tries = await step("errors", check_errors(px, direct, p, lease_id))
        print(
            f"ok: aetcd {importlib.metadata.version('aetcd')} through {proxy_addr} "
            f"(etcd {status.version}, direct {direct_addr}): {events} watch events, "
            f"compacted watch error after {tries} tr{'y' if tries == 1 else 'ies'}; "
            + ", ".join(steps)
            + f"; total {time.monotonic() - t0:.2f}s"
        )


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        asyncio.run(asyncio.wait_for(run(sys.argv[1], sys.argv[2]), TOTAL_TIMEOUT))
    except Mismatch as e:
        print(f"FAIL (through {sys.argv[1]}): {e}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"FAIL (through {sys.argv[1]}): not done within {TOTAL_TIMEOUT}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
