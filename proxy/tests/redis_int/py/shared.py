"""redis-py in RESP2 and RESP3 through shared upstream connections: what it sends on connect
(HELLO 3, CLIENT SETNAME, CLIENT SETINFO) is answered without pinning it, its name is its own,
and pipelines keep their order."""
import sys

import redis

host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]

for proto in (2, 3):
    name = f"{prefix}py{proto}".replace(":", "-")
    clients = [
        redis.Redis(host=host, port=port, protocol=proto, client_name=f"{name}-{i}", decode_responses=True)
        for i in range(4)
    ]
    for i, r in enumerate(clients):
        assert r.ping()
        assert r.client_getname() == f"{name}-{i}", r.client_getname()
        assert r.set(f"{name}:{i}", f"v{i}")
    for i, r in enumerate(clients):
        assert r.get(f"{name}:{i}") == f"v{i}"
        pipe = r.pipeline(transaction=False)
        for _ in range(100):
            pipe.incr(f"{name}:n{i}")
        assert pipe.execute() == list(range(1, 101))
        r.hset(f"{name}:h{i}", mapping={"a": "1", "b": "2"})
        assert r.hgetall(f"{name}:h{i}") == {"a": "1", "b": "2"}
        r.delete(f"{name}:{i}", f"{name}:n{i}", f"{name}:h{i}")
    if proto == 3:
        assert clients[0].execute_command("HELLO", "3")["proto"] == 3

print("shared ok")
