//! What goes wrong: dead upstreams, bad input, limits. Each gets a clear error and the
//! proxy keeps serving everyone else.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::*;

async fn unreachable_upstream_gives_err_promptly_and_other_sources_keep_serving(mode: Mode) {
    let dead_port = free_port();
    let (good, bad) = (free_port(), free_port());
    let topology = format!(
        r#"
sources:
  - Redis:
      name: "good"
      listen_addr: "127.0.0.1:{good}"
      chain:
        - RedisSinkSingle: {{ name: "good-sink", remote_address: "{redis}", connect_timeout_ms: 3000 }}
  - Redis:
      name: "bad"
      listen_addr: "127.0.0.1:{bad}"
      chain:
        - RedisSinkSingle: {{ name: "bad-sink", remote_address: "127.0.0.1:{dead_port}", connect_timeout_ms: 3000 }}
"#,
        redis = redis_addr()
    );
    let shotover = mode.start(&topology);
    let mut con = connect(bad).await;
    let start = Instant::now();
    let err = redis::cmd("GET")
        .arg("x")
        .query_async::<Option<String>>(&mut con)
        .await
        .expect_err("no upstream");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the error took {:?}",
        start.elapsed()
    );
    assert!(
        err.to_string()
            .contains(&format!("upstream 127.0.0.1:{dead_port} is unreachable")),
        "{err}"
    );
    // The same client connection stays open and gets the error again, not a hang.
    let err = redis::cmd("PING")
        .query_async::<String>(&mut con)
        .await
        .expect_err("still no upstream");
    assert!(err.to_string().contains("unreachable"), "{err}");
    let mut ok = connect(good).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut ok)
        .await
        .expect("the other source serves");
    assert_eq!(pong, "PONG");
    let failed = shotover
        .metric("shotover_failed_requests_count{chain=\"bad\",transform=\"bad-sink\"}")
        .expect("failed requests metric");
    assert!(failed >= 2.0, "{failed}");
    shotover.stop();
}

async fn upstream_dying_mid_connection_fails_pending_requests_and_closes_only_that_client(
    mode: Mode,
) {
    let port = free_port();
    // The sink's name names its shared connections on Redis (`shotover-shared-<name>`).
    let sink = prefix("dying-sink").replace(':', "-");
    let shotover = mode.start(
        &passthrough(port, &redis_addr(), "")
            .replace("name: \"sink\"", &format!("name: \"{sink}\"")),
    );
    let addr = format!("127.0.0.1:{port}");
    let mut victim = TcpStream::connect(&addr).expect("connect");
    victim
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let name = prefix("victim").replace(':', "-");
    victim
        .write_all(format!("CLIENT SETNAME {name}\r\nPING\r\n").as_bytes())
        .expect("write");
    assert_eq!(
        read_available(&mut victim, 12, Duration::from_secs(5)),
        b"+OK\r\n+PONG\r\n"
    );
    // Kill the upstream connection that carried the victim's requests directly on Redis,
    // then use the victim.
    let upstream_name = match mode {
        Mode::Dedicated => name.clone(),
        Mode::Shared => format!("shotover-shared-{sink}"),
    };
    let id = client_id(&upstream_name).expect("the victim's upstream connection is listed");
    assert_eq!(
        redis_cli(&["-p", &redis_port(), "CLIENT", "KILL", "ID", &id]).trim(),
        "1"
    );
    victim.write_all(b"PING\r\n").expect("write");
    let reply = read_available(&mut victim, 1, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&reply);
    match mode {
        Mode::Dedicated => {
            assert!(
                text.starts_with("-ERR shotover: upstream") || text.is_empty(),
                "the victim should get an error reply, got {text:?}"
            );
            assert!(
                is_closed(&mut victim, Duration::from_secs(5)),
                "the victim's connection should be closed"
            );
        }
        Mode::Shared => {
            // No session state lived on the shared connection: the victim stays connected.
            // Its PING either went out on a new connection (+PONG) or was in flight on the
            // killed one (an error saying so); either way the next one is answered.
            let more = read_available(&mut victim, 7, Duration::from_millis(500));
            let text = format!("{text}{}", String::from_utf8_lossy(&more));
            assert!(
                text == "+PONG\r\n" || text.starts_with("-ERR shotover: upstream"),
                "the victim should get PONG or an error reply, got {text:?}"
            );
            victim.write_all(b"PING\r\n").expect("write");
            assert_eq!(
                read_available(&mut victim, 7, Duration::from_secs(5)),
                b"+PONG\r\n",
                "the victim is served after its shared connection died"
            );
            victim.write_all(b"CLIENT GETNAME\r\n").expect("write");
            let expected = format!("${}\r\n{name}\r\n", name.len());
            assert_eq!(
                read_available(&mut victim, expected.len(), Duration::from_secs(5)),
                expected.as_bytes(),
                "the victim keeps its name"
            );
        }
    }
    let mut fresh = connect(port).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut fresh)
        .await
        .expect("new clients are served");
    assert_eq!(pong, "PONG");
    match mode {
        Mode::Dedicated => shotover.stop_expecting(&["upstream connection broke"]),
        Mode::Shared => shotover.stop_expecting(&["a shared upstream connection failed"]),
    };
}

