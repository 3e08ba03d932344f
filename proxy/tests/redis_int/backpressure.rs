//! Bounded memory: the replies the proxy holds for a client stay under the sink's
//! `max_buffered_reply_bytes` whatever the client pipelines, a client that does not read is
//! held back (dedicated mode) or cut off (shared mode) without costing the others anything,
//! and `read_timeout` fails requests an upstream never answers.
//!
//! The large loads run against a Redis of their own ([`OwnRedis`]): 200 GETs of a 10 MB
//! value make Redis build 2 GB of replies in its one thread before it writes the first byte
//! (6-9 s on these machines, where faulting in 2 GB alone takes 6 s), and a Redis that
//! answers no one for that long would fail whatever other test uses it meanwhile.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// The load: 200 GETs of a 10 MB value, pipelined.
const VALUE: usize = 10 * 1024 * 1024;
const PIPELINE: usize = 200;
/// A sidecar's memory limit: the proxy must stay well under it.
const LIMIT_KIB: u64 = 128 * 1024;

/// How long Redis may take to start answering a large load (it builds every reply first).
const REDIS_BUSY: Duration = Duration::from_secs(120);

/// A `redis-server` of one test's own, on a free port, stopped when dropped.
struct OwnRedis {
    child: Child,
    addr: String,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = free_port().to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .spawn()
            .expect("running redis-server (`e2e/services up redis` installs it)");
        let redis = OwnRedis {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        wait_until(
            "the test's own Redis to answer",
            Duration::from_secs(30),
            || {
                TcpStream::connect(&redis.addr).is_ok_and(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(5))).is_ok()
                        && s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
                        && {
                            let mut reply = [0u8; 7];
                            s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
                        }
                })
            },
        );
        redis
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stores a `len`-byte value under `key`, straight on Redis (too large for redis-cli's argv).
fn set_large(redis: &OwnRedis, key: &str, len: usize) {
    let mut redis = TcpStream::connect(&redis.addr).expect("connect to Redis");
    let head = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${len}\r\n", key.len());
    redis.write_all(head.as_bytes()).expect("write");
    redis.write_all(&vec![b'v'; len]).expect("write");
    redis.write_all(b"\r\n").expect("write");
    let mut reply = [0u8; 5];
    redis.read_exact(&mut reply).expect("SET reply");
    assert_eq!(&reply, b"+OK\r\n");
}

fn gets(key: &str, n: usize) -> Vec<u8> {
    format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len())
        .repeat(n)
        .into_bytes()
}

/// The bytes of `n` replies to GET of the value.
fn replies_len(n: usize) -> usize {
    n * (format!("${VALUE}\r\n").len() + VALUE + 2)
}

/// Reads until EOF or `want` bytes (whichever first); returns the count and the last bytes.
fn read_all(stream: &mut TcpStream, want: usize, limit: Duration) -> (usize, Vec<u8>) {
    read_counting(stream, want, limit, &AtomicUsize::new(0))
}

/// [`read_all`], counting the bytes read so far in `progress`.
fn read_counting(
    stream: &mut TcpStream,
    want: usize,
    limit: Duration,
    progress: &AtomicUsize,
) -> (usize, Vec<u8>) {
    let started = Instant::now();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut total = 0;
    let mut tail = Vec::new();
    while total < want {
        let left = limit.saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "read {total} of {want} bytes in {limit:?}");
        stream.set_read_timeout(Some(left)).expect("timeout");
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                progress.store(total, Ordering::Relaxed);
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 4096 {
                    tail.drain(..tail.len() - 4096);
                }
            }
            Err(e) => panic!("reading after {total} bytes: {e}"),
        }
    }
    (total, tail)
}

/// Waits until the proxy holds replies it cannot write (the client reads nothing).
fn wait_holding(shotover: &Shotover) {
    wait_until("the proxy to hold unread replies", REDIS_BUSY, || {
        shotover
            .metric("shotover_buffered_reply_bytes")
            .is_some_and(|v| v > 0.0)
    });
}

