//! Shared mode (`connection_count`): many clients over a few upstream connections, and the
//! session state that moves a client to another lane or pins it to a connection of its own.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crate::helpers::*;

/// A passthrough in shared mode with `count` connections per lane, its sink named uniquely
/// (its shared connections are `shotover-shared-<sink>` on Redis). Returns the proxy, its
/// port and the sink's name.
fn start_shared(test: &str, count: usize) -> (Shotover, u16, String) {
    start_shared_with(test, count, &[])
}

/// [`start_shared`] with extra command-line arguments.
fn start_shared_with(test: &str, count: usize, args: &[&str]) -> (Shotover, u16, String) {
    let port = free_port();
    let sink = prefix(test).replace(':', "-");
    let topology = passthrough(port, &redis_addr(), "")
        .replace("name: \"sink\"", &format!("name: \"{sink}\""))
        .replace(
            "connect_timeout_ms: 3000",
            &format!("connect_timeout_ms: 3000\n            connection_count: {count}"),
        );
    let shotover = Shotover::spawn(&topology, args);
    shotover.wait_ready();
    (shotover, port, sink)
}

/// How many connections Redis lists under `name`.
fn connections_named(name: &str) -> usize {
    redis_cli(&["-p", &redis_port(), "CLIENT", "LIST"])
        .lines()
        .filter(|l| l.split(' ').any(|f| f == format!("name={name}")))
        .count()
}

fn gauge(shotover: &Shotover, metric: &str, sink: &str) -> f64 {
    shotover
        .metric(&format!("{metric}{{chain=\"redis\",transform=\"{sink}\"}}"))
        .unwrap_or_else(|| panic!("{metric} of {sink} is exported"))
}

/// Sends `request` on a raw connection and reads `expected_len` bytes of reply.
fn roundtrip(stream: &mut TcpStream, request: &str, expected_len: usize) -> String {
    stream.write_all(request.as_bytes()).expect("write");
    String::from_utf8_lossy(&read_available(
        stream,
        expected_len,
        Duration::from_secs(5),
    ))
    .into_owned()
}

fn raw(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    stream
}