async fn malformed_frames_get_a_protocol_error_and_only_that_connection_closes(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let addr = format!("127.0.0.1:{port}");
    let mut bystander = connect(port).await;
    for (bad, expected) in [
        (
            &b"*2\r\n$3\r\nGET\r\n:1\r\n"[..],
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            &b"*1\r\n$-5\r\n"[..],
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            &b"*x\r\n"[..],
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            &b"SET a \"unterminated\r\n"[..],
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ] {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        // A good request first: it is answered before the error.
        stream.write_all(b"PING\r\n").expect("write");
        stream.write_all(bad).expect("write");
        let reply = read_available(&mut stream, 7 + expected.len(), Duration::from_secs(5));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("+PONG\r\n{expected}")
        );
        assert!(is_closed(&mut stream, Duration::from_secs(5)));
    }
    let pong: String = redis::cmd("PING")
        .query_async(&mut bystander)
        .await
        .expect("others keep going");
    assert_eq!(pong, "PONG");
    let errors = shotover
        .metric("shotover_client_protocol_errors_count{source=\"redis\"}")
        .expect("protocol errors metric");
    assert_eq!(errors, 4.0);
    shotover.stop();
}

async fn oversized_frames_are_refused_before_they_are_buffered(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(
        port,
        &redis_addr(),
        "      max_frame_size_bytes: 4096",
    ));
    let addr = format!("127.0.0.1:{port}");
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // Only the header of a 100 MB value is sent: the proxy refuses it without waiting.
    stream
        .write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000000\r\n")
        .expect("write");
    let reply = read_available(&mut stream, 200, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("-ERR Protocol error: request of at least 100000"),
        "{text}"
    );
    assert!(text.contains("max_frame_size_bytes of 4096"), "{text}");
    assert!(is_closed(&mut stream, Duration::from_secs(5)));
    // Requests under the limit are fine.
    let mut con = connect(port).await;
    let key = format!("{}small", prefix("oversize"));
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("x".repeat(3000))
        .query_async(&mut con)
        .await
        .expect("3000 bytes fit");
    shotover.stop();
}

async fn hard_connection_limit_refuses_and_soft_limit_queues(mode: Mode) {
    let (hard, soft) = (free_port(), free_port());
    let redis = redis_addr();
    let topology = format!(
        r#"
sources:
  - Redis:
      name: "hard"
      listen_addr: "127.0.0.1:{hard}"
      connection_limit: 1
      hard_connection_limit: true
      chain:
        - RedisSinkSingle: {{ name: "s1", remote_address: "{redis}", connect_timeout_ms: 3000 }}
  - Redis:
      name: "soft"
      listen_addr: "127.0.0.1:{soft}"
      connection_limit: 1
      chain:
        - RedisSinkSingle: {{ name: "s2", remote_address: "{redis}", connect_timeout_ms: 3000 }}
"#
    );
    let shotover = mode.start(&topology);
    // Hard: the second connection is closed at once.
    let first = raw_ping_connection(hard);
    let mut second = TcpStream::connect(format!("127.0.0.1:{hard}")).expect("TCP accepts");
    let _ = second.write_all(b"PING\r\n");
    assert!(
        is_closed(&mut second, Duration::from_secs(5)),
        "the second connection should be refused"
    );
    drop(first);
    wait_until("the slot to free up", Duration::from_secs(5), || {
        shotover.metric("shotover_available_connections_count{source=\"hard\"}") == Some(1.0)
    });
    drop(raw_ping_connection(hard));

    // Soft: the second connection waits until the first one goes.
    let first = raw_ping_connection(soft);
    let mut queued = TcpStream::connect(format!("127.0.0.1:{soft}")).expect("TCP accepts");
    queued
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    queued.write_all(b"PING\r\n").expect("write");
    assert!(
        read_available(&mut queued, 7, Duration::from_millis(500)).is_empty(),
        "served too early"
    );
    drop(first);
    assert_eq!(
        read_available(&mut queued, 7, Duration::from_secs(5)),
        b"+PONG\r\n"
    );
    let refused = shotover
        .metric("shotover_connections_refused_count{source=\"hard\"}")
        .expect("metric");
    assert_eq!(refused, 1.0);
    shotover.stop();
}

fn raw_ping_connection(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    stream.write_all(b"PING\r\n").expect("write");
    assert_eq!(
        read_available(&mut stream, 7, Duration::from_secs(5)),
        b"+PONG\r\n"
    );
    stream
}

