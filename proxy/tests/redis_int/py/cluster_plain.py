"""redis-py's plain client (RESP2 and RESP3) through a proxy that hides a Redis Cluster: keys
over every master, multi-key commands split and merged, pipelines, transactions in one slot
(and CROSSSLOT otherwise), WATCH, SCAN that sees every key once, pub/sub and sharded pub/sub,
blocking commands and scripts.

    cluster_plain.py HOST PORT PREFIX NODE,NODE,... [CA]

With CA, the proxy and the nodes are reached over TLS, verified against CA."""
import sys
import threading
import time

import redis

host, port, prefix, nodes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
tls = {"ssl": True, "ssl_ca_certs": sys.argv[5]} if len(sys.argv) > 5 else {}

masters = []
for addr in nodes:
    h, p = addr.rsplit(":", 1)
    direct = redis.Redis(host=h, port=int(p), decode_responses=True, **tls)
    if direct.info("replication")["role"] == "master":
        masters.append(direct)
assert len(masters) == 3, masters

for proto in (2, 3):
    pre = f"{prefix}p{proto}:"
    r = redis.Redis(host=host, port=port, protocol=proto, decode_responses=True, **tls)
    other = redis.Redis(host=host, port=port, protocol=proto, decode_responses=True, **tls)
    assert r.ping()

    # 3000 keys, written in pipelines: they land on every master.
    keys = [f"{pre}k{i}" for i in range(3000)]
    pipe = r.pipeline(transaction=False)
    for i, k in enumerate(keys):
        pipe.set(k, f"v{i}")
    assert pipe.execute() == [True] * len(keys)
    for m in masters:
        held = list(m.scan_iter(match=f"{pre}k*", count=1000))
        assert len(held) > 500, (m, len(held))
    assert sum(len(list(m.scan_iter(match=f"{pre}k*", count=1000))) for m in masters) == 3000
    for i in (0, 1, 1500, 2999):
        assert r.get(keys[i]) == f"v{i}"

    # Multi-key commands over slots, merged in key order.
    picked = keys[:50] + [f"{pre}missing"] + keys[2950:]
    expected = [f"v{i}" for i in range(50)] + [None] + [f"v{i}" for i in range(2950, 3000)]
    assert r.mget(picked) == expected
    assert r.mset({f"{pre}m{i}": str(i) for i in range(40)})
    assert r.mget([f"{pre}m{i}" for i in range(40)]) == [str(i) for i in range(40)]
    assert r.exists(*[f"{pre}m{i}" for i in range(40)], f"{pre}nope") == 40
    assert r.touch(*[f"{pre}m{i}" for i in range(10)]) == 10
    assert r.unlink(*[f"{pre}m{i}" for i in range(20)]) == 20
    assert r.delete(*[f"{pre}m{i}" for i in range(40)]) == 20

    # SCAN through the proxy sees every key exactly once.
    seen = list(r.scan_iter(match=f"{pre}k*", count=500))
    assert len(seen) == len(set(seen)) == 3000, (len(seen), len(set(seen)))
    assert set(seen) == set(keys)

    # A transaction in one slot; one that spans slots is refused as Redis Cluster does.
    tx = r.pipeline(transaction=True)
    tx.set(f"{{{pre}t}}a", "1").incr(f"{{{pre}t}}a").get(f"{{{pre}t}}a")
    assert tx.execute() == [True, 2, "2"]
    tx = r.pipeline(transaction=True)
    tx.set(f"{pre}x", "1").set(f"{pre}y", "2")
    try:
        tx.execute()
        raise AssertionError("a cross-slot transaction ran")
    except redis.ResponseError as e:
        assert isinstance(e, redis.exceptions.ClusterCrossSlotError) or "EXECABORT" in str(e), e

    # WATCH: a change by another client aborts the transaction.
    wkey = f"{{{pre}w}}n"
    r.set(wkey, "0")
    with r.pipeline(transaction=True) as w:
        w.watch(wkey)
        other.incr(wkey)
        w.multi()
        w.incr(wkey)
        try:
            w.execute()
            raise AssertionError("a watched key changed and EXEC still ran")
        except redis.WatchError:
            pass
    with r.pipeline(transaction=True) as w:
        w.watch(wkey)
        w.multi()
        w.incr(wkey)
        assert w.execute() == [2]

    # Scripts by their keys.
    assert r.eval("return redis.call('incr', KEYS[1])", 1, f"{pre}script") == 1
    assert r.eval("return ARGV[1]", 0, "x") == "x"

    # Blocking commands: a BLPOP answered by another client's push.
    bkey = f"{pre}queue"
    def push():
        time.sleep(0.3)
        other.rpush(bkey, "job")
    threading.Thread(target=push).start()
    popped = r.blpop([bkey], timeout=5)
    assert popped is not None and list(popped) == [bkey, "job"], popped

    # Pub/sub and sharded pub/sub, published through another connection of the proxy.
    for sharded in (False, True):
        sub = redis.Redis(
            host=host, port=port, protocol=proto, decode_responses=True, **tls
        ).pubsub()
        channel = f"{pre}ch{sharded}"
        (sub.ssubscribe if sharded else sub.subscribe)(channel)
        deadline = time.time() + 5
        confirmed = None
        while confirmed is None and time.time() < deadline:
            confirmed = sub.get_message(timeout=1)
        assert confirmed and confirmed["type"] in ("subscribe", "ssubscribe"), confirmed
        receivers = (other.spublish if sharded else other.publish)(channel, "hello")
        assert receivers >= 1, receivers
        message = None
        while message is None and time.time() < deadline:
            message = sub.get_message(timeout=1)
        assert message and message["data"] == "hello", message
        sub.close()

    for batch in range(0, 3000, 500):
        assert r.delete(*keys[batch:batch + 500]) == 500

print("cluster plain ok")