/// `clients` connections through `port`, each running 20 pipelines of INCR, SET and GET
/// on its own keys and checking every reply is its own, in order. Returns the connections,
/// still open.
async fn pipelining_clients(
    port: u16,
    p: &str,
    clients: usize,
) -> Vec<redis::aio::MultiplexedConnection> {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let p = p.to_string();
        tasks.push(tokio::spawn(async move {
            let mut con = connect(port).await;
            for round in 0..20 {
                let mut pipe = redis::pipe();
                for i in 0..10 {
                    pipe.cmd("INCR").arg(format!("{p}{client}"));
                    pipe.cmd("SET")
                        .arg(format!("{p}{client}:{i}"))
                        .arg(format!("{round}.{i}"));
                    pipe.cmd("GET").arg(format!("{p}{client}:{i}"));
                }
                let replies: Vec<redis::Value> =
                    pipe.query_async(&mut con).await.expect("pipeline");
                for i in 0..10 {
                    let n: i64 = redis::from_redis_value(replies[i * 3].clone()).expect("int");
                    assert_eq!(n, (round * 10 + i + 1) as i64, "INCR replies out of order");
                    let v: String =
                        redis::from_redis_value(replies[i * 3 + 2].clone()).expect("string");
                    assert_eq!(
                        v,
                        format!("{round}.{i}"),
                        "a reply went to the wrong client"
                    );
                }
            }
            con
        }));
    }
    let mut connections = Vec::new();
    for task in tasks {
        connections.push(task.await.expect("client task"));
    }
    connections
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_pipelining_clients_share_two_upstream_connections_and_keep_their_order() {
    let (shotover, port, sink) = start_shared("fifty", 2);
    let connections = pipelining_clients(port, &prefix("fifty"), 50).await;
    // 50 client connections open, at most 2 upstream connections on Redis.
    let upstream = connections_named(&format!("shotover-shared-{sink}"));
    assert!(
        (1..=2).contains(&upstream),
        "{upstream} shared connections on Redis"
    );
    let open = gauge(&shotover, "shotover_redis_shared_connections", &sink);
    assert_eq!(open, upstream as f64);
    assert_eq!(
        gauge(&shotover, "shotover_redis_pinned_connections", &sink),
        0.0
    );
    drop(connections);
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn select_and_auth_move_a_client_to_its_own_lane_and_a_wrong_password_moves_nobody() {
    let (shotover, port, sink) = start_shared("lanes", 1);
    let user = prefix("lane-user").replace(':', "-");
    let key = prefix("lanes");
    assert_eq!(
        redis_cli(&[
            "-p",
            &redis_port(),
            "ACL",
            "SETUSER",
            &user,
            "on",
            ">s3cret",
            "~*",
            "+@all",
        ])
        .trim(),
        "OK"
    );
    let mut a = raw(port);
    let mut b = raw(port);
    // SELECT moves `a` to db 9; `b` stays on db 0, over the same proxy.
    assert_eq!(roundtrip(&mut a, "SELECT 9\r\n", 5), "+OK\r\n");
    assert_eq!(
        roundtrip(&mut a, &format!("SET {key} nine\r\n"), 5),
        "+OK\r\n"
    );
    assert_eq!(roundtrip(&mut b, &format!("GET {key}\r\n"), 5), "$-1\r\n");
    assert_eq!(
        roundtrip(&mut a, &format!("GET {key}\r\n"), 10),
        "$4\r\nnine\r\n"
    );
    let direct = redis_cli(&["-p", &redis_port(), "-n", "9", "GET", &key]);
    assert_eq!(direct.trim(), "nine");
    // An out-of-range database is refused as Redis refuses it, and `a` stays on db 9.
    let refused = roundtrip(&mut a, "SELECT 100000\r\n", 20);
    assert!(
        refused.starts_with("-ERR DB index is out of range"),
        "{refused}"
    );
    assert_eq!(
        roundtrip(&mut a, &format!("GET {key}\r\n"), 10),
        "$4\r\nnine\r\n"
    );
    // AUTH with the right password moves `b` to the user's lane...
    assert_eq!(
        roundtrip(&mut b, &format!("AUTH {user} s3cret\r\n"), 5),
        "+OK\r\n"
    );
    let whoami = format!("${}\r\n{user}\r\n", user.len());
    assert_eq!(roundtrip(&mut b, "ACL WHOAMI\r\n", whoami.len()), whoami);
    // ...a wrong one is refused by Redis and moves nobody.
    let wrong = roundtrip(&mut a, &format!("AUTH {user} wrong\r\n"), 10);
    assert!(wrong.starts_with("-WRONGPASS"), "{wrong}");
    assert_eq!(roundtrip(&mut a, "ACL WHOAMI\r\n", 13), "$7\r\ndefault\r\n");
    assert_eq!(
        roundtrip(&mut a, &format!("GET {key}\r\n"), 10),
        "$4\r\nnine\r\n"
    );
    // A third client with the same password rides the user's lane only after its own AUTH.
    let mut c = raw(port);
    assert_eq!(roundtrip(&mut c, "ACL WHOAMI\r\n", 13), "$7\r\ndefault\r\n");
    assert_eq!(
        roundtrip(&mut c, &format!("AUTH {user} s3cret\r\n"), 5),
        "+OK\r\n"
    );
    assert_eq!(roundtrip(&mut c, "ACL WHOAMI\r\n", whoami.len()), whoami);
    // RESET takes it back to the default lane.
    assert_eq!(roundtrip(&mut c, "RESET\r\n", 8), "+RESET\r\n");
    assert_eq!(roundtrip(&mut c, "ACL WHOAMI\r\n", 13), "$7\r\ndefault\r\n");
    // Three lanes (db 0, db 9, the user), one connection each, nobody pinned.
    assert_eq!(connections_named(&format!("shotover-shared-{sink}")), 3);
    assert_eq!(
        gauge(&shotover, "shotover_redis_pinned_connections", &sink),
        0.0
    );
    redis_cli(&["-p", &redis_port(), "ACL", "DELUSER", &user]);
    redis_cli(&["-p", &redis_port(), "-n", "9", "DEL", &key]);
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_and_blocking_commands_pin_the_client_only_while_they_last() {
    let (shotover, port, sink) = start_shared("pin", 1);
    let key = prefix("pin");
    let name = prefix("pinned-client").replace(':', "-");
    let mut a = raw(port);
    assert_eq!(
        roundtrip(&mut a, &format!("CLIENT SETNAME {name}\r\n"), 5),
        "+OK\r\n"
    );
    let getname = format!("${}\r\n{name}\r\n", name.len());
    assert_eq!(
        roundtrip(&mut a, "CLIENT GETNAME\r\n", getname.len()),
        getname
    );
    // Not on Redis: the name is the proxy's until the client gets a connection of its own.
    assert_eq!(connections_named(&name), 0);
    a.write_all(format!("MULTI\r\nINCR {key}\r\n").as_bytes())
        .expect("write");
    assert_eq!(
        String::from_utf8_lossy(&read_available(&mut a, 14, Duration::from_secs(5))),
        "+OK\r\n+QUEUED\r\n"
    );
    // Pinned, on a connection that carries the client's name.
    assert_eq!(
        gauge(&shotover, "shotover_redis_pinned_connections", &sink),
        1.0
    );
    assert_eq!(connections_named(&name), 1);
    assert_eq!(roundtrip(&mut a, "EXEC\r\n", 8), "*1\r\n:1\r\n");
    wait_until("the client to be unpinned", Duration::from_secs(5), || {
        connections_named(&name) == 0
    });
    assert_eq!(
        gauge(&shotover, "shotover_redis_pinned_connections", &sink),
        0.0
    );
    // WATCH pins until EXEC; a write by someone else aborts the transaction, as on Redis.
    assert_eq!(roundtrip(&mut a, &format!("WATCH {key}\r\n"), 5), "+OK\r\n");
    redis_cli(&["-p", &redis_port(), "INCR", &key]);
    a.write_all(format!("MULTI\r\nINCR {key}\r\nEXEC\r\n").as_bytes())
        .expect("write");
    assert_eq!(
        String::from_utf8_lossy(&read_available(&mut a, 19, Duration::from_secs(5))),
        "+OK\r\n+QUEUED\r\n*-1\r\n"
    );
    // A blocking pop waits on a connection of its own while other clients go on.
    let list = format!("{key}:list");
    a.write_all(format!("BLPOP {list} 5\r\n").as_bytes())
        .expect("write");
    wait_until("the client to block", Duration::from_secs(5), || {
        client_line(&name).is_some_and(|l| l.contains("cmd=blpop"))
    });
    let mut b = raw(port);
    assert_eq!(
        roundtrip(&mut b, &format!("RPUSH {list} x\r\n"), 4),
        ":1\r\n"
    );
    let popped = format!("*2\r\n${}\r\n{list}\r\n$1\r\nx\r\n", list.len());
    assert_eq!(
        String::from_utf8_lossy(&read_available(
            &mut a,
            popped.len(),
            Duration::from_secs(5)
        )),
        popped
    );
    wait_until("the client to be unpinned", Duration::from_secs(5), || {
        connections_named(&name) == 0
    });
    redis_cli(&["-p", &redis_port(), "DEL", &key]);
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_with_requests_in_flight_takes_nothing_from_the_others() {
    let (shotover, port, sink) = start_shared("leaver", 1);
    let key = prefix("leaver");
    let others = {
        let key = key.clone();
        tokio::spawn(async move {
            let mut con = connect(port).await;
            for i in 1..=2000i64 {
                let n: i64 = redis::cmd("INCR")
                    .arg(format!("{key}:steady"))
                    .query_async(&mut con)
                    .await
                    .expect("the steady client is served");
                assert_eq!(n, i);
            }
        })
    };
    for _ in 0..20 {
        // 5000 pipelined INCRs, then gone without reading a reply.
        let mut leaver = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let pipeline = format!("INCR {key}:left\r\n").repeat(5000);
        leaver.write_all(pipeline.as_bytes()).expect("write");
        drop(leaver);
    }
    others.await.expect("the steady client");
    // The shared connection is still the one it was, and serves.
    let mut con = connect(port).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    assert_eq!(connections_named(&format!("shotover-shared-{sink}")), 1);
    let left: i64 = redis_cli(&["-p", &redis_port(), "GET", &format!("{key}:left")])
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(left <= 100_000, "{left}");
    redis_cli(&[
        "-p",
        &redis_port(),
        "DEL",
        &format!("{key}:left"),
        &format!("{key}:steady"),
    ]);
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_py_in_resp2_and_resp3_shares_connections_and_pins_nobody() {
    let (shotover, port, sink) = start_shared("redis-py", 2);
    let out = python(
        "shared.py",
        &["127.0.0.1", &port.to_string(), &prefix("py-shared")],
    );
    assert!(out.contains("shared ok"), "{out}");
    // HELLO 3, CLIENT SETNAME and CLIENT SETINFO at connect pin nobody: a RESP2 lane and a
    // RESP3 lane served everything.
    let pins = shotover
        .metric(&format!(
            "shotover_redis_pins_count{{chain=\"redis\",transform=\"{sink}\"}}"
        ))
        .expect("pins metric");
    assert_eq!(pins, 0.0);
    assert!(gauge(&shotover, "shotover_redis_shared_connections", &sink) >= 2.0);
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_goes_where_the_writes_went_and_long_waits_are_refused() {
    let (shotover, port, _sink) = start_shared("wait", 2);
    let key = prefix("wait");
    let mut a = raw(port);
    a.write_all(format!("SET {key} 1\r\nWAIT 0 100\r\n").as_bytes())
        .expect("write");
    assert_eq!(
        String::from_utf8_lossy(&read_available(&mut a, 9, Duration::from_secs(5))),
        "+OK\r\n:0\r\n"
    );
    let refused = roundtrip(&mut a, "WAIT 1 0\r\n", 20);
    assert!(
        refused.starts_with("-ERR shotover: a WAIT/WAITAOF timeout of 0"),
        "{refused}"
    );
    assert_eq!(roundtrip(&mut a, "PING\r\n", 7), "+PONG\r\n");
    redis_cli(&["-p", &redis_port(), "DEL", &key]);
    shotover.stop();
}

/// `--thread-per-core` with two threads: client connections are handed to the threads in
/// turn, each thread has its own shared connection (`connection_count: 1` per thread), and
/// every reply still reaches its own client in order; a transaction pins its client on
/// either thread, and redis-py shares connections there too.
#[tokio::test(flavor = "multi_thread")]
async fn thread_per_core_keeps_shared_connections_per_thread_and_every_reply_with_its_client() {
    let (shotover, port, sink) =
        start_shared_with("tpc", 1, &["--thread-per-core", "--core-threads", "2"]);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", shotover.pid()))
        .expect("the proxy's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("shotover-core-"))
        .collect();
    assert_eq!(threads.len(), 2, "{threads:?}");
    let p = prefix("tpc");
    let connections = pipelining_clients(port, &p, 40).await;
    assert_eq!(connections_named(&format!("shotover-shared-{sink}")), 2);
    assert_eq!(
        gauge(&shotover, "shotover_redis_shared_connections", &sink),
        2.0
    );
    // Two more clients, one on each thread, each with a transaction (pinned) between
    // shared requests.
    for client in 0..2 {
        let key = format!("{p}tx{client}");
        let mut con = connect(port).await;
        let (a, b): (i64, i64) = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg(&key)
            .cmd("INCR")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("MULTI/EXEC");
        assert_eq!((a, b), (1, 2));
        let after: i64 = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("GET");
        assert_eq!(after, 2);
    }
    assert_eq!(gauge(&shotover, "shotover_redis_pins_count", &sink), 2.0);
    let out = python(
        "shared.py",
        &["127.0.0.1", &port.to_string(), &prefix("py-tpc")],
    );
    assert!(out.contains("shared ok"), "{out}");
    drop(connections);
    let mut keys = vec!["DEL".to_string()];
    for client in 0..40 {
        keys.push(format!("{p}{client}"));
        keys.extend((0..10).map(|i| format!("{p}{client}:{i}")));
    }
    keys.extend((0..2).map(|client| format!("{p}tx{client}")));
    let mut args = vec!["-p".to_string(), redis_port()];
    args.extend(keys);
    redis_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    shotover.stop();
}
