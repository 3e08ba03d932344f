//! Transforms on CQL traffic.

use std::time::Duration;

use crate::helpers::*;

const SERVER_ERROR: i32 = 0x0000;
const OVERLOADED: i32 = 0x1001;
const OPCODE_PREPARE: u8 = 0x09;
const OPCODE_EXECUTE: u8 = 0x0A;

fn prepare(stream: i16, cql: &str) -> Vec<u8> {
    let mut body = (cql.len() as i32).to_be_bytes().to_vec();
    body.extend(cql.as_bytes());
    frame(4, stream, OPCODE_PREPARE, &body)
}

fn execute(stream: i16, id: &[u8]) -> Vec<u8> {
    let mut body = (id.len() as u16).to_be_bytes().to_vec();
    body.extend(id);
    body.extend([0, 1, 0]);
    frame(4, stream, OPCODE_EXECUTE, &body)
}

/// The id in a RESULT of kind Prepared.
fn prepared_id(result: &Frame) -> Vec<u8> {
    assert_eq!(result.opcode, OPCODE_RESULT, "{result:?}");
    assert_eq!(&result.body[0..4], &4i32.to_be_bytes(), "not Prepared");
    let len = u16::from_be_bytes([result.body[4], result.body[5]]) as usize;
    result.body[6..6 + len].to_vec()
}

fn prepare_on(raw: &mut Raw, stream: i16, cql: &str) -> Frame {
    raw.send(&prepare(stream, cql));
    raw.read()
}

