//! Faults between the proxy and a real Cassandra, injected by a relay (`support/fault.rs`):
//! an answer cut at every byte (FIN and RST), the node killed and back mid-pipeline, a node
//! answering a byte at a time, and real packet loss with latency. For each: every stream
//! gets its own answer or a Server error, never another stream's answer; what Cassandra
//! acknowledged is in Cassandra; other clients are served; the proxy serves again when the
//! node is back.

use std::io::Read;
use std::time::Duration;

use crate::fault::{Faults, PacketLoss, Relay};
use crate::helpers::*;

const SERVER_ERROR: i32 = 0x0000;

/// The WARN lines a broken node connection logs.
const BROKE: &[&str] = &["upstream connection broke"];

fn through(relay: &Relay) -> (u16, Shotover) {
    let port = free_port();
    let chain = format!(
        "        - CassandraSinkSingle:\n            remote_address: \"{}\"\n",
        relay.address()
    );
    (port, Shotover::start(&topology(port, &chain)))
}

/// Frames until the proxy closes the connection (or `count` arrived), and whether it closed.
fn read_until_closed(raw: &mut Raw, count: usize) -> (Vec<Frame>, bool) {
    let mut frames = Vec::new();
    while frames.len() < count {
        let mut header = [0u8; 9];
        match raw.stream.read_exact(&mut header) {
            Ok(()) => {}
            // Raw's read timeout: still open.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (frames, false);
            }
            Err(_) => return (frames, true),
        }
        let len = i32::from_be_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0; len];
        raw.stream
            .read_exact(&mut body)
            .expect("a whole body after its header");
        frames.push(Frame {
            version: header[0] & 0x7F,
            stream: i16::from_be_bytes([header[2], header[3]]),
            opcode: header[4],
            body,
        });
    }
    (frames, false)
}

fn four_queries() -> Vec<u8> {
    (1..=4i16)
        .flat_map(|s| {
            query(
                s,
                &format!("SELECT release_version AS stream{s} FROM system.local"),
            )
        })
        .collect()
}

/// The node's answers to a STARTUP and then four pipelined queries, cut at every byte: each
/// answer that arrived whole reaches its own stream, every other stream gets a Server error
/// naming the node, and the client is closed (its session lived on that connection).
#[test]
fn an_answer_cut_at_every_byte_fails_exactly_the_unanswered_streams() {
    let relay = Relay::start(&cassandra_addr());
    let (port, proxy) = through(&relay);
    // A clean run: READY, then four answers of one length (their markers are as long).
    let mut raw = Raw::ready(port);
    raw.send(&four_queries());
    let answers: Vec<Frame> = (0..4).map(|_| raw.read()).collect();
    let answer_len = 9 + answers[0].body.len();
    assert!(
        answers
            .iter()
            .all(|a| a.opcode == OPCODE_RESULT && 9 + a.body.len() == answer_len)
    );
    let total = relay.bytes_from_upstream(0);
    assert_eq!(total, 9 + 4 * answer_len, "READY and four answers");
    drop(raw);
    for cut in 0..total {
        relay.fault_next(Faults {
            cut_after: Some(cut),
            reset: cut % 2 == 1,
            ..Faults::default()
        });
        let what = format!("cut after byte {cut} of {total}");
        let mut raw = Raw::connect(port);
        // As drivers do: the queries wait for READY (Cassandra drops requests pipelined
        // behind a STARTUP).
        raw.send(&startup(0));
        let (ready, closed) = read_until_closed(&mut raw, 1);
        let ready = ready
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{what}: no answer to STARTUP"));
        if cut < 9 {
            // READY was cut: the STARTUP gets a Server error and the client is closed.
            assert_eq!(ready.stream, 0, "{what}");
            let (code, message) = ready.error();
            assert_eq!(code, SERVER_ERROR, "{what}: {message}");
            assert!(message.contains("upstream"), "{what}: {message}");
            let (_, closed_now) = read_until_closed(&mut raw, 1);
            assert!(closed || closed_now, "{what}: the client stays open");
            continue;
        }
        assert_eq!(ready.opcode, OPCODE_READY, "{what}: {ready:?}");
        // Writing may fail once the proxy closed the client (a cut right after READY).
        let _ = std::io::Write::write_all(&mut raw.stream, &four_queries());
        let (frames, closed) = read_until_closed(&mut raw, 5);
        let (_, closed_now) = read_until_closed(&mut raw, 1);
        assert!(
            closed || closed_now,
            "{what}: the client stays open: {frames:?}"
        );
        let mut streams: Vec<i16> = frames.iter().map(|f| f.stream).collect();
        streams.sort_unstable();
        streams.dedup();
        assert_eq!(
            streams.len(),
            frames.len(),
            "{what}: a stream answered twice"
        );
        let whole = (cut - 9) / answer_len;
        if cut > 9 {
            // The queries reached the node before the cut: each stream is answered once.
            assert_eq!(streams, [1, 2, 3, 4], "{what}: {frames:?}");
        }
        let mut results = 0;
        for f in &frames {
            if f.opcode == OPCODE_RESULT {
                results += 1;
                let marker = format!("stream{}", f.stream);
                assert!(
                    String::from_utf8_lossy(&f.body).contains(&marker),
                    "{what}: stream {} got another query's answer",
                    f.stream
                );
            } else {
                let (code, message) = f.error();
                assert_eq!(code, SERVER_ERROR, "{what}: {message}");
                assert!(message.contains("upstream"), "{what}: {message}");
            }
        }
        assert_eq!(results, whole, "{what}: {frames:?}");
    }
    // Another client is served as before.
    let mut raw = Raw::ready(port);
    assert_eq!(
        raw.query(9, "SELECT release_version FROM system.local")
            .opcode,
        OPCODE_RESULT
    );
    proxy.stop_expecting(BROKE);
}

