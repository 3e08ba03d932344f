#!/usr/bin/env python3
"""CQL smoke test with the DataStax Python driver (pip install cassandra-driver).

Reads CASSANDRA_ADDR, and CASSANDRA_USER/CASSANDRA_PASSWORD and CASSANDRA_TLS_CA when set, exactly as
`eval "$(e2e/cassandra/cassandra.sh up [--auth] [--tls])"` exports them; creates a keyspace and a
table, inserts and reads back rows, drops the keyspace. Exits non-zero on any failure.

  eval "$(e2e/cassandra/cassandra.sh up)" && python3 e2e/cassandra/smoke.py
"""
import os
import ssl
import sys
import time
import uuid

from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import WhiteListRoundRobinPolicy


def main():
    host, port = os.environ["CASSANDRA_ADDR"].rsplit(":", 1)
    kwargs = dict(
        contact_points=[host],
        port=int(port),
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([host]))
        },
        connect_timeout=10,
    )
    if os.environ.get("CASSANDRA_USER"):
        kwargs["auth_provider"] = PlainTextAuthProvider(
            os.environ["CASSANDRA_USER"], os.environ.get("CASSANDRA_PASSWORD", "")
        )
    if os.environ.get("CASSANDRA_TLS_CA"):
        ctx = ssl.create_default_context(cafile=os.environ["CASSANDRA_TLS_CA"])
        kwargs["ssl_context"] = ctx
        kwargs["ssl_options"] = {"server_hostname": host}
    t0 = time.monotonic()
    cluster = Cluster(**kwargs)
    session = cluster.connect()
    ks = "smoke_%s" % uuid.uuid4().hex[:8]
    try:
        version = session.execute("SELECT release_version FROM system.local").one().release_version
        session.execute(
            "CREATE KEYSPACE %s WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}" % ks
        )
        session.execute("CREATE TABLE %s.kv (k int PRIMARY KEY, v text)" % ks)
        insert = session.prepare("INSERT INTO %s.kv (k, v) VALUES (?, ?)" % ks)
        for i in range(100):
            session.execute(insert, (i, "value-%d" % i))
        rows = list(session.execute("SELECT k, v FROM %s.kv" % ks))
        assert len(rows) == 100, "expected 100 rows, got %d" % len(rows)
        row = session.execute("SELECT v FROM %s.kv WHERE k = 42" % ks).one()
        assert row.v == "value-42", row
        if os.environ.get("CASSANDRA_USER"):
            me = session.execute("SELECT role, is_superuser FROM system_auth.roles WHERE role = %s",
                                 (os.environ["CASSANDRA_USER"],)).one()
            assert me is not None and me.is_superuser, me
        session.execute("DROP KEYSPACE %s" % ks)
    finally:
        cluster.shutdown()
    print(
        "smoke ok: Cassandra %s at %s (protocol v%d%s%s), %.1f s"
        % (
            version,
            os.environ["CASSANDRA_ADDR"],
            cluster.protocol_version,
            ", login %s" % os.environ["CASSANDRA_USER"] if os.environ.get("CASSANDRA_USER") else "",
            ", TLS" if os.environ.get("CASSANDRA_TLS_CA") else "",
            time.monotonic() - t0,
        )
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report any failure plainly
        print("smoke FAILED: %r" % e, file=sys.stderr)
        sys.exit(1)