async fn idle_connections_are_closed_after_the_timeout(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), "      timeout: 1"));
    let mut idle = raw_ping_connection(port);
    let start = Instant::now();
    assert!(
        is_closed(&mut idle, Duration::from_secs(5)),
        "idle connection should be closed"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "closed too early: {:?}",
        start.elapsed()
    );
    shotover.stop();
}

async fn a_client_that_never_reads_its_replies_is_closed_after_the_idle_timeout(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), "      timeout: 1"));
    let key = format!("{}big", prefix("no-reader"));
    let mut con = connect(port).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(vec![b'x'; 32 * 1024 * 1024])
        .query_async(&mut con)
        .await
        .expect("SET 32 MiB");
    drop(con);
    // Ask for the value many times and never read: the proxy's writes block.
    let mut stalled = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    stalled
        .write_all(format!("GET {key}\r\nGET {key}\r\nGET {key}\r\n").as_bytes())
        .expect("write");
    wait_until(
        "the stalled connection's slot to be given back",
        Duration::from_secs(15),
        || shotover.metric("shotover_available_connections_count{source=\"redis\"}") == Some(512.0),
    );
    drop(stalled);
    shotover.stop();
}

/// The process budget for incomplete requests (4 MiB here): a client holds 3 MiB of a SET
/// still arriving; a second client whose large SET takes the total past the budget gets a
/// protocol error and is closed; a third client's PINGs are served throughout, and the first
/// client's SET completes.
fn incomplete_requests_over_the_process_budget_refuse_only_the_connection_that_passes_it(
    mode: Mode,
) {
    let port = free_port();
    let topology = mode.topology(&passthrough(port, &redis_addr(), ""));
    let shotover = Shotover::start_with_config(&topology, "max_buffered_request_bytes: 4194304\n");
    let key = prefix("request-budget");
    let set_head = |name: &str, len: usize| {
        let k = format!("{key}:{name}");
        format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${len}\r\n", k.len())
    };
    let value = 3 * 1024 * 1024 + 512 * 1024;
    let mut a = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    a.write_all(set_head("a", value).as_bytes()).expect("write");
    a.write_all(&vec![b'a'; 3 * 1024 * 1024]).expect("write");
    shotover.wait_metric("shotover_buffered_request_bytes", |held| {
        held >= 3.0 * 1024.0 * 1024.0
    });
    let mut b = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    b.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    b.write_all(b"PING\r\n").expect("write");
    assert_eq!(
        read_available(&mut b, 7, Duration::from_secs(10)),
        b"+PONG\r\n"
    );
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(set_head("c", 8 * 1024 * 1024).as_bytes())
        .expect("write");
    // Refused part way: the rest of the write may fail.
    let _ = c.write_all(&vec![b'c'; 2 * 1024 * 1024]);
    let refused =
        String::from_utf8_lossy(&read_available(&mut c, 60, Duration::from_secs(10))).into_owned();
    assert!(
        refused.starts_with("-ERR Protocol error: the proxy holds ")
            && refused.contains("over its max_buffered_request_bytes of 4194304"),
        "{refused}"
    );
    assert!(
        is_closed(&mut c, Duration::from_secs(5)),
        "the refused client stays open"
    );
    assert_eq!(
        shotover.metric("shotover_buffered_request_budget_refusals_count"),
        Some(1.0)
    );
    b.write_all(b"PING\r\n").expect("write");
    assert_eq!(
        read_available(&mut b, 7, Duration::from_secs(10)),
        b"+PONG\r\n"
    );
    let mut rest = vec![b'a'; value - 3 * 1024 * 1024];
    rest.extend_from_slice(b"\r\n");
    a.write_all(&rest).expect("write");
    assert_eq!(
        read_available(&mut a, 5, Duration::from_secs(10)),
        b"+OK\r\n"
    );
    let len = redis_cli(&["-p", &redis_port(), "STRLEN", &format!("{key}:a")]);
    assert_eq!(len.trim(), value.to_string());
    redis_cli(&["-p", &redis_port(), "DEL", &format!("{key}:a")]);
    shotover.stop();
}

crate::in_both_modes!(
    async: [
        unreachable_upstream_gives_err_promptly_and_other_sources_keep_serving,
        upstream_dying_mid_connection_fails_pending_requests_and_closes_only_that_client,
        malformed_frames_get_a_protocol_error_and_only_that_connection_closes,
        oversized_frames_are_refused_before_they_are_buffered,
        hard_connection_limit_refuses_and_soft_limit_queues,
        idle_connections_are_closed_after_the_timeout,
        a_client_that_never_reads_its_replies_is_closed_after_the_idle_timeout,
    ],
    sync: [
        incomplete_requests_over_the_process_budget_refuse_only_the_connection_that_passes_it,
    ],
);
