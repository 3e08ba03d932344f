//! Faults between the proxy and a real Redis, injected by a relay (`support/fault.rs`):
//! a reply cut at every byte (FIN and RST), the upstream killed and back mid-pipeline, an
//! upstream that stops reading, one that answers a byte at a time, and real packet loss with
//! latency. For each: the client gets an error for exactly the requests that failed, in
//! order, never another request's reply; what Redis acknowledged is on Redis; other clients
//! are served; the proxy serves again when the upstream is back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shotover::codec::redis::ResponseDecoder;

use crate::fault::{Faults, PacketLoss, Relay};
use crate::helpers::*;

fn through(relay: &Relay, sink_extra: &str) -> (u16, String) {
    let port = free_port();
    let mut topology = passthrough(port, &relay.address(), "");
    if !sink_extra.is_empty() {
        topology = topology.replace(
            "connect_timeout_ms: 3000",
            &format!("connect_timeout_ms: 3000\n            {sink_extra}"),
        );
    }
    (port, topology)
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// Reads replies from `stream` until `count` arrived, the connection closed or `timeout`
/// passed. Returns the replies and whether the connection was closed.
fn read_replies(stream: &mut TcpStream, count: usize, timeout: Duration) -> (Vec<String>, bool) {
    let mut decoder = ResponseDecoder::new(1 << 30);
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    let deadline = Instant::now() + timeout;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = decoder
            .decode(&mut buf)
            .expect("the proxy sends valid RESP")
        {
            replies.push(String::from_utf8_lossy(&frame).into_owned());
        }
        if replies.len() >= count || Instant::now() > deadline {
            return (replies, false);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return (replies, true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (replies, true),
        }
    }
}

/// The WARN lines a broken upstream connection logs.
const BROKE: &[&str] = &[
    "upstream connection broke",
    "a shared upstream connection failed",
];

/// Resets relayed connection `index` and waits until the proxy saw it go (in shared mode,
/// so that the next requests open a new connection rather than meet the dying one).
fn retire(relay: &Relay, index: usize, shotover: &Shotover, mode: Mode) {
    relay.reset(index);
    if mode == Mode::Shared {
        shotover.wait_metric(
            "shotover_redis_shared_connections{chain=\"redis\",transform=\"sink\"}",
            |open| open == 0.0,
        );
    }
}

/// Deletes `keys` on Redis directly.
fn del(keys: impl IntoIterator<Item = String>) {
    let mut args = vec!["-p".to_string(), redis_port(), "DEL".to_string()];
    args.extend(keys);
    redis_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn is_upstream_error(reply: &str) -> bool {
    reply.starts_with("-ERR shotover: upstream ")
}

fn redis_get(key: &str) -> String {
    redis_cli(&["-p", &redis_port(), "GET", key])
        .trim()
        .to_string()
}

/// A pipeline of six requests whose replies have fixed lengths and do not depend on what
/// earlier (maybe cut) runs did, and those replies. `{p}:l` holds `a b`.
fn six(p: &str, n: usize) -> (Vec<u8>, Vec<String>) {
    let (list, key, value) = (format!("{p}:l"), format!("{p}:k"), format!("{n:04}"));
    let mut request = Vec::new();
    for args in [
        vec!["SET", &key, &value],
        vec!["GET", &key],
        vec!["EXISTS", &key],
        vec!["LRANGE", &list, "0", "-1"],
        vec!["MGET", &key, &key],
        vec!["ECHO", "e"],
    ] {
        request.extend(command(&args));
    }
    let replies = [
        "+OK\r\n".to_string(),
        format!("$4\r\n{value}\r\n"),
        ":1\r\n".to_string(),
        "*2\r\n$1\r\na\r\n$1\r\nb\r\n".to_string(),
        format!("*2\r\n$4\r\n{value}\r\n$4\r\n{value}\r\n"),
        "$1\r\ne\r\n".to_string(),
    ];
    (request, replies.to_vec())
}

/// Every byte boundary of a six-reply pipeline (and of the connection's handshake before
/// it): replies received in full reach the client as they are, every later request gets an
/// error, in order; an acknowledged SET is on Redis. On the client's own connection the
/// client is then closed (if the requests had been sent); on a shared one it stays.
fn a_reply_cut_at_every_byte_gets_errors_for_exactly_the_unanswered_requests(mode: Mode) {
    let relay = Relay::start(&redis_addr());
    let (port, topology) = through(&relay, "");
    let shotover = mode.start(&topology);
    let p = prefix(&format!("cut-{mode:?}"));
    redis_cli(&["-p", &redis_port(), "RPUSH", &format!("{p}:l"), "a", "b"]);
    // A clean run: how many bytes the connection's handshake takes before the replies.
    let (request, expected) = six(&p, 0);
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(&request).expect("write");
    let (replies, _) = read_replies(&mut client, 6, Duration::from_secs(10));
    assert_eq!(replies, expected);
    let total: usize = expected.iter().map(String::len).sum();
    let handshake = relay.bytes_from_upstream(0) - total;
    drop(client);
    // In shared mode the next pipeline must open a new connection, the armed one.
    retire(&relay, 0, &shotover, mode);
    for cut in 0..handshake + total {
        let n = cut + 1;
        let (request, expected) = six(&p, n);
        relay.fault_next(Faults {
            cut_after: Some(cut),
            reset: cut % 2 == 1,
            ..Faults::default()
        });
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        client.write_all(&request).expect("write");
        let (replies, closed) = read_replies(&mut client, 6, Duration::from_secs(10));
        let what = format!("cut after byte {cut} ({handshake} of handshake): {replies:?}");
        assert_eq!(replies.len(), 6, "{what}");
        // The replies that ended before the cut, whole and in order; errors after.
        let mut end = handshake;
        let whole = expected
            .iter()
            .take_while(|r| {
                end += r.len();
                end <= cut
            })
            .count();
        assert_eq!(replies[..whole], expected[..whole], "{what}");
        assert!(
            replies[whole..].iter().all(|r| is_upstream_error(r)),
            "{what}"
        );
        if whole > 0 {
            assert_eq!(redis_get(&format!("{p}:k")), format!("{n:04}"), "{what}");
        }
        match mode {
            // Requests sent on a connection that broke: the client is closed.
            Mode::Dedicated if cut >= handshake => {
                let (_, closed_now) = read_replies(&mut client, 1, Duration::from_secs(5));
                assert!(closed || closed_now, "{what}: the client stays open");
            }
            // The connection could not be opened (the handshake broke), or it was shared:
            // nothing of the client's session was lost, the client stays.
            _ => {
                client.write_all(&command(&["PING"])).expect("write");
                let (pong, _) = read_replies(&mut client, 1, Duration::from_secs(10));
                assert_eq!(pong, ["+PONG\r\n"], "{what}");
                if mode == Mode::Shared {
                    // That PING opened a healthy shared connection: retire it.
                    retire(&relay, relay.accepted() - 1, &shotover, mode);
                }
            }
        }
    }
    redis_cli(&[
        "-p",
        &redis_port(),
        "DEL",
        &format!("{p}:l"),
        &format!("{p}:k"),
    ]);
    shotover.stop_expecting(BROKE);
}

/// A client pipelines 20,000 `SET`/`ECHO` pairs while the upstream dies (every connection
/// reset, new ones refused) and comes back half a second later. Each reply is the request's
/// own answer or an error, never another's; every acknowledged SET is on Redis; a client on
/// another connection is served once the upstream is back, and in shared mode the pipelining
/// client itself is served again.
async fn the_upstream_killed_mid_pipeline_and_back_loses_no_acknowledged_write(mode: Mode) {
    let relay = Relay::start(&redis_addr());
    let (port, topology) = through(&relay, "");
    let shotover = mode.start(&topology);
    let p = prefix(&format!("kill-{mode:?}"));
    const PAIRS: usize = 10_000;
    let mut request = Vec::new();
    for i in 0..PAIRS {
        request.extend(command(&["SET", &format!("{p}:{i}"), &i.to_string()]));
        request.extend(command(&["ECHO", &format!("e{i}")]));
    }
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut writer = client.try_clone().expect("clone");
    let write = std::thread::spawn(move || {
        // Fails once a dedicated client is closed: that is expected.
        let _ = writer.write_all(&request);
    });
    let (first, _) = read_replies(&mut client, PAIRS / 2, Duration::from_secs(30));
    assert!(
        first.len() >= PAIRS / 2,
        "before the fault, all replies arrive"
    );
    relay.down();
    let (during, closed) = read_replies(
        &mut client,
        2 * PAIRS - first.len(),
        Duration::from_millis(500),
    );
    relay.up();
    let mut replies = first;
    replies.extend(during);
    if !closed {
        let (after, _) = read_replies(
            &mut client,
            2 * PAIRS - replies.len(),
            Duration::from_secs(30),
        );
        replies.extend(after);
    }
    let _ = write.join();
    let mut errors = 0;
    for (n, reply) in replies.iter().enumerate() {
        let i = n / 2;
        if is_upstream_error(reply) {
            errors += 1;
            continue;
        }
        if n % 2 == 0 {
            assert_eq!(reply, "+OK\r\n", "reply {n}");
            assert_eq!(
                redis_get(&format!("{p}:{i}")),
                i.to_string(),
                "acknowledged SET {i}"
            );
        } else {
            let echo = format!("e{i}");
            assert_eq!(
                reply,
                &format!("${}\r\n{echo}\r\n", echo.len()),
                "reply {n}"
            );
        }
    }
    assert!(errors > 0, "the fault failed no request");
    match mode {
        Mode::Dedicated => assert!(replies.len() < 2 * PAIRS, "the client was not closed"),
        // The client stayed, every request was answered, and it is served again.
        Mode::Shared => {
            assert_eq!(replies.len(), 2 * PAIRS);
            client.write_all(&command(&["PING"])).expect("write");
            let (pong, _) = read_replies(&mut client, 1, Duration::from_secs(10));
            assert_eq!(pong, ["+PONG\r\n"]);
        }
    }
    let mut other = connect(port).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut other)
        .await
        .expect("served again");
    assert_eq!(pong, "PONG");
    del((0..PAIRS).map(|i| format!("{p}:{i}")));
    shotover.stop_expecting(BROKE);
}

/// An upstream that stops reading: the proxy's writes to it stop and the client's 64 MiB
/// of `SET`s are held back (the proxy does not buffer them: its peak RSS stays small), a
/// client on another upstream connection is served meanwhile, and `read_timeout` fails what
/// was waiting. On its own connection the client is then closed; on a shared one the
/// stalled batch fails and the rest goes through a new connection.
fn an_upstream_that_stops_reading_holds_the_client_back_within_bounded_memory(mode: Mode) {
    let relay = Relay::start(&redis_addr());
    let (port, topology) = through(&relay, "read_timeout: 2");
    let shotover = mode.start(&topology);
    let p = prefix(&format!("stall-{mode:?}"));
    let value = "v".repeat(1024 * 1024);
    let mut request = Vec::new();
    for i in 0..64 {
        request.extend(command(&["SET", &format!("{p}:{i}"), &value]));
    }
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // The client's upstream connection (dedicated) or the shared one is open, then stalls.
    client.write_all(&command(&["PING"])).expect("write");
    assert_eq!(
        read_replies(&mut client, 1, Duration::from_secs(10)).0,
        ["+PONG\r\n"]
    );
    let before = relay.bytes_to_upstream(0);
    relay.stall(0);
    let mut writer = client.try_clone().expect("clone");
    let write = std::thread::spawn(move || {
        // Ends early once a dedicated client is closed.
        let _ = writer.write_all(&request);
    });
    // The stalled connection carries the SETs (it has requests in flight) before another
    // client comes.
    wait_until(
        "the SETs to reach the stalled connection",
        Duration::from_secs(10),
        || relay.bytes_to_upstream(0) > before,
    );
    // Another client gets its own connection (dedicated) or the second shared one.
    let mut other = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    other.write_all(&command(&["PING"])).expect("write");
    let (pong, _) = read_replies(&mut other, 1, Duration::from_secs(10));
    assert_eq!(pong, ["+PONG\r\n"]);
    let (replies, closed) = read_replies(&mut client, 64, Duration::from_secs(60));
    let _ = write.join();
    let failed = replies.iter().take_while(|r| is_upstream_error(r)).count();
    assert!(
        failed > 0,
        "nothing failed the stalled requests: {:?}",
        &replies[..replies.len().min(3)]
    );
    assert!(
        replies[..failed]
            .iter()
            .all(|r| r.contains("read_timeout of 2 s")),
        "{replies:?}"
    );
    match mode {
        Mode::Dedicated => {
            assert_eq!(failed, replies.len(), "{replies:?}");
            let (_, closed_now) = read_replies(&mut client, 1, Duration::from_secs(5));
            assert!(closed || closed_now, "the client stays open");
        }
        Mode::Shared => {
            assert_eq!(replies.len(), 64);
            assert!(
                replies[failed..].iter().all(|r| r == "+OK\r\n"),
                "{replies:?}"
            );
            for i in failed..64 {
                let len = redis_cli(&["-p", &redis_port(), "STRLEN", &format!("{p}:{i}")]);
                assert_eq!(
                    len.trim(),
                    (1024 * 1024).to_string(),
                    "acknowledged SET {i}"
                );
            }
        }
    }
    let peak = status_kib(shotover.pid(), "VmHWM") / 1024;
    assert!(
        peak < 96,
        "the proxy held {peak} MiB for a stalled upstream"
    );
    other.write_all(&command(&["PING"])).expect("write");
    let (pong, _) = read_replies(&mut other, 1, Duration::from_secs(10));
    assert_eq!(pong, ["+PONG\r\n"]);
    del((0..64).map(|i| format!("{p}:{i}")));
    shotover.stop_expecting(BROKE);
}

/// An upstream that answers one byte every 10 ms: every reply arrives whole and in order,
/// and another client is served meanwhile.
fn an_upstream_answering_a_byte_every_10_ms_still_gets_every_reply_through(mode: Mode) {
    let relay = Relay::start(&redis_addr());
    let (port, topology) = through(&relay, "read_timeout: 2");
    let shotover = mode.start(&topology);
    relay.fault_next(Faults {
        trickle: Some(Duration::from_millis(10)),
        ..Faults::default()
    });
    let p = prefix(&format!("trickle-{mode:?}"));
    redis_cli(&["-p", &redis_port(), "RPUSH", &format!("{p}:l"), "a", "b"]);
    let (request, expected) = six(&p, 7);
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(&request).expect("write");
    // Meanwhile, another client.
    let mut other = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    other.write_all(&command(&["PING"])).expect("write");
    let (pong, _) = read_replies(&mut other, 1, Duration::from_secs(10));
    assert_eq!(pong, ["+PONG\r\n"]);
    let (replies, _) = read_replies(&mut client, 6, Duration::from_secs(30));
    assert_eq!(replies, expected);
    redis_cli(&[
        "-p",
        &redis_port(),
        "DEL",
        &format!("{p}:l"),
        &format!("{p}:k"),
    ]);
    shotover.stop();
}

/// Real packet loss (5 % of the packets between proxy and relay dropped, both ways) and 2 ms
/// of latency each way: 20 clients, 200 pipelines of SET, GET and ECHO each; every reply is
/// right and nothing fails (TCP recovers what is lost).
async fn packet_loss_and_latency_lose_nothing(mode: Mode) {
    let relay = Relay::start(&redis_addr());
    relay.set_default(Faults {
        latency: Some(Duration::from_millis(2)),
        ..Faults::default()
    });
    let _loss = PacketLoss::start(relay.addr.port(), 5);
    let (port, topology) = through(&relay, "");
    let shotover = mode.start(&topology);
    let p = prefix(&format!("loss-{mode:?}"));
    let mut tasks = Vec::new();
    for client in 0..20 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut con = connect(port).await;
            for round in 0..200 {
                let key = format!("{p}:{client}");
                let value = format!("{client}.{round}");
                let (ok, got, echo): (String, String, String) = redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .cmd("GET")
                    .arg(&key)
                    .cmd("ECHO")
                    .arg(&value)
                    .query_async(&mut con)
                    .await
                    .expect("a pipeline under packet loss");
                assert_eq!(
                    (ok.as_str(), got.as_str(), echo.as_str()),
                    ("OK", value.as_str(), value.as_str())
                );
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    del((0..20).map(|c| format!("{p}:{c}")));
    shotover.stop();
}

crate::in_both_modes! {
    async: [
        the_upstream_killed_mid_pipeline_and_back_loses_no_acknowledged_write,
        packet_loss_and_latency_lose_nothing,
    ],
    sync: [
        a_reply_cut_at_every_byte_gets_errors_for_exactly_the_unanswered_requests,
        an_upstream_that_stops_reading_holds_the_client_back_within_bounded_memory,
        an_upstream_answering_a_byte_every_10_ms_still_gets_every_reply_through,
    ],
}
