"""redis-py (RESP3) through the proxy: HELLO 3 on connect, CLIENT SETINFO, maps, pushes."""
import sys
import time

import redis

host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]

r = redis.Redis(host=host, port=port, protocol=3, decode_responses=True)
assert r.ping()
assert r.set(prefix + "k", "v")
assert r.get(prefix + "k") == "v"
r.hset(prefix + "h", mapping={"a": "1", "b": "2"})
assert r.hgetall(prefix + "h") == {"a": "1", "b": "2"}, r.hgetall(prefix + "h")
assert r.execute_command("HELLO", "3")["proto"] == 3
assert r.sadd(prefix + "s", "x", "y") == 2
assert r.smembers(prefix + "s") == {"x", "y"}

pipe = r.pipeline(transaction=False)
for i in range(200):
    pipe.incr(prefix + "n")
assert pipe.execute() == list(range(1, 201))

tx = r.pipeline(transaction=True)
tx.set(prefix + "t", "1").incr(prefix + "t")
assert tx.execute() == [True, 2]

# HELLO with AUTH passes through (an ACL user made for this test).
user = prefix.replace(":", "_") + "user"
r.execute_command("ACL", "SETUSER", user, "on", ">secret", "~*", "+@all")
a = redis.Redis(host=host, port=port, protocol=3, username=user, password="secret", decode_responses=True)
assert a.acl_whoami() == user
bad = redis.Redis(host=host, port=port, protocol=3, username=user, password="wrong")
try:
    bad.ping()
    raise AssertionError("a wrong password was accepted")
except redis.AuthenticationError:
    pass
# RESP2 clients authenticate with AUTH user password: it passes through too.
a2 = redis.Redis(host=host, port=port, protocol=2, username=user, password="secret", decode_responses=True)
assert a2.acl_whoami() == user
raw = redis.Redis(host=host, port=port, protocol=2, decode_responses=True)
try:
    raw.execute_command("AUTH", user, "wrong")
    raise AssertionError("AUTH with a wrong password was accepted")
except redis.AuthenticationError:
    pass
r.execute_command("ACL", "DELUSER", user)

# Pub/sub over RESP3: messages arrive as push frames.
p = r.pubsub()
p.subscribe(prefix + "chan")
deadline = time.time() + 5
confirmed = None
while confirmed is None and time.time() < deadline:
    confirmed = p.get_message(timeout=0.5)
assert confirmed and confirmed["type"] == "subscribe", confirmed
for i in range(5):
    assert r.publish(prefix + "chan", f"m{i}") == 1
got = []
while len(got) < 5 and time.time() < deadline + 5:
    m = p.get_message(timeout=0.5)
    if m and m["type"] == "message":
        got.append(m["data"])
assert got == [f"m{i}" for i in range(5)], got
p.unsubscribe()
p.close()

print("resp3 ok")
