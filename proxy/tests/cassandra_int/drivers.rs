//! Real drivers through the proxy to a real Cassandra.

use scylla::client::Compression;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::statement::Statement;
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::{CqlValue, Row};

use crate::helpers::*;

/// No protocol version given: the driver ends at v5, Cassandra's highest, and keeps it (the
/// proxy serves v5 segments), and v4 still works when asked for.
#[test]
fn the_python_driver_negotiates_v5_and_runs_a_full_workout() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, &sink()));
    let addr = format!("127.0.0.1:{port}");
    let out = workout(&addr, "negotiates", &[]);
    assert!(out.contains("protocol 5"), "{out}");
    // (It tries DSE's v66 and v65 first, which Cassandra refuses too.)
    assert!(
        !out.contains("Downgrading core protocol version from 5"),
        "{out}"
    );
    let out = workout(&addr, "pinned_v4", &["--protocol", "4"]);
    assert!(out.contains("protocol 4"), "{out}");
    proxy.stop();
}

#[test]
fn lz4_and_snappy_sessions_work_and_their_queries_are_read() {
    let port = free_port();
    let chain = format!(
        "        - QueryCounter: {{counter_name: compressed}}\n{}",
        sink()
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let addr = format!("127.0.0.1:{port}");
    workout(&addr, "lz4", &["--compression", "lz4", "--protocol", "4"]);
    let lz4_selects = proxy
        .metric(r#"shotover_query_count{name="compressed",query="SELECT",type="cassandra"}"#)
        .expect("SELECTs counted under LZ4");
    // v5 with LZ4: the segments are decompressed and their queries read.
    let out = workout(
        &addr,
        "lz4_v5",
        &["--compression", "lz4", "--protocol", "5"],
    );
    assert!(out.contains("protocol 5"), "{out}");
    let v5_selects = proxy
        .metric(r#"shotover_query_count{name="compressed",query="SELECT",type="cassandra"}"#)
        .expect("SELECTs counted under LZ4");
    assert!(
        v5_selects - lz4_selects >= 5.0,
        "{v5_selects} SELECTs after v5, {lz4_selects} before"
    );
    let lz4_selects = v5_selects;
    workout(
        &addr,
        "snappy",
        &["--compression", "snappy", "--protocol", "3"],
    );
    let all_selects = proxy
        .metric(r#"shotover_query_count{name="compressed",query="SELECT",type="cassandra"}"#)
        .expect("SELECTs counted");
    assert!(lz4_selects >= 5.0, "{lz4_selects}");
    // The workout's own SELECTs under Snappy are read too. (How many SELECTs of the system
    // tables a driver sends depends on the schema events of other tests on the same node,
    // so the two runs are not compared with each other.)
    assert!(
        all_selects - lz4_selects >= 5.0,
        "{all_selects} SELECTs in all, {lz4_selects} under LZ4"
    );
    // Every compressed QUERY was decompressed and read: none fell back to `unknown`.
    assert!(
        !proxy.metrics().contains(r#"query="unknown""#),
        "{}",
        proxy.metrics()
    );
    proxy.stop();
}

/// Every envelope both ways has its header encoded again and its body decompressed and
/// compressed again by the proxy (upstream's `cassandra/passthrough/topology-encode.yaml`):
/// the driver's workouts under LZ4 and Snappy pass all the same.
#[test]
fn workouts_pass_with_every_envelope_re_encoded_under_lz4_and_snappy() {
    let port = free_port();
    let chain = format!(
        "        - DebugForceEncode: {{name: encode, encode_requests: true, encode_responses: true}}\n{}",
        sink()
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let addr = format!("127.0.0.1:{port}");
    workout(
        &addr,
        "encode-lz4",
        &["--compression", "lz4", "--protocol", "4"],
    );
    workout(
        &addr,
        "encode-snappy",
        &["--compression", "snappy", "--protocol", "3"],
    );
    workout(
        &addr,
        "encode-lz4-v5",
        &["--compression", "lz4", "--protocol", "5"],
    );
    assert_eq!(
        proxy.metric(r#"shotover_debug_force_unparsed_count{chain="cql",transform="encode"}"#),
        Some(0.0),
        "{}",
        proxy.metrics()
    );
    proxy.stop();
}

#[test]
fn password_auth_and_tls_between_client_proxy_and_node() {
    let node = auth_tls();
    let port = free_port();
    let topology = format!(
        "sources:\n  - Cassandra:\n      name: cql\n      listen_addr: \"127.0.0.1:{port}\"\n      tls:\n        certificate_path: \"{dir}/server.crt\"\n        private_key_path: \"{dir}/server.key\"\n      chain:\n        - CassandraSinkSingle:\n            remote_address: \"{addr}\"\n            tls:\n              certificate_authority_path: \"{ca}\"\n",
        dir = node.dir,
        addr = node.addr,
        ca = node.ca,
    );
    let proxy = Shotover::start(&topology);
    let addr = format!("127.0.0.1:{port}");
    // v5 (the driver's default): AUTHENTICATE switches the connection to LZ4 segments,
    // inside TLS on both sides.
    let out = workout(
        &addr,
        "auth_tls",
        &[
            "--user",
            &node.user,
            "--password",
            &node.password,
            "--ca",
            &node.ca,
            "--compression",
            "lz4",
        ],
    );
    assert!(out.contains("protocol 5"), "{out}");
    let wrong = python_in(
        "tests/cassandra_int/py",
        "login.py",
        &[&addr, &node.user, "not-the-password", &node.ca],
    );
    assert!(
        wrong.contains("auth failed")
            && wrong.contains("Provided username cassandra and/or password are incorrect"),
        "{wrong}"
    );
    proxy.stop();
}

/// `[applied]` and the row of an LWT result.
fn lwt_row(result: scylla::response::query_result::QueryResult) -> Vec<Option<CqlValue>> {
    result
        .into_rows_result()
        .expect("an LWT returns rows")
        .first_row::<Row>()
        .expect("one row")
        .columns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_scylla_driver_runs_a_full_workout_with_lz4() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, &sink()));
    let session: Session = SessionBuilder::new()
        .known_node(format!("127.0.0.1:{port}"))
        .compression(Some(Compression::Lz4))
        .build()
        .await
        .expect("the scylla driver connects through the proxy");
    let ks = keyspace("scylla");
    session
        .query_unpaged(
            format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
            &[],
        )
        .await
        .expect("create keyspace");
    session
        .query_unpaged(
            format!("CREATE TABLE {ks}.rows (p int, c int, v text, PRIMARY KEY (p, c))"),
            &[],
        )
        .await
        .expect("create table");

    // Prepared inserts, many in flight at once on the driver's connection.
    let insert = session
        .prepare(format!("INSERT INTO {ks}.rows (p, c, v) VALUES (?, ?, ?)"))
        .await
        .expect("prepare");
    for chunk in (0..5000).collect::<Vec<i32>>().chunks(500) {
        let writes = chunk
            .iter()
            .map(|c| session.execute_unpaged(&insert, (1, *c, format!("v{c}"))));
        for result in futures_util::future::join_all(writes).await {
            result.expect("insert");
        }
    }
    let select = session
        .prepare(format!("SELECT v FROM {ks}.rows WHERE p = ? AND c = ?"))
        .await
        .expect("prepare select");
    let (v,): (String,) = session
        .execute_unpaged(&select, (1, 4321))
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows")
        .single_row()
        .expect("one row");
    assert_eq!(v, "v4321");

    // Paging: 5,000 rows, 100 a page, the paging state carried through the proxy.
    let mut statement = Statement::new(format!("SELECT c FROM {ks}.rows WHERE p = 1"));
    statement.set_page_size(100);
    let mut paging = PagingState::start();
    let mut seen = Vec::new();
    let mut full_pages = 0;
    loop {
        let (result, next) = session
            .query_single_page(statement.clone(), &[], paging)
            .await
            .expect("a page");
        let rows = result.into_rows_result().expect("rows");
        if rows.rows_num() > 0 {
            assert_eq!(rows.rows_num(), 100);
            full_pages += 1;
        }
        for row in rows.rows::<(i32,)>().expect("typed rows") {
            seen.push(row.expect("row").0);
        }
        match next {
            PagingStateResponse::HasMorePages { state } => paging = state,
            PagingStateResponse::NoMorePages => break,
        }
    }
    assert_eq!(full_pages, 50);
    assert_eq!(seen, (0..5000).collect::<Vec<_>>());

    // A logged batch.
    let mut batch = Batch::new(BatchType::Logged);
    for _ in 0..10 {
        batch.append_statement(insert.clone());
    }
    let values: Vec<(i32, i32, &str)> = (0..10).map(|c| (2, c, "batched")).collect();
    session.batch(&batch, values).await.expect("batch");
    let (count,): (i64,) = session
        .query_unpaged(format!("SELECT count(*) FROM {ks}.rows WHERE p = 2"), &[])
        .await
        .expect("count")
        .into_rows_result()
        .expect("rows")
        .single_row()
        .expect("one row");
    assert_eq!(count, 10);

    // A lightweight transaction, applied once.
    let lwt = format!("INSERT INTO {ks}.rows (p, c, v) VALUES (3, 0, 'first') IF NOT EXISTS");
    let first = lwt_row(session.query_unpaged(lwt.clone(), &[]).await.expect("lwt"));
    assert_eq!(first[0].as_ref().and_then(CqlValue::as_boolean), Some(true));
    let second = lwt_row(session.query_unpaged(lwt, &[]).await.expect("lwt"));
    assert_eq!(
        second[0].as_ref().and_then(CqlValue::as_boolean),
        Some(false)
    );

    // A syntax error comes back as one, and the session goes on.
    let error = session
        .query_unpaged(format!("SELEC v FROM {ks}.rows"), &[])
        .await
        .expect_err("a syntax error");
    assert!(error.to_string().contains("syntax error"), "{error}");
    session
        .query_unpaged(format!("DROP KEYSPACE {ks}"), &[])
        .await
        .expect("drop keyspace");
    drop(session);
    proxy.stop();
}

/// A reload of the topology moves the scylla driver's open connections (LZ4, a keyspace
/// chosen with `USE`, prepared statements) to the new chain without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_driver_connections_move_to_a_reloaded_chain_with_their_keyspace() {
    let port = free_port();
    let proxy = Shotover::spawn(
        &topology(port, &sink()),
        &["--watch-interval-ms", "50", "--reload-drain-seconds", "30"],
    );
    proxy.wait_ready();
    let session: Session = SessionBuilder::new()
        .known_node(format!("127.0.0.1:{port}"))
        .compression(Some(Compression::Lz4))
        .build()
        .await
        .expect("the scylla driver connects through the proxy");
    let ks = keyspace("reload");
    session
        .query_unpaged(
            format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
            &[],
        )
        .await
        .expect("create keyspace");
    session.use_keyspace(&ks, false).await.expect("USE");
    session
        .query_unpaged("CREATE TABLE kv (k int PRIMARY KEY, v text)", &[])
        .await
        .expect("create table");
    let insert = session
        .prepare("INSERT INTO kv (k, v) VALUES (?, ?)")
        .await
        .expect("prepare");
    session
        .execute_unpaged(&insert, (1, "before"))
        .await
        .expect("insert before");

    let counted = topology(
        port,
        &format!(
            "        - QueryCounter: {{ counter_name: \"after\" }}\n{}",
            sink()
        ),
    );
    proxy.rewrite_topology(&counted);
    proxy.wait_metric("shotover_config_reloads_count{result=\"applied\"}", |v| {
        v == 1.0
    });
    let counted_requests =
        |proxy: &Shotover| proxy.metric_sum("shotover_query_count{name=\"after\"");
    // Unqualified statements after the move: the keyspace was set again on the new chain.
    for i in 0..20 {
        session
            .execute_unpaged(&insert, (i, "after"))
            .await
            .expect("a prepared insert after the reload");
        let (v,): (String,) = session
            .query_unpaged(format!("SELECT v FROM kv WHERE k = {i}"), &[])
            .await
            .expect("an unqualified select after the reload")
            .into_rows_result()
            .expect("rows")
            .single_row()
            .expect("one row");
        assert_eq!(v, "after");
    }
    assert!(
        counted_requests(&proxy) >= 40.0,
        "the requests went through the new chain: {}",
        counted_requests(&proxy)
    );
    proxy.wait_metric("shotover_connections_draining_count{source=\"cql\"}", |v| {
        v == 0.0
    });
    assert!(
        proxy
            .metric("shotover_connections_moved_count{source=\"cql\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        proxy
            .metric("shotover_connections_retired_count{source=\"cql\"}")
            .unwrap_or(0.0),
        0.0
    );
    proxy.stop();
}
