"""redis-py's RedisCluster through a proxy with RedisClusterPortsRewrite: it learns the
cluster from CLUSTER SLOTS, every node of which is the proxy, and all its traffic goes there."""
import sys

import redis
from redis.cluster import RedisCluster

host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]

rc = RedisCluster(host=host, port=port, decode_responses=True)
nodes = rc.get_nodes()
assert nodes and all(n.port == port for n in nodes), [(n.host, n.port) for n in nodes]
keys = [f"{prefix}k{i}" for i in range(500)]
for i, k in enumerate(keys):
    assert rc.set(k, str(i))
assert [rc.get(k) for k in keys[:20]] == [str(i) for i in range(20)]
assert rc.mget_nonatomic(keys) == [str(i) for i in range(500)]
pipe = rc.pipeline()
for k in keys:
    pipe.incr(k)
assert pipe.execute() == [i + 1 for i in range(500)]
assert rc.delete(*keys) == 500
print("cluster aware ok")
