"""Drives a real Cassandra through the proxy with the DataStax Python driver.

    workout.py HOST:PORT KEYSPACE [--compression lz4|snappy] [--protocol N]
               [--user U --password P] [--ca CA.pem]

Creates KEYSPACE and a table, then checks: insert and select, prepared statements, paging
over 5,000 rows with page size 100, a logged batch, a lightweight transaction, a syntax error
coming back as SyntaxException, USE keyspace, a 300 KB value written and read. Prints one `ok NAME` line per check and the
negotiated protocol version; exits non-zero on the first failure. Drops KEYSPACE at the end.
"""

import argparse
import logging
import ssl
import sys

from cassandra import InvalidRequest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import RoundRobinPolicy
from cassandra.protocol import SyntaxException
from cassandra.query import BatchStatement, SimpleStatement


def main():
    # The driver's warnings (protocol downgrades among them) go to stderr, which the test reads.
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("keyspace")
    parser.add_argument("--compression")
    parser.add_argument("--protocol", type=int)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--ca")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)

    options = {
        "port": int(port),
        "execution_profiles": {
            # The test suite loads one small machine with several nodes and clients at once.
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=RoundRobinPolicy(), request_timeout=30
            )
        },
        "connect_timeout": 10,
        "control_connection_timeout": 10,
    }
    if args.compression:
        options["compression"] = args.compression
    if args.protocol:
        options["protocol_version"] = args.protocol
    if args.user:
        options["auth_provider"] = PlainTextAuthProvider(args.user, args.password)
    if args.ca:
        context = ssl.create_default_context(cafile=args.ca)
        context.check_hostname = False
        options["ssl_context"] = context
    cluster = Cluster([host], **options)
    session = cluster.connect()
    print(f"protocol {cluster.protocol_version}")
    ks = args.keyspace

    session.execute(f"DROP KEYSPACE IF EXISTS {ks}")
    session.execute(
        f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    )
    session.execute(f"CREATE TABLE {ks}.kv (k int PRIMARY KEY, v text)")
    session.execute(f"CREATE TABLE {ks}.rows (p int, c int, v text, PRIMARY KEY (p, c))")
    print("ok schema")

    session.execute(f"INSERT INTO {ks}.kv (k, v) VALUES (1, 'one')")
    row = session.execute(f"SELECT v FROM {ks}.kv WHERE k = 1").one()
    assert row.v == "one", row
    print("ok insert_select")

    # A value larger than a v5 segment's payload (128 KiB): both ways it crosses segments.
    large = "".join(chr(ord("a") + (i * 7919) % 26) for i in range(300_000))
    session.execute(f"INSERT INTO {ks}.kv (k, v) VALUES (4, %s)", (large,))
    assert session.execute(f"SELECT v FROM {ks}.kv WHERE k = 4").one().v == large
    print("ok large_value")

    insert = session.prepare(f"INSERT INTO {ks}.rows (p, c, v) VALUES (?, ?, ?)")
    select = session.prepare(f"SELECT v FROM {ks}.rows WHERE p = ? AND c = ?")
    # 5,000 inserts, up to 200 in flight at once on the connection.
    results = execute_concurrent_with_args(
        session, insert, [(1, c, f"v{c}") for c in range(5000)], concurrency=200
    )
    assert all(ok for ok, _ in results), [r for ok, r in results if not ok][:3]
    assert session.execute(select, (1, 4321)).one().v == "v4321"
    print("ok prepared")

    statement = SimpleStatement(f"SELECT c FROM {ks}.rows WHERE p = 1", fetch_size=100)
    result = session.execute(statement)
    sizes = [len(result.current_rows)]
    seen = list(result.current_rows)
    while result.has_more_pages:
        result.fetch_next_page()
        sizes.append(len(result.current_rows))
        seen.extend(result.current_rows)
    assert [r.c for r in seen] == list(range(5000)), len(seen)
    # Cassandra may end with an empty page after the last full one.
    full = [n for n in sizes if n]
    assert full == [100] * 50, sizes
    print(f"ok paging 5000 rows in {len(sizes)} pages")

    batch = BatchStatement()
    for k in range(10, 20):
        batch.add(insert, (2, k, "batched"))
    batch.add(SimpleStatement(f"INSERT INTO {ks}.kv (k, v) VALUES (2, 'two')"))
    session.execute(batch)
    count = session.execute(f"SELECT count(*) FROM {ks}.rows WHERE p = 2").one()[0]
    assert count == 10, count
    assert session.execute(f"SELECT v FROM {ks}.kv WHERE k = 2").one().v == "two"
    print("ok batch")

    lwt = f"INSERT INTO {ks}.kv (k, v) VALUES (3, 'first') IF NOT EXISTS"
    assert session.execute(lwt).was_applied is True
    second = session.execute(f"INSERT INTO {ks}.kv (k, v) VALUES (3, 'second') IF NOT EXISTS")
    assert second.was_applied is False
    assert second.one().v == "first"
    cas = session.execute(f"UPDATE {ks}.kv SET v = 'third' WHERE k = 3 IF v = 'first'")
    assert cas.was_applied is True
    print("ok lwt")

    try:
        session.execute(f"SELEC v FROM {ks}.kv")
        raise AssertionError("a syntax error was accepted")
    except SyntaxException as e:
        assert "SELEC" in str(e), e
    try:
        session.execute(f"SELECT v FROM {ks}.no_such_table")
        raise AssertionError("a missing table was accepted")
    except InvalidRequest as e:
        assert "no_such_table" in str(e), e
    # The connection still serves after the errors.
    assert session.execute(f"SELECT v FROM {ks}.kv WHERE k = 1").one().v == "one"
    print("ok errors")

    session.set_keyspace(ks)
    assert session.execute("SELECT v FROM kv WHERE k = 3").one().v == "third"
    print("ok use_keyspace")

    session.execute(f"DROP KEYSPACE {ks}")
    cluster.shutdown()
    print("done")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # print what failed, for the Rust test's message
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        raise
