#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from real clients.

    fuzz/capture.py            # needs `e2e/services up redis cassandra` (their *_ADDR exported)

A recording relay on 127.0.0.1 sits between each real client and the real server, and keeps
what each connection sent both ways: redis-py in RESP2 and RESP3 (commands, a pipeline, a
transaction, pub/sub, a large value, a Lua script with a nested reply) for the Redis request
and response targets; the Python Cassandra driver on v3 with Snappy, v4 with LZ4 and v5
plain and with LZ4 (schema, inserts, a prepared statement, paging, a batch, errors) for the
CQL targets (and, after a v5 handshake, its segments for the segment target). Topology and
AdmissionReview seeds come from the repository's own files. Each seed is cut at 64 KiB.
Run it again when a protocol feature is added; the seeds are committed.
"""

import json
import os
import pathlib
import socket
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
REPO = ROOT.parent
CAP = 64 * 1024


class Relay:
    """Forwards 127.0.0.1:<port> to `upstream`, recording every connection both ways."""

    def __init__(self, upstream):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns = []  # (client->server bytearray, server->client bytearray)
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            record = (bytearray(), bytearray())
            with self.lock:
                self.conns.append(record)
            for a, b, buf in ((client, server, record[0]), (server, client, record[1])):
                threading.Thread(target=self.pump, args=(a, b, buf), daemon=True).start()

    @staticmethod
    def pump(src, dst, buf):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            buf.extend(data)
            try:
                dst.sendall(data)
            except OSError:
                return

    def take(self):
        with self.lock:
            conns, self.conns = self.conns, []
        return [(bytes(a), bytes(b)) for a, b in conns]


def write(target, name, data):
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data[:CAP])


def addr(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"capture.py: {name} is not set: run `eval \"$(e2e/services up redis cassandra)\"`")
    return value


def redis_seeds():
    import redis

    relay = Relay(addr("REDIS_ADDR"))
    for protocol in (2, 3):
        r = redis.Redis(host="127.0.0.1", port=relay.port, protocol=protocol)
        r.set("k", "v")
        r.get("k")
        r.mset({"a": 1, "b": 2})
        r.mget("a", "b", "missing")
        r.hset("h", mapping={"f": "1", "g": "2"})
        r.hgetall("h")
        r.incr("n")
        r.rpush("l", *range(10))
        r.lrange("l", 0, -1)
        r.zadd("z", {"x": 1.5, "y": 2})
        r.zrange("z", 0, -1, withscores=True)
        r.sadd("s", "m1", "m2")
        r.smembers("s")
        r.set("big", b"\x00\xff" * 3000)
        r.get("big")
        r.eval("return {1, {2, {3, {'x', {err='no'}}}}, 'ok'}", 0)
        r.execute_command("INFO", "server")
        r.execute_command("CLIENT", "ID")
        p = r.pipeline(transaction=False)
        for i in range(50):
            p.set(f"p{i}", i)
            p.get(f"p{i}")
        p.execute()
        t = r.pipeline(transaction=True)
        t.incr("n")
        t.get("n")
        t.execute()
        try:
            r.execute_command("NOSUCHCOMMAND")
        except redis.ResponseError:
            pass
        ps = r.pubsub()
        ps.subscribe("chan")
        r.publish("chan", "hello")
        ps.get_message(timeout=1)
        ps.get_message(timeout=1)
        ps.close()
        r.close()
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        # Inline commands, as redis-cli and telnet send them.
        s.sendall(b"PING\r\nSET inline 'quoted value'\r\nGET inline\r\n\r\n")
        s.recv(4096)
    for i, (sent, received) in enumerate(relay.take()):
        write("redis_request", f"redis-py-{i}", sent)
        write("redis_response", f"redis-py-{i}", received)


def cassandra_seeds():
    from cassandra.cluster import Cluster
    from cassandra.policies import RoundRobinPolicy
    from cassandra.query import BatchStatement, SimpleStatement

    relay = Relay(addr("CASSANDRA_PLAIN_ADDR"))
    runs = [("v3-snappy", 3, "snappy"), ("v4-lz4", 4, "lz4"), ("v5", 5, None), ("v5-lz4", 5, "lz4")]
    for name, version, compression in runs:
        options = {"port": relay.port, "protocol_version": version, "load_balancing_policy": RoundRobinPolicy()}
        options["compression"] = compression or False
        cluster = Cluster(["127.0.0.1"], **options)
        session = cluster.connect()
        ks = "fuzzseeds"
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
        )
        session.execute(f"CREATE TABLE IF NOT EXISTS {ks}.kv (k int PRIMARY KEY, v text, m map<text, int>)")
        insert = session.prepare(f"INSERT INTO {ks}.kv (k, v, m) VALUES (?, ?, ?)")
        for i in range(20):
            session.execute(insert, (i, "x" * i, {"a": i}))
        session.execute(f"INSERT INTO {ks}.kv (k, v) VALUES (100, %s)", ("y" * 40000,))
        list(session.execute(SimpleStatement(f"SELECT * FROM {ks}.kv", fetch_size=5)))
        batch = BatchStatement()
        batch.add(insert, (200, "b", {}))
        batch.add(SimpleStatement(f"UPDATE {ks}.kv SET v = 'u' WHERE k = 1"))
        session.execute(batch)
        session.execute(f"INSERT INTO {ks}.kv (k, v) VALUES (300, 'lwt') IF NOT EXISTS")
        try:
            session.execute("SELEC nothing")
        except Exception:
            pass
        cluster.shutdown()
        for i, (sent, received) in enumerate(relay.take()):
            write("cql_request", f"{name}-{i}", b"\x00" + sent)
            mode = {None: 0, "lz4": 1, "snappy": 2}[compression]
            write("cql_response", f"{name}-{i}", bytes([mode]) + received)
            if version == 5:
                for side, data in (("request", sent), ("response", received)):
                    rest = after_handshake(data)
                    if rest:
                        mode = 1 if compression == "lz4" else 0
                        write("cql_segments", f"{name}-{i}-{side}", bytes([mode]) + rest)


def after_handshake(data):
    """The bytes after the envelope that answers or sends STARTUP (v5: segments follow)."""
    at = 0
    while at + 9 <= len(data):
        opcode = data[at + 4]
        length = int.from_bytes(data[at + 5 : at + 9], "big")
        at += 9 + length
        # STARTUP (client) or READY / AUTHENTICATE (node): segments follow.
        if opcode in (0x01, 0x02, 0x03):
            return data[at:]
    return b""


def file_seeds():
    topologies = list(REPO.glob("config/*.yaml")) + list(REPO.glob("examples/*/topology.yaml"))
    topologies += sorted(REPO.glob("proxy/tests/redis_int/upstream/*.yaml"))[:12]
    for path in topologies:
        write("topology", f"{path.parent.name}-{path.name}", path.read_bytes())
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-",
            "namespace": "apps",
            "labels": {"shotover.io/inject": "true"},
            "annotations": {
                "shotover.io/topology": "cache",
                "shotover.io/proxy-cpu-request": "100m",
                "shotover.io/proxy-memory-limit": "128Mi",
                "shotover.io/log-level": "debug",
            },
        },
        "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps",
            "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": pod,
            "dryRun": False,
        },
    }
    write("admission", "review-pod.json", json.dumps(review).encode())
    write("admission", "pod.yaml", json.dumps(pod).encode())
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"template": {"metadata": pod["metadata"], "spec": pod["spec"]}},
    }
    write("admission", "deployment.yaml", json.dumps(deployment).encode())


if __name__ == "__main__":
    file_seeds()
    redis_seeds()
    cassandra_seeds()
    for folder in sorted(CORPUS.iterdir()):
        print(f"{folder.name}: {len(list(folder.iterdir()))} seeds")
