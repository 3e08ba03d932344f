//! What drivers hide: versions, limits, stream ids, events and failures, with raw frames.

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use crate::helpers::*;

const PROTOCOL_ERROR: i32 = 0x000A;
const SERVER_ERROR: i32 = 0x0000;

#[test]
fn v6_is_refused_with_the_error_that_makes_drivers_downgrade() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, &sink()));
    let mut raw = Raw::connect(port);
    raw.send(&frame(6, 3, OPCODE_OPTIONS, b""));
    let refused = raw.read();
    assert_eq!((refused.version, refused.stream), (4, 3));
    let (code, message) = refused.error();
    assert_eq!(code, PROTOCOL_ERROR);
    assert_eq!(
        message,
        "Invalid or unsupported protocol version (6); supported versions are (3/v3, 4/v4, 5/v5)"
    );
    assert!(is_closed(&mut raw.stream, Duration::from_secs(5)));

    let mut v4 = Raw::connect(port);
    v4.send(&frame(4, 1, OPCODE_OPTIONS, b""));
    assert_eq!(v4.read().opcode, OPCODE_SUPPORTED);
    proxy.stop();
}

/// v5 by hand: the handshake in envelopes, then segments both ways (plain and LZ4, a
/// query answered by the node through the proxy); a segment whose CRC is wrong gets a
/// Protocol error, in a segment, and closes only that client.
#[test]
fn v5_segments_are_checked_and_a_corrupt_one_closes_only_its_client() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, &sink()));
    for compression in [None, Some("lz4")] {
        let mut v5 = V5::ready(port, compression);
        let answer = v5.query(1, "SELECT release_version FROM system.local");
        assert_eq!(
            (answer.version, answer.opcode),
            (5, OPCODE_RESULT),
            "{answer:?}"
        );
    }

    let mut bad = V5::ready(port, Some("lz4"));
    let mut other = V5::ready(port, None);
    let mut segment = v5_segments(&[query_v5(2, "SELECT now() FROM system.local")], true);
    let last = segment.len() - 1;
    segment[last] ^= 0x01;
    bad.raw.send(&segment);
    let refused = bad.read();
    let (code, message) = refused.error();
    assert_eq!(code, PROTOCOL_ERROR);
    assert!(message.contains("CRC mismatch"), "{message}");
    assert!(is_closed(&mut bad.raw.stream, Duration::from_secs(5)));
    let answer = other.query(3, "SELECT release_version FROM system.local");
    assert_eq!(answer.opcode, OPCODE_RESULT, "{answer:?}");
    assert_eq!(
        proxy.metric(r#"shotover_client_protocol_errors_count{source="cql"}"#),
        Some(1.0)
    );
    proxy.stop();
}

#[test]
fn an_oversized_frame_gets_a_protocol_error_and_other_clients_go_on() {
    let port = free_port();
    let topology = format!(
        "sources:\n  - Cassandra:\n      name: cql\n      listen_addr: \"127.0.0.1:{port}\"\n      max_frame_size_bytes: 4096\n      chain:\n{}",
        sink()
    );
    let proxy = Shotover::start(&topology);
    let mut other = Raw::ready(port);
    let mut big = Raw::ready(port);
    let text = format!(
        "SELECT * FROM system.local WHERE key = '{}'",
        "x".repeat(5000)
    );
    big.send(&query(9, &text));
    let refused = big.read();
    assert_eq!(refused.stream, 9);
    let (code, message) = refused.error();
    assert_eq!(code, PROTOCOL_ERROR);
    assert!(
        message.contains("exceeds maximum allowed length 4096"),
        "{message}"
    );
    assert!(is_closed(&mut big.stream, Duration::from_secs(5)));
    let answer = other.query(1, "SELECT release_version FROM system.local");
    assert_eq!(answer.opcode, OPCODE_RESULT, "{answer:?}");
    assert_eq!(
        proxy.metric(r#"shotover_client_protocol_errors_count{source="cql"}"#),
        Some(1.0)
    );
    proxy.stop();
}

#[test]
fn an_incomplete_frame_over_the_process_request_budget_gets_a_protocol_error_on_its_stream() {
    let port = free_port();
    let proxy = Shotover::start_with_config(
        &topology(port, &sink()),
        "max_buffered_request_bytes: 1048576\n",
    );
    let mut other = Raw::ready(port);
    let mut big = Raw::ready(port);
    // A QUERY declaring a 4 MiB body, of which 2 MiB arrive: past the 1 MiB budget.
    let mut head = frame(4, 11, OPCODE_QUERY, &[]);
    head[5..9].copy_from_slice(&(4 * 1024 * 1024i32).to_be_bytes());
    big.send(&head);
    let _ = std::io::Write::write_all(&mut big.stream, &vec![0u8; 2 * 1024 * 1024]);
    let refused = big.read();
    assert_eq!(refused.stream, 11);
    let (code, message) = refused.error();
    assert_eq!(code, PROTOCOL_ERROR);
    assert!(
        message.contains("over its max_buffered_request_bytes of 1048576"),
        "{message}"
    );
    assert!(is_closed(&mut big.stream, Duration::from_secs(5)));
    let answer = other.query(1, "SELECT release_version FROM system.local");
    assert_eq!(answer.opcode, OPCODE_RESULT, "{answer:?}");
    assert_eq!(
        proxy.metric("shotover_buffered_request_budget_refusals_count"),
        Some(1.0)
    );
    proxy.stop();
}

#[test]
fn stream_ids_are_kept_and_pipelined_answers_find_their_requests() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, &sink()));
    let mut raw = Raw::ready(port);
    let streams = [7i16, 1000, 32000, 2];
    let mut batch = Vec::new();
    for s in streams {
        batch.extend(query(
            s,
            &format!("SELECT release_version AS stream{s} FROM system.local"),
        ));
    }
    raw.send(&batch);
    let mut seen: Vec<i16> = (0..streams.len())
        .map(|_| raw.read())
        .map(|f| {
            assert_eq!(f.opcode, OPCODE_RESULT, "{f:?}");
            // Each answer carries its own query's column.
            let marker = format!("stream{}", f.stream);
            assert!(
                String::from_utf8_lossy(&f.body).contains(&marker),
                "stream {} got another query's answer",
                f.stream
            );
            f.stream
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![2, 7, 1000, 32000]);
    proxy.stop();
}

