//! Every transform, through the real binary.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::helpers::*;

fn source(port: u16, chain: &str) -> String {
    format!(
        r#"
sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      chain:
{chain}"#
    )
}

fn sink(name: &str) -> String {
    format!(
        "        - RedisSinkSingle: {{ name: \"{name}\", remote_address: \"{}\", connect_timeout_ms: 3000 }}\n",
        redis_addr()
    )
}

/// A RedisSinkSingle to the TLS Redis, indented for a chain at `indent` spaces.
fn tls_sink(name: &str, indent: usize) -> String {
    let (addr, ca) = redis_tls();
    let pad = " ".repeat(indent);
    format!(
        "{pad}- RedisSinkSingle:\n{pad}    name: \"{name}\"\n{pad}    remote_address: \"{addr}\"\n{pad}    connect_timeout_ms: 3000\n{pad}    tls:\n{pad}      certificate_authority_path: \"{ca}\"\n{pad}      verify_hostname: true\n"
    )
}

fn tls_get(key: &str) -> String {
    let (addr, ca) = redis_tls();
    let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
    redis_cli(&["--tls", "--cacert", &ca, "-p", port, "GET", key])
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn null_sink_answers_every_request_with_an_error() {
    let port = free_port();
    let shotover = Shotover::start(&source(port, "        - NullSink\n"));
    let mut con = connect(port).await;
    let err = redis::cmd("GET")
        .arg("k")
        .query_async::<Option<String>>(&mut con)
        .await
        .expect_err("null sink");
    assert!(
        err.to_string()
            .contains("Handled by shotover null transform"),
        "{err}"
    );
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_returner_answers_with_its_value() {
    let port = free_port();
    let shotover = Shotover::start(&source(
        port,
        "        - DebugReturner: { Redis: \"42\" }\n",
    ));
    let mut con = connect(port).await;
    let v: String = redis::cmd("GET")
        .arg("anything")
        .query_async(&mut con)
        .await
        .expect("reply");
    assert_eq!(v, "42");
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_returner_fail_errors_the_pending_requests_and_closes_the_connection() {
    let port = free_port();
    let shotover = Shotover::start(&source(port, "        - DebugReturner: Fail\n"));
    let mut stream = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    stream.write_all(b"PING\r\nPING\r\n").expect("write");
    let reply = read_available(&mut stream, 200, Duration::from_secs(2));
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(
        text.matches("-ERR shotover: DebugReturner `DebugReturner` is set to Fail\r\n")
            .count(),
        2,
        "{text}"
    );
    assert!(is_closed(&mut stream, Duration::from_secs(5)));
    shotover.stop_expecting(&["its chain failed"]);
}

async fn debug_printer_logs_requests_and_responses(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - DebugPrinter: {{ name: \"printer\" }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let key = format!("{}printed", prefix("printer"));
    let mut con = connect(port).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("hello")
        .query_async(&mut con)
        .await
        .expect("SET");
    shotover.wait_for_log(&format!("request: [\"SET\", \"{key}\", \"hello\"]"));
    shotover.wait_for_log("response: OK");
    shotover.stop();
}

/// Every request and reply parsed and encoded again by the proxy's RESP codec: RESP2 and
/// RESP3 clients (maps, sets, pushes, transactions), an inline command and a 1 MiB binary
/// value read the same as without it, and nothing failed to parse.
async fn debug_force_encode_re_encodes_every_message_and_clients_see_no_difference(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - DebugForceEncode: {{ name: \"encode\", encode_requests: true, encode_responses: true }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let out = python(
        "resp3.py",
        &["127.0.0.1", &port.to_string(), &prefix("encode")],
    );
    assert!(out.contains("resp3 ok"), "{out}");
    // An inline command is re-encoded as a multibulk: Redis answers it all the same.
    let reply = raw(&format!("127.0.0.1:{port}"), b"PING inline\r\n", 13);
    assert_eq!(reply, b"$6\r\ninline\r\n");
    let key = format!("{}bin", prefix("encode"));
    let value: Vec<u8> = (0..1024 * 1024).map(|i| (i % 256) as u8).collect();
    let mut con = connect(port).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .query_async(&mut con)
        .await
        .expect("SET");
    let back: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("GET");
    assert!(back == value, "the value came back different");
    assert_eq!(
        shotover.metric(r#"shotover_debug_force_unparsed_count{chain="redis",transform="encode"}"#),
        Some(0.0)
    );
    shotover.stop();
}

/// DebugForceParse parses and passes the bytes on as read; a reply it cannot parse (nested
/// deeper than the parser's cap) still reaches the client, and is counted.
async fn debug_force_parse_passes_on_what_it_cannot_parse(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - DebugForceParse: {{ name: \"parse\", parse_requests: true, parse_responses: true }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    // A Lua table nested 2000 deep: Redis sends it as nested arrays.
    let (request, expected) = nested_script(2000);
    let got = raw(
        &format!("127.0.0.1:{port}"),
        request.as_bytes(),
        expected.len(),
    );
    assert!(got == expected, "the reply differs ({} bytes)", got.len());
    assert_eq!(
        shotover.metric(r#"shotover_debug_force_unparsed_count{chain="redis",transform="parse"}"#),
        Some(1.0)
    );
    shotover.stop();
}

async fn query_counter_counts_requests_by_command(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - QueryCounter: {{ name: \"counter\", counter_name: \"qc-test\" }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let key = format!("{}counted", prefix("counter"));
    let mut con = connect(port).await;
    for _ in 0..3 {
        let _: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("GET");
    }
    let () = redis::cmd("set")
        .arg(&key)
        .arg("v")
        .query_async(&mut con)
        .await
        .expect("SET");
    assert_eq!(
        shotover.metric("shotover_query_count{name=\"qc-test\",query=\"GET\",type=\"redis\"}"),
        Some(3.0)
    );
    assert_eq!(
        shotover.metric("shotover_query_count{name=\"qc-test\",query=\"SET\",type=\"redis\"}"),
        Some(1.0)
    );
    // A name longer than any command counts as `other`: labels are bounded in length too.
    let long = "X".repeat(10_000);
    let error = redis::cmd(&long)
        .query_async::<()>(&mut con)
        .await
        .expect_err("an unknown command");
    assert!(error.to_string().contains("unknown command"), "{error}");
    assert_eq!(
        shotover.metric("shotover_query_count{name=\"qc-test\",query=\"other\",type=\"redis\"}"),
        Some(1.0)
    );
    assert!(
        !shotover
            .metrics()
            .contains("XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX")
    );
    shotover.stop();
}

async fn query_type_filter_refuses_what_is_denied_and_keeps_reply_order(mode: Mode) {
    let (deny, allow) = (free_port(), free_port());
    let topology = format!(
        r#"
sources:
  - Redis:
      name: "deny"
      listen_addr: "127.0.0.1:{deny}"
      chain:
        - QueryTypeFilter: {{ name: "no-writes", DenyList: [Write] }}
{sink1}  - Redis:
      name: "allow"
      listen_addr: "127.0.0.1:{allow}"
      chain:
        - QueryTypeFilter: {{ name: "only-reads", AllowList: [Read] }}
{sink2}"#,
        sink1 = sink("sink1"),
        sink2 = sink("sink2"),
    );
    let shotover = mode.start(&topology);
    let key = format!("{}filtered", prefix("filter"));
    for port in [deny, allow] {
        let reply = raw(
            &format!("127.0.0.1:{port}"),
            format!("GET {key}\r\nSET {key} x\r\nEXISTS {key}\r\n").as_bytes(),
            200,
        );
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "$-1\r\n-ERR Message was filtered out by shotover\r\n:0\r\n"
        );
    }
    shotover.stop();
}

async fn coalesce_holds_requests_until_the_count_is_reached(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - Coalesce: {{ flush_when_buffered_message_count: 3 }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let mut stream = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    stream.write_all(b"PING\r\n").expect("write");
    assert!(
        read_available(&mut stream, 1, Duration::from_millis(400)).is_empty(),
        "flushed before 3 requests"
    );
    stream.write_all(b"PING\r\nECHO three\r\n").expect("write");
    assert_eq!(
        read_available(&mut stream, 25, Duration::from_secs(5)),
        b"+PONG\r\n+PONG\r\n$5\r\nthree\r\n"
    );
    shotover.stop();
}

async fn coalesce_flushes_on_its_timer_without_new_requests(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - Coalesce: {{ flush_when_millis_since_last_flush: 300 }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let mut stream = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    // The first request waits for the timer (or goes at once if the first interval has
    // already passed); either way the flush starts a fresh interval for the second.
    stream.write_all(b"PING\r\n").expect("write");
    let start = Instant::now();
    let _ = read_available(&mut stream, 7, Duration::from_secs(5));
    let first = start.elapsed();
    stream.write_all(b"PING\r\n").expect("write");
    let start = Instant::now();
    assert_eq!(
        read_available(&mut stream, 7, Duration::from_secs(5)),
        b"+PONG\r\n"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "answered after {waited:?}, before the timer (first took {first:?})"
    );
    assert!(
        waited < Duration::from_secs(3),
        "the timer never fired: {waited:?}"
    );
    shotover.stop();
}

async fn tee_ignore_writes_to_both_chains_including_a_tls_upstream(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - Tee:\n            name: \"dual-write\"\n            behavior: Ignore\n            buffer_size: 100\n            chain:\n{}{}",
        tls_sink("dr-sink", 14),
        sink("main-sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let key = format!("{}teed", prefix("tee"));
    let mut con = connect(port).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("both")
        .query_async(&mut con)
        .await
        .expect("SET");
    let direct: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("GET");
    assert_eq!(direct, "both");
    wait_until(
        "the write to reach the TLS Redis",
        Duration::from_secs(5),
        || tls_get(&key) == "both",
    );
    shotover.stop();
}

async fn tee_fail_on_mismatch_answers_errors_when_the_chains_disagree(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - Tee:\n            behavior: FailOnMismatch\n            chain:\n              - DebugReturner: {{ Redis: \"same\" }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let key = format!("{}cmp", prefix("fail-mismatch"));
    let mut con = connect(port).await;
    let err = redis::cmd("GET")
        .arg(&key)
        .query_async::<Option<String>>(&mut con)
        .await
        .expect_err("mismatch");
    assert!(err.to_string().contains("did not match"), "{err}");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("same")
        .query_async(&mut con)
        .await
        .map(|_: String| ())
        .unwrap_or(());
    let v: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("chains agree");
    assert_eq!(v, "same");
    shotover.stop();
}

async fn tee_log_warning_on_mismatch_logs_and_answers_from_the_regular_chain(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - Tee:\n            name: \"warner\"\n            behavior: LogWarningOnMismatch\n            chain:\n              - DebugReturner: {{ Redis: \"other\" }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let mut con = connect(port).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("regular answer");
    assert_eq!(pong, "PONG");
    shotover.wait_for_log("differ from the regular chain");
    shotover.stop_expecting(&["differ from the regular chain"]);
}

async fn tee_subchain_on_mismatch_sends_the_batch_down_the_mismatch_chain(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - Tee:\n            behavior:\n              SubchainOnMismatch:\n                name: \"mismatches\"\n                chain:\n{}            chain:\n              - DebugReturner: {{ Redis: \"never-equal\" }}\n{}",
        tls_sink("mismatch-sink", 18),
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let key = format!("{}mismatched", prefix("subchain"));
    let mut con = connect(port).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("logged")
        .query_async(&mut con)
        .await
        .expect("SET");
    wait_until(
        "the mismatched write in the TLS Redis",
        Duration::from_secs(5),
        || tls_get(&key) == "logged",
    );
    shotover.stop();
}

async fn tee_switch_port_flips_which_chain_answers(mode: Mode) {
    let (port, switch) = (free_port(), free_port());
    let chain = format!(
        "        - Tee:\n            switch_port: {switch}\n            chain:\n              - DebugReturner: {{ Redis: \"from-tee\" }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let api = format!("127.0.0.1:{switch}");
    let path = "/transform/tee/result-source";
    assert_eq!(http(&api, "GET", path, "").expect("GET").2, "regular-chain");
    let mut con = connect(port).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("regular");
    assert_eq!(pong, "PONG");
    assert_eq!(http(&api, "PUT", path, "tee-chain").expect("PUT").0, 200);
    assert_eq!(http(&api, "GET", path, "").expect("GET").2, "tee-chain");
    let v: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("tee answers");
    assert_eq!(v, "from-tee");
    let (status, _, body) = http(&api, "PUT", path, "sideways").expect("PUT");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        http(&api, "PUT", path, "regular-chain").expect("PUT").0,
        200
    );
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("regular again");
    assert_eq!(pong, "PONG");
    shotover.stop();
}

async fn tee_drops_and_counts_batches_when_its_chain_cannot_keep_up(mode: Mode) {
    // An upstream that accepts connections and never answers.
    let stuck = TcpListener::bind("127.0.0.1:0").expect("bind");
    let stuck_addr = stuck.local_addr().expect("addr");
    let port = free_port();
    let chain = format!(
        "        - Tee:\n            name: \"slow-tee\"\n            buffer_size: 1\n            chain:\n              - RedisSinkSingle: {{ remote_address: \"{stuck_addr}\", connect_timeout_ms: 1000 }}\n{}",
        sink("sink")
    );
    let shotover = mode.start(&source(port, &chain));
    let mut con = connect(port).await;
    for _ in 0..10 {
        let pong: String = redis::cmd("PING")
            .query_async(&mut con)
            .await
            .expect("the client is never slowed");
        assert_eq!(pong, "PONG");
    }
    let dropped = shotover
        .metric("shotover_tee_dropped_messages_count{chain=\"redis\",transform=\"slow-tee\"}")
        .expect("dropped metric");
    assert!(dropped >= 8.0, "{dropped}");
    drop(stuck);
    shotover.stop_expecting(&["tee chain", "upstream connection broke"]);
}

fn request_throttling_answers_overloaded_beyond_its_rate_in_reply_order(mode: Mode) {
    let port = free_port();
    let chain = format!(
        "        - RequestThrottling: {{ max_requests_per_second: 5 }}\n{}",
        sink("throttled-sink")
    );
    let shotover = mode.start(&source(port, &chain));
    // 20 pipelined PINGs: the first 5 pass (a burst up to the rate), later ones are refused.
    let replies = raw(
        &format!("127.0.0.1:{port}"),
        "PING\r\n".repeat(20).as_bytes(),
        20 * "+PONG\r\n".len(),
    );
    let text = String::from_utf8_lossy(&replies).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 20, "{text}");
    assert!(lines[..5].iter().all(|l| *l == "+PONG"), "{text}");
    let refused = lines
        .iter()
        .filter(|l| {
            **l == "-ERR Server overloaded: shotover's RequestThrottling lets 5 requests per second through"
        })
        .count();
    assert!(refused >= 1, "{text}");
    assert_eq!(
        refused + lines.iter().filter(|l| **l == "+PONG").count(),
        20
    );
    assert_eq!(
        shotover.metric(
            r#"shotover_throttled_requests_count{chain="redis",transform="RequestThrottling"}"#
        ),
        Some(refused as f64)
    );
    shotover.stop();
}

crate::in_both_modes!(
    async: [
        debug_printer_logs_requests_and_responses,
        debug_force_encode_re_encodes_every_message_and_clients_see_no_difference,
        debug_force_parse_passes_on_what_it_cannot_parse,
        query_counter_counts_requests_by_command,
        query_type_filter_refuses_what_is_denied_and_keeps_reply_order,
        coalesce_holds_requests_until_the_count_is_reached,
        coalesce_flushes_on_its_timer_without_new_requests,
        tee_ignore_writes_to_both_chains_including_a_tls_upstream,
        tee_fail_on_mismatch_answers_errors_when_the_chains_disagree,
        tee_log_warning_on_mismatch_logs_and_answers_from_the_regular_chain,
        tee_subchain_on_mismatch_sends_the_batch_down_the_mismatch_chain,
        tee_switch_port_flips_which_chain_answers,
        tee_drops_and_counts_batches_when_its_chain_cannot_keep_up,
    ],
    sync: [
        request_throttling_answers_overloaded_beyond_its_rate_in_reply_order,
    ],
);