/// Another client, served while the large pipeline is in flight.
fn ping_works(port: u16) -> bool {
    let mut other = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    other
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    other.write_all(b"*1\r\n$4\r\nPING\r\n").expect("write");
    let mut reply = [0u8; 7];
    other.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

fn topology(port: u16, redis: &OwnRedis, mode: Mode, sink_extra: &str) -> String {
    let topology = passthrough(port, &redis.addr, "").replace(
        "connect_timeout_ms: 3000",
        &format!("connect_timeout_ms: 3000{sink_extra}"),
    );
    match mode {
        // One shared connection: the client that does not read shares it with the others.
        Mode::Shared => topology.replace(
            "connect_timeout_ms: 3000",
            "connect_timeout_ms: 3000\n            connection_count: 1",
        ),
        Mode::Dedicated => topology,
    }
}

/// 2 GB of replies pass through a client that reads them; the proxy's peak RSS stays far
/// below them, and other clients are served while they flow.
fn large_pipeline_passes_within_the_reply_cap(mode: Mode) {
    let redis = OwnRedis::start();
    let key = prefix("large-pipeline");
    set_large(&redis, &key, VALUE);
    let port = free_port();
    let shotover = Shotover::start(&topology(port, &redis, mode, ""));
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(&gets(&key, PIPELINE)).expect("write");
    let pid = shotover.pid();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = std::thread::spawn({
        let progress = progress.clone();
        move || {
            read_counting(
                &mut client,
                replies_len(PIPELINE),
                Duration::from_secs(300),
                &progress,
            )
        }
    });
    // Until Redis has built its replies it answers no one, through a proxy or not.
    wait_until("the first replies", REDIS_BUSY, || {
        progress.load(Ordering::Relaxed) > 0 || reader.is_finished()
    });
    // A ping counts only if it was answered while the replies were still flowing. In shared
    // mode it shares the one upstream connection, so its reply comes after the 2 GB queued
    // ahead of it there: it is served, but not necessarily before the last replies reach
    // the reader.
    let mut pings = 0;
    while !reader.is_finished() {
        assert!(ping_works(port), "another client is served");
        if !reader.is_finished() {
            pings += 1;
        }
    }
    let (total, tail) = reader.join().expect("reader");
    assert_eq!(total, replies_len(PIPELINE), "every reply");
    assert!(tail.ends_with(b"vvvv\r\n"));
    assert!(
        pings > 0 || mode == Mode::Shared,
        "no other client was answered while the replies flowed"
    );
    let peak = status_kib(pid, "VmHWM");
    assert!(
        peak < LIMIT_KIB,
        "peak RSS {peak} KiB for {} MiB of replies",
        replies_len(PIPELINE) >> 20
    );
    eprintln!("peak RSS {peak} KiB, {pings} pings served meanwhile");
    shotover.stop();
}

/// A connection of its own: a client that does not read holds the proxy's reading of its
/// replies (Redis keeps them), not its memory; once it reads, nothing is lost.
fn a_client_that_does_not_read_holds_no_more_than_its_cap() {
    let redis = OwnRedis::start();
    let key = prefix("unread");
    set_large(&redis, &key, VALUE);
    let port = free_port();
    let shotover = Shotover::start(&topology(port, &redis, Mode::Dedicated, ""));
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(&gets(&key, PIPELINE)).expect("write");
    wait_holding(&shotover);
    for _ in 0..10 {
        assert!(ping_works(port), "another client is served");
    }
    let rss = status_kib(shotover.pid(), "VmHWM");
    assert!(
        rss < LIMIT_KIB,
        "peak RSS {rss} KiB while the client reads nothing"
    );
    let (total, _) = read_all(&mut client, replies_len(PIPELINE), Duration::from_secs(240));
    assert_eq!(total, replies_len(PIPELINE), "nothing lost once it reads");
    shotover.stop();
}

/// The process budget caps what all connections hold together: a connection whose own cap
/// is 64 MiB holds one reply at a time once the process holds 8 MiB.
fn the_process_budget_holds_a_connection_below_its_own_cap() {
    let redis = OwnRedis::start();
    let key = prefix("budget");
    set_large(&redis, &key, VALUE);
    let port = free_port();
    let topology = topology(
        port,
        &redis,
        Mode::Dedicated,
        "\n            max_buffered_reply_bytes: 67108864",
    );
    let shotover = Shotover::start_with_config(&topology, "max_buffered_reply_bytes: 8388608\n");
    assert_eq!(
        shotover.metric("shotover_buffered_reply_bytes_budget"),
        Some(8388608.0)
    );
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let n = 40;
    client.write_all(&gets(&key, n)).expect("write");
    wait_holding(&shotover);
    let rss = status_kib(shotover.pid(), "VmHWM");
    // Without the budget the connection would hold 64 MiB of replies on top.
    assert!(rss < 56 * 1024, "peak RSS {rss} KiB");
    let (total, _) = read_all(&mut client, replies_len(n), Duration::from_secs(120));
    assert_eq!(total, replies_len(n), "nothing lost once it reads");
    shotover.stop();
}

/// A shared connection cannot wait for a client that does not read: past its cap for a
/// second, the client is cut off with an error for its remaining requests, and the clients
/// sharing the connection go on.
fn a_client_that_does_not_read_is_cut_off_from_a_shared_connection() {
    let redis = OwnRedis::start();
    let key = prefix("unread-shared");
    set_large(&redis, &key, VALUE);
    let port = free_port();
    let shotover = Shotover::start(&topology(port, &redis, Mode::Shared, ""));
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(&gets(&key, PIPELINE)).expect("write");
    wait_until("the client to be cut off", REDIS_BUSY, || {
        shotover
            .metric("shotover_redis_shared_cut_off_count{chain=\"redis\",transform=\"sink\"}")
            .is_some_and(|v| v == 1.0)
    });
    for _ in 0..5 {
        assert!(ping_works(port), "the clients sharing the connection go on");
    }
    let rss = status_kib(shotover.pid(), "VmHWM");
    assert!(rss < LIMIT_KIB, "peak RSS {rss} KiB");
    let (total, tail) = read_all(&mut client, usize::MAX, Duration::from_secs(60));
    assert!(
        total < replies_len(PIPELINE),
        "the rest was not held for it"
    );
    let tail = String::from_utf8_lossy(&tail);
    assert!(tail.contains("did not read its replies"), "{tail}");
    shotover.stop_expecting(&["did not read its replies"]);
}

/// Many replies each below the slack a batch may take without room (here 60 KiB each,
/// 90 MB in all) are bounded by the client's cap all the same.
fn many_medium_replies_to_a_client_that_does_not_read_are_bounded_too() {
    let redis = OwnRedis::start();
    let key = prefix("medium-shared");
    let len = 60 * 1024;
    set_large(&redis, &key, len);
    let port = free_port();
    let shotover = Shotover::start(&topology(port, &redis, Mode::Shared, ""));
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(&gets(&key, 1500)).expect("write");
    wait_until("the client to be cut off", REDIS_BUSY, || {
        shotover
            .metric("shotover_redis_shared_cut_off_count{chain=\"redis\",transform=\"sink\"}")
            .is_some_and(|v| v == 1.0)
    });
    assert!(
        ping_works(port),
        "the client sharing the connection goes on"
    );
    let rss = status_kib(shotover.pid(), "VmHWM");
    assert!(rss < 64 * 1024, "peak RSS {rss} KiB");
    drop(client);
    shotover.stop_expecting(&["did not read its replies"]);
}

/// An upstream that accepts and answers the handshake (`CLIENT SETNAME` of shared
/// connections) but nothing else.
fn black_hole() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let thread = std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    for _ in text.matches("SETNAME").take(1) {
                        let _ = stream.write_all(b"+OK\r\n");
                    }
                }
            });
        }
    });
    (addr, thread)
}