/// A client pipelines 2,000 INSERTs while the node dies (every connection reset, new ones
/// refused) and comes back: each stream gets its own answer or a Server error; every
/// acknowledged INSERT is in Cassandra; a new client is served once the node is back.
#[test]
fn the_node_killed_mid_pipeline_and_back_loses_no_acknowledged_write() {
    let relay = Relay::start(&cassandra_addr());
    let (port, proxy) = through(&relay);
    let ks = keyspace("cql-kill");
    let mut setup = Raw::ready(port);
    for (s, cql) in [
        format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
        format!("CREATE TABLE {ks}.t (k int PRIMARY KEY, v int)"),
    ]
    .iter()
    .enumerate()
    {
        let answer = setup.query(s as i16 + 1, cql);
        assert_eq!(answer.opcode, OPCODE_RESULT, "{cql}: {answer:?}");
    }
    drop(setup);
    let mut raw = Raw::ready(port);
    const N: i16 = 2000;
    let mut request = Vec::new();
    for i in 1..=N {
        request.extend(query(
            i,
            &format!("INSERT INTO {ks}.t (k, v) VALUES ({i}, {i})"),
        ));
    }
    let mut writer = raw.stream.try_clone().expect("clone");
    let write = std::thread::spawn(move || {
        use std::io::Write;
        let _ = writer.write_all(&request);
    });
    let (first, _) = read_until_closed(&mut raw, N as usize / 4);
    relay.down();
    let (rest, closed) = read_until_closed(&mut raw, N as usize);
    relay.up();
    let _ = write.join();
    assert!(closed, "the client was not closed");
    let mut acknowledged = Vec::new();
    let mut failed = 0;
    for f in first.iter().chain(&rest) {
        if f.opcode == OPCODE_RESULT {
            acknowledged.push(f.stream);
        } else {
            let (code, message) = f.error();
            assert_eq!(code, SERVER_ERROR, "{message}");
            failed += 1;
        }
    }
    assert!(failed > 0, "the fault failed no request");
    acknowledged.sort_unstable();
    acknowledged.dedup();
    assert_eq!(
        acknowledged.len() + failed,
        first.len() + rest.len(),
        "a stream answered twice"
    );
    // Served again, and every acknowledged INSERT is there.
    let mut check = Raw::ready(port);
    for (n, k) in acknowledged.iter().enumerate() {
        let answer = check.query(
            (n % 30000) as i16 + 1,
            &format!("SELECT v FROM {ks}.t WHERE k = {k}"),
        );
        assert_eq!(answer.opcode, OPCODE_RESULT);
        // A Rows result with one row ends with the value: an int cell of 4 bytes.
        assert!(
            answer
                .body
                .ends_with(&[0, 0, 0, 4, 0, 0, (*k >> 8) as u8, *k as u8]),
            "INSERT {k} is missing"
        );
    }
    assert_eq!(
        check.query(1, &format!("DROP KEYSPACE {ks}")).opcode,
        OPCODE_RESULT
    );
    proxy.stop_expecting(BROKE);
}

/// A node that answers a byte every 5 ms, and real packet loss (5 % of the packets between
/// proxy and relay, both ways) with 2 ms of latency: every stream gets its own answer.
#[test]
fn a_slow_node_and_packet_loss_lose_nothing() {
    let relay = Relay::start(&cassandra_addr());
    relay.fault_next(Faults {
        trickle: Some(Duration::from_millis(5)),
        ..Faults::default()
    });
    relay.set_default(Faults {
        latency: Some(Duration::from_millis(2)),
        ..Faults::default()
    });
    let (port, proxy) = through(&relay);
    let mut slow = Raw::ready(port);
    slow.send(&four_queries());
    // Meanwhile another client, over a lossy connection, runs 200 queries one by one.
    let _loss = PacketLoss::start(relay.addr.port(), 5);
    let mut lossy = Raw::ready(port);
    for i in 0..200i16 {
        let answer = lossy.query(
            i + 1,
            &format!("SELECT release_version AS q{i} FROM system.local"),
        );
        assert_eq!(answer.opcode, OPCODE_RESULT);
        assert!(String::from_utf8_lossy(&answer.body).contains(&format!("q{i}")));
    }
    let mut streams: Vec<i16> = (0..4)
        .map(|_| {
            let f = slow.read();
            assert_eq!(f.opcode, OPCODE_RESULT, "{f:?}");
            assert!(String::from_utf8_lossy(&f.body).contains(&format!("stream{}", f.stream)));
            f.stream
        })
        .collect();
    streams.sort_unstable();
    assert_eq!(streams, [1, 2, 3, 4]);
    proxy.stop();
}