#[test]
fn schema_events_flow_back_to_a_client_that_registered() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, &sink()));
    let mut listener = Raw::ready(port);
    listener.send(&register(1, &["SCHEMA_CHANGE"]));
    assert_eq!(listener.read().opcode, OPCODE_READY);

    let ks = keyspace("events");
    let mut other = Raw::ready(port);
    let created = other.query(
        1,
        &format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
    );
    assert_eq!(created.opcode, OPCODE_RESULT, "{created:?}");
    // Other tests change the schema too: read events until ours (each read fails after 20 s).
    loop {
        let event = listener.read();
        assert_eq!((event.stream, event.opcode), (-1, OPCODE_EVENT));
        let body = String::from_utf8_lossy(&event.body).to_string();
        assert!(body.contains("SCHEMA_CHANGE"), "{body}");
        if body.contains(&ks) {
            break;
        }
    }
    other.query(2, &format!("DROP KEYSPACE {ks}"));
    proxy.stop();
}

#[test]
fn an_unreachable_node_gets_server_errors_and_the_client_stays_connected() {
    let port = free_port();
    let dead = format!("127.0.0.1:{}", free_port());
    let chain = format!(
        "        - CassandraSinkSingle:\n            remote_address: \"{dead}\"\n            connect_timeout_ms: 500\n"
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let mut raw = Raw::connect(port);
    for stream in [1, 2] {
        raw.send(&startup(stream));
        let answer = raw.read();
        assert_eq!(answer.stream, stream);
        let (code, message) = answer.error();
        assert_eq!(code, SERVER_ERROR);
        assert!(
            message.contains(&format!("upstream {dead} is unreachable")),
            "{message}"
        );
    }
    assert_eq!(
        proxy.metric(
            r#"shotover_failed_requests_count{chain="cql",transform="CassandraSinkSingle"}"#
        ),
        Some(2.0)
    );
    proxy.stop();
}

#[test]
fn a_node_that_drops_the_connection_fails_requests_in_flight_and_closes_the_client() {
    // A node that takes the connection and the first request, then goes away: a failure a
    // real node cannot be made to show on cue.
    let node = TcpListener::bind("127.0.0.1:0").expect("bind");
    let node_addr = node.local_addr().expect("addr");
    let dropper = std::thread::spawn(move || {
        let (mut conn, _) = node.accept().expect("accept");
        let mut buf = [0u8; 64];
        let _ = conn.read(&mut buf);
    });
    let port = free_port();
    let chain =
        format!("        - CassandraSinkSingle:\n            remote_address: \"{node_addr}\"\n");
    let proxy = Shotover::start(&topology(port, &chain));
    let mut raw = Raw::connect(port);
    raw.send(&startup(5));
    let answer = raw.read();
    assert_eq!(answer.stream, 5);
    let (code, message) = answer.error();
    assert_eq!(code, SERVER_ERROR);
    assert!(message.contains("closed the connection"), "{message}");
    assert!(is_closed(&mut raw.stream, Duration::from_secs(5)));
    dropper.join().expect("node thread");
    proxy.stop_expecting(&["upstream connection broke"]);
}

#[test]
fn a_node_that_stops_answering_fails_requests_after_the_read_timeout() {
    // A node that takes requests and never answers: a stuck node on cue.
    let node = TcpListener::bind("127.0.0.1:0").expect("bind");
    let node_addr = node.local_addr().expect("addr");
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let silent = std::thread::spawn(move || {
        let (mut conn, _) = node.accept().expect("accept");
        let mut buf = [0u8; 64];
        let _ = conn.read(&mut buf);
        // Hold the connection open until the test is done.
        let _ = done_rx.recv_timeout(Duration::from_secs(30));
    });
    let port = free_port();
    let chain = format!(
        "        - CassandraSinkSingle:\n            remote_address: \"{node_addr}\"\n            read_timeout: 1\n"
    );
    let proxy = Shotover::start(&topology(port, &chain));
    let mut raw = Raw::connect(port);
    raw.send(&startup(4));
    let answer = raw.read();
    assert_eq!(answer.stream, 4);
    let (code, message) = answer.error();
    assert_eq!(code, SERVER_ERROR);
    assert!(
        message.contains("no answer within the read_timeout of 1 s"),
        "{message}"
    );
    assert!(is_closed(&mut raw.stream, Duration::from_secs(5)));
    let _ = done_tx.send(());
    silent.join().expect("node thread");
    proxy.stop_expecting(&["upstream connection broke"]);
}

#[test]
fn sigterm_waits_for_the_answers_of_requests_in_flight() {
    // A node that answers STARTUP with READY only when the test says so: a slow answer on cue.
    let node = TcpListener::bind("127.0.0.1:0").expect("bind");
    let node_addr = node.local_addr().expect("addr");
    let (got_request, request_seen) = std::sync::mpsc::channel::<()>();
    let (answer_now, answer) = std::sync::mpsc::channel::<()>();
    let slow = std::thread::spawn(move || {
        use std::io::Write;
        let (mut conn, _) = node.accept().expect("accept");
        let mut header = [0u8; 9];
        conn.read_exact(&mut header).expect("a request header");
        let len = i32::from_be_bytes(header[5..9].try_into().expect("4")) as usize;
        let mut body = vec![0; len];
        conn.read_exact(&mut body).expect("its body");
        got_request.send(()).expect("test alive");
        answer
            .recv_timeout(Duration::from_secs(20))
            .expect("the test's go");
        let mut ready = vec![0x84, 0];
        ready.extend_from_slice(&header[2..4]);
        ready.extend([OPCODE_READY, 0, 0, 0, 0]);
        conn.write_all(&ready).expect("READY");
        let _ = conn.read(&mut [0u8; 16]);
    });
    let port = free_port();
    let chain =
        format!("        - CassandraSinkSingle:\n            remote_address: \"{node_addr}\"\n");
    let mut proxy = Shotover::start(&topology(port, &chain));
    let mut raw = Raw::connect(port);
    raw.send(&startup(6));
    request_seen
        .recv_timeout(Duration::from_secs(10))
        .expect("the request reached the node");
    proxy.terminate();
    proxy.wait_for_log("shutting down");
    answer_now.send(()).expect("node thread alive");
    let ready = raw.read();
    assert_eq!((ready.stream, ready.opcode), (6, OPCODE_READY));
    assert!(proxy.wait_exit(Duration::from_secs(20)).success());
    slow.join().expect("node thread");
}

#[test]
fn an_idle_cql_client_is_closed_after_the_source_timeout() {
    let port = free_port();
    let topology = format!(
        "sources:\n  - Cassandra:\n      name: cql\n      listen_addr: \"127.0.0.1:{port}\"\n      timeout: 1\n      chain:\n{}",
        sink()
    );
    let proxy = Shotover::start(&topology);
    let mut idle = Raw::ready(port);
    assert!(
        is_closed(&mut idle.stream, Duration::from_secs(10)),
        "an idle client is closed after `timeout`"
    );
    // A client that keeps talking is not: it stays open across 4 × 0.4 s.
    let mut busy = Raw::ready(port);
    for stream in 1..=4 {
        assert!(!is_closed(&mut busy.stream, Duration::from_millis(400)));
        busy.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let answer = busy.query(stream, "SELECT release_version FROM system.local");
        assert_eq!(answer.opcode, OPCODE_RESULT, "{answer:?}");
    }
    proxy.stop();
}