fn read_timeout_fails_requests_a_black_holed_upstream_never_answers(mode: Mode) {
    let (upstream, _thread) = black_hole();
    let port = free_port();
    let topology = passthrough(port, &upstream, "").replace(
        "connect_timeout_ms: 3000",
        "connect_timeout_ms: 3000\n            read_timeout: 1",
    );
    let shotover = mode.start(&topology);
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    let started = Instant::now();
    client.write_all(get).expect("write");
    let reply = String::from_utf8_lossy(&read_available(&mut client, 1, Duration::from_secs(10)))
        .into_owned();
    let took = started.elapsed();
    assert!(
        reply.starts_with("-ERR shotover: upstream") && reply.contains("read_timeout of 1 s"),
        "{reply:?}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    match mode {
        // The client's own connection broke: the client connection is closed with it.
        Mode::Dedicated => {
            let (rest, _) = read_all(&mut client, 1, Duration::from_secs(10));
            assert_eq!(rest, 0, "closed");
        }
        // Only the shared connection failed: the client stays, and its next request tries a
        // new one (which the black hole does not answer either).
        Mode::Shared => {
            client.write_all(get).expect("write");
            let reply =
                String::from_utf8_lossy(&read_available(&mut client, 1, Duration::from_secs(10)))
                    .into_owned();
            assert!(reply.contains("read_timeout of 1 s"), "{reply:?}");
        }
    }
    shotover.stop_expecting(&[
        "upstream connection broke",
        "shared upstream connection failed",
    ]);
}

/// A blocking command may wait longer than `read_timeout`.
async fn read_timeout_spares_blocking_commands(mode: Mode) {
    let port = free_port();
    let topology = passthrough(port, &redis_addr(), "").replace(
        "connect_timeout_ms: 3000",
        "connect_timeout_ms: 3000\n            read_timeout: 1",
    );
    let shotover = mode.start(&topology);
    let mut con = connect(port).await;
    let started = Instant::now();
    let got: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(prefix("never-pushed"))
        .arg(3)
        .query_async(&mut con)
        .await
        .expect("BLPOP times out by itself");
    assert_eq!(got, None);
    assert!(started.elapsed() >= Duration::from_secs(3));
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    shotover.stop();
}

crate::in_both_modes!(
    async: [read_timeout_spares_blocking_commands],
    sync: [
        large_pipeline_passes_within_the_reply_cap,
        read_timeout_fails_requests_a_black_holed_upstream_never_answers,
    ],
);

#[test]
fn dedicated_client_that_does_not_read_holds_no_more_than_its_cap() {
    a_client_that_does_not_read_holds_no_more_than_its_cap()
}

#[test]
fn shared_client_that_does_not_read_is_cut_off() {
    a_client_that_does_not_read_is_cut_off_from_a_shared_connection()
}

#[test]
fn dedicated_process_budget_holds_a_connection_below_its_own_cap() {
    the_process_budget_holds_a_connection_below_its_own_cap()
}

#[test]
fn shared_many_medium_replies_to_a_client_that_does_not_read_are_bounded() {
    many_medium_replies_to_a_client_that_does_not_read_are_bounded_too()
}