#[test]
fn query_type_filter_refuses_cql_writes_by_statement_and_by_prepared_id() {
    let ks = keyspace("filter");
    // The schema and a prepared INSERT are made on the node directly.
    let node_port: u16 = cassandra_addr()
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("CASSANDRA_PLAIN_ADDR is host:port");
    let mut direct = Raw::ready(node_port);
    direct.query(1, &format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"));
    direct.query(
        2,
        &format!("CREATE TABLE {ks}.kv (k int PRIMARY KEY, v int)"),
    );
    let insert_id = prepared_id(&prepare_on(
        &mut direct,
        3,
        &format!("INSERT INTO {ks}.kv (k, v) VALUES (1, 1)"),
    ));

    let port = free_port();
    let chain = format!(
        "        - QueryTypeFilter:\n            DenyList: [Write]\n{}",
        sink()
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let mut raw = Raw::ready(port);
    let read = raw.query(1, &format!("SELECT v FROM {ks}.kv"));
    assert_eq!(read.opcode, OPCODE_RESULT, "{read:?}");
    let filtered = |f: &Frame| {
        let (code, message) = f.error();
        assert_eq!(code, SERVER_ERROR);
        assert_eq!(message, "Message was filtered out by shotover");
    };
    filtered(&raw.query(2, &format!("INSERT INTO {ks}.kv (k, v) VALUES (2, 2)")));
    filtered(&prepare_on(
        &mut raw,
        3,
        &format!("UPDATE {ks}.kv SET v = 3 WHERE k = 3"),
    ));
    // A SELECT prepared through the proxy is remembered as a read and executes.
    let select_id = prepared_id(&prepare_on(&mut raw, 4, &format!("SELECT v FROM {ks}.kv")));
    raw.send(&execute(5, &select_id));
    assert_eq!(raw.read().opcode, OPCODE_RESULT);
    // An id the filter never saw prepared counts as a write.
    raw.send(&execute(6, &insert_id));
    filtered(&raw.read());
    let rows = direct.query(4, &format!("SELECT count(*) FROM {ks}.kv"));
    assert_eq!(
        &rows.body[rows.body.len() - 8..],
        &0i64.to_be_bytes(),
        "nothing was written"
    );
    direct.query(5, &format!("DROP KEYSPACE {ks}"));
    proxy.stop();
}

#[test]
fn request_throttling_answers_overloaded_beyond_its_rate() {
    let port = free_port();
    let chain = format!(
        "        - RequestThrottling:\n            max_requests_per_second: 10\n{}",
        sink()
    );
    let proxy = Shotover::start(&topology(port, &chain));
    // STARTUP is connection control: never throttled.
    let mut raw = Raw::ready(port);
    let mut batch = Vec::new();
    for stream in 1..=40 {
        batch.extend(query(stream, "SELECT release_version FROM system.local"));
    }
    raw.send(&batch);
    let (mut answered, mut overloaded) = (0, 0);
    for _ in 0..40 {
        let f = raw.read();
        if f.opcode == OPCODE_RESULT {
            answered += 1;
        } else {
            let (code, message) = f.error();
            assert_eq!(code, OVERLOADED, "{message}");
            assert!(
                message.contains("lets 10 requests per second through"),
                "{message}"
            );
            overloaded += 1;
        }
    }
    assert!(answered >= 10, "the first 10 of a burst pass: {answered}");
    assert!(overloaded >= 1, "{answered} answered, none refused");
    assert_eq!(
        proxy.metric(
            r#"shotover_throttled_requests_count{chain="cql",transform="RequestThrottling"}"#
        ),
        Some(overloaded as f64)
    );
    proxy.stop();
}

#[test]
fn tee_sends_cql_down_its_chain_too_and_coalesce_and_debug_printer_pass_it_on() {
    let port = free_port();
    let chain = format!(
        "        - DebugPrinter\n        - Coalesce:\n            flush_when_millis_since_last_flush: 10\n        - Tee:\n            chain:\n              - QueryCounter: {{counter_name: teed}}\n              - CassandraSinkSingle:\n                  remote_address: \"{}\"\n{}",
        cassandra_addr(),
        sink()
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let mut raw = Raw::ready(port);
    let answer = raw.query(1, "SELECT release_version FROM system.local");
    assert_eq!(answer.opcode, OPCODE_RESULT, "{answer:?}");
    wait_until(
        "the tee chain to see the SELECT",
        Duration::from_secs(10),
        || {
            proxy.metric(r#"shotover_query_count{name="teed",query="SELECT",type="cassandra"}"#)
                == Some(1.0)
        },
    );
    proxy.wait_for_log(r#"QUERY "SELECT release_version FROM system.local""#);
    proxy.wait_for_log("RESULT Rows");
    proxy.stop();
}

/// A Tee on v5: the tee chain's own connection switches to segments when its node answers
/// the client's STARTUP, and follows the whole workout, LZ4 included. (It gets the reads
/// only: it talks to the same node, and the workout's DDL would race.)
#[test]
fn a_tee_chain_follows_a_v5_session_in_segments() {
    let port = free_port();
    let chain = format!(
        "        - Tee:\n            chain:\n              - QueryTypeFilter: {{AllowList: [Read]}}\n              - DebugPrinter\n              - QueryCounter: {{counter_name: teed}}\n              - CassandraSinkSingle:\n                  name: tee-sink\n                  remote_address: \"{}\"\n{}",
        cassandra_addr(),
        sink()
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let out = workout(
        &format!("127.0.0.1:{port}"),
        "tee_v5",
        &["--compression", "lz4", "--protocol", "5"],
    );
    assert!(out.contains("protocol 5"), "{out}");
    let teed = proxy
        .metric(r#"shotover_query_count{name="teed",query="SELECT",type="cassandra"}"#)
        .unwrap_or(0.0);
    assert!(teed >= 5.0, "{}", proxy.metrics());
    // The tee chain's node answered its SELECTs (only the tee chain prints): its connection
    // follows the session in segments.
    proxy.wait_for_log("RESULT Rows");
    // (DebugPrinter prints the node's ERROR answers to the workout's bad queries.)
    proxy.stop_expecting(&["debug_printer"]);
}

#[test]
fn null_sink_answers_cql_with_a_server_error() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, "        - NullSink\n"));
    let mut raw = Raw::connect(port);
    raw.send(&startup(3));
    let answer = raw.read();
    assert_eq!(answer.stream, 3);
    assert_eq!(
        answer.error(),
        (
            SERVER_ERROR,
            "Handled by shotover null transform".to_string()
        )
    );
    proxy.stop();
}

/// The `native_port` values of a `SELECT native_port FROM system.peers_v2` answer, read by
/// hand (one int column, global table spec, no paging state).
fn native_ports(answer: &Frame) -> Vec<i32> {
    assert_eq!(answer.opcode, OPCODE_RESULT, "{answer:?}");
    let b = &answer.body;
    let int = |at: usize| i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let short = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]) as usize;
    assert_eq!(int(0), 2, "Rows");
    assert_eq!(int(4), 1, "global table spec only");
    assert_eq!(int(8), 1, "one column");
    let mut at = 12;
    for _ in 0..3 {
        at += 2 + short(at); // keyspace, table, column name
    }
    assert_eq!(short(at), 0x0009, "an int column");
    at += 2;
    let rows = int(at) as usize;
    at += 4;
    (0..rows)
        .map(|i| {
            assert_eq!(int(at + i * 8), 4);
            int(at + i * 8 + 4)
        })
        .collect()
}

#[test]
fn peers_rewrite_gives_drivers_the_proxy_port_of_the_other_node() {
    let node = |var: &str| {
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: start the two-node cluster with `eval \"$(e2e/services up cassandra-pair)\"` (the test command does this)")
        })
    };
    let (first, second) = (node("CASSANDRA_PAIR_1_ADDR"), node("CASSANDRA_PAIR_2_ADDR"));
    let port_of = |addr: &str| -> u16 {
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("host:port")
    };
    // The node itself lists its peer with the peer's own port (once gossip has met it).
    let mut direct = Raw::ready(port_of(&first));
    wait_until(
        "pair-1 to list pair-2 in system.peers_v2",
        Duration::from_secs(60),
        || {
            native_ports(&direct.query(1, "SELECT native_port FROM system.peers_v2"))
                == vec![i32::from(port_of(&second))]
        },
    );

    let port = free_port();
    let chain = format!(
        "        - CassandraPeersRewrite:\n            port: {port}\n        - CassandraSinkSingle:\n            remote_address: \"{first}\"\n"
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let mut raw = Raw::ready(port);
    let answer = raw.query(1, "SELECT native_port FROM system.peers_v2");
    assert_eq!(native_ports(&answer), vec![i32::from(port)]);
    // Other tables and other queries are untouched.
    let local = raw.query(2, "SELECT release_version FROM system.local");
    assert_eq!(local.opcode, OPCODE_RESULT);
    assert!(
        String::from_utf8_lossy(&local.body).contains("5.0"),
        "{local:?}"
    );
    proxy.stop();
}
