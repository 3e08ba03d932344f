//! Redis traffic through a passthrough chain: what a client sends reaches Redis unchanged
//! and the answers come back in order.

use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;

use crate::helpers::*;

async fn pipelined_requests_keep_their_order_under_50_concurrent_clients(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let p = prefix("order");
    let mut tasks = Vec::new();
    for client in 0..50 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut con = connect(port).await;
            for round in 0..4 {
                let mut pipe = redis::pipe();
                for i in 0..100 {
                    pipe.cmd("SET")
                        .arg(format!("{p}{client}:{i}"))
                        .arg(format!("v{client}.{round}.{i}"));
                    pipe.cmd("INCR").arg(format!("{p}{client}:counter"));
                    pipe.cmd("GET").arg(format!("{p}{client}:{i}"));
                }
                let replies: Vec<redis::Value> =
                    pipe.query_async(&mut con).await.expect("pipeline");
                assert_eq!(replies.len(), 300);
                for i in 0..100 {
                    assert_eq!(replies[i * 3], redis::Value::Okay);
                    let counter: i64 =
                        redis::from_redis_value(replies[i * 3 + 1].clone()).expect("int");
                    assert_eq!(
                        counter,
                        (round * 100 + i + 1) as i64,
                        "INCR replies out of order"
                    );
                    let value: String =
                        redis::from_redis_value(replies[i * 3 + 2].clone()).expect("string");
                    assert_eq!(value, format!("v{client}.{round}.{i}"));
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let chains = shotover
        .metric("shotover_chain_total_count{chain=\"redis\"}")
        .expect("chain metric");
    assert!(chains >= 200.0, "{chains}");
    shotover.stop();
}

async fn values_of_64_mib_go_through_both_ways(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}big", prefix("big"));
    let value: Vec<u8> = (0..64 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut con = connect(port).await;
    let () = con.set(&key, &value).await.expect("SET 64 MiB");
    let len: usize = redis::cmd("STRLEN")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("STRLEN");
    assert_eq!(len, value.len());
    let back: Vec<u8> = con.get(&key).await.expect("GET 64 MiB");
    assert!(back == value, "the 64 MiB value came back different");
    let () = con.del(&key).await.expect("DEL");
    shotover.stop();
}

async fn multi_exec_runs_as_a_transaction(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}tx", prefix("tx"));
    let mut con = connect(port).await;
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .cmd("INCRBY")
        .arg(&key)
        .arg(5)
        .cmd("INCRBY")
        .arg(&key)
        .arg(7)
        .query_async(&mut con)
        .await
        .expect("MULTI/EXEC");
    assert_eq!((a, b), (5, 12));
    // A queued command that fails makes EXEC abort, as Redis decides.
    let raw_reply = raw(
        &format!("127.0.0.1:{port}"),
        format!("MULTI\r\nSET {key} x\r\nNOSUCHCOMMAND\r\nEXEC\r\nGET {key}\r\n").as_bytes(),
        80,
    );
    let text = String::from_utf8_lossy(&raw_reply);
    assert!(
        text.starts_with("+OK\r\n+QUEUED\r\n-ERR unknown command"),
        "{text}"
    );
    assert!(text.contains("-EXECABORT"), "{text}");
    assert!(text.ends_with("$2\r\n12\r\n"), "{text}");
    shotover.stop();
}

async fn blpop_blocks_until_another_client_pushes(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}list", prefix("blpop"));
    let waiter = blpop_in_flight(port, &key, 10).await;
    let mut con = connect(port).await;
    let () = con.rpush(&key, "hello").await.expect("RPUSH");
    let (got, _) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("BLPOP returned")
        .expect("task");
    assert_eq!(got, Some((key, "hello".to_string())));
    shotover.stop();
}

async fn pubsub_messages_flow_back_while_the_subscriber_sends_nothing(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let channel = format!("{}news", prefix("pubsub"));
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
    pubsub.subscribe(&channel).await.expect("SUBSCRIBE");
    pubsub
        .psubscribe(format!("{channel}*"))
        .await
        .expect("PSUBSCRIBE");
    let mut publisher = connect(port).await;
    for i in 0..20 {
        let receivers: i64 = publisher
            .publish(&channel, format!("m{i}"))
            .await
            .expect("PUBLISH");
        assert_eq!(receivers, 2, "one subscription and one pattern");
    }
    let mut messages = pubsub.on_message();
    let mut got = Vec::new();
    while got.len() < 40 {
        let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a pub/sub message within 5 s")
            .expect("stream open");
        got.push((
            msg.get_pattern::<Option<String>>().ok().flatten().is_some(),
            msg.get_payload::<String>().expect("payload"),
        ));
    }
    let plain: Vec<String> = got
        .iter()
        .filter(|(p, _)| !p)
        .map(|(_, m)| m.clone())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(plain, expected);
    drop(messages);
    shotover.stop();
}

async fn subscribed_connection_goes_back_to_normal_after_unsubscribing(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let p = prefix("unsub");
    // RESP2: two channels, one pattern, then UNSUBSCRIBE alone (one reply per channel),
    // PUNSUBSCRIBE, and a normal command.
    let request = format!(
        "SUBSCRIBE {p}a {p}b\r\nPSUBSCRIBE {p}*\r\nUNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nPING\r\nECHO done\r\n"
    );
    let reply = raw(&format!("127.0.0.1:{port}"), request.as_bytes(), 10_000);
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(text.matches("subscribe").count(), 6, "{text}");
    assert!(text.ends_with("+PONG\r\n$4\r\ndone\r\n"), "{text}");
    shotover.stop();
}

async fn inline_commands_work_as_telnet_sends_them(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}inline", prefix("inline"));
    let request = format!("PING\r\n\r\nSET {key} \"two words\"\nGET {key}\r\n");
    let reply = raw(&format!("127.0.0.1:{port}"), request.as_bytes(), 30);
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "+PONG\r\n+OK\r\n$9\r\ntwo words\r\n"
    );
    shotover.stop();
}

async fn unknown_and_module_commands_pass_through_and_the_connection_stays(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let mut con = connect(port).await;
    let err = redis::cmd("NOSUCHCOMMAND")
        .arg("x")
        .query_async::<()>(&mut con)
        .await
        .expect_err("Redis refuses it");
    assert!(err.to_string().contains("unknown command"), "{err}");
    let err = redis::cmd("JSON.GET")
        .arg("k")
        .query_async::<()>(&mut con)
        .await
        .expect_err("no module loaded");
    assert!(err.to_string().contains("unknown command"), "{err}");
    // Redis 7.2+ answers OK; older servers refuse the subcommand. Either way the answer is
    // the server's, and the connection goes on.
    match redis::cmd("CLIENT")
        .arg("SETINFO")
        .arg("LIB-NAME")
        .arg("shotover-test")
        .query_async::<String>(&mut con)
        .await
    {
        Ok(ok) => assert_eq!(ok, "OK"),
        Err(e) => assert!(e.to_string().contains("SETINFO"), "{e}"),
    }
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("still serving");
    assert_eq!(pong, "PONG");
    shotover.stop();
}

async fn redis_py_with_resp3_works_through_the_proxy(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let out = python("resp3.py", &["127.0.0.1", &port.to_string(), &prefix("py")]);
    assert!(out.contains("resp3 ok"), "{out}");
    shotover.stop();
}

async fn redis_cli_talks_through_the_proxy(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}cli", prefix("cli"));
    let p = port.to_string();
    assert_eq!(redis_cli(&["-p", &p, "SET", &key, "v"]).trim(), "OK");
    assert_eq!(redis_cli(&["-p", &p, "GET", &key]).trim(), "v");
    let hello = redis_cli(&["-3", "-p", &p, "HELLO", "3"]);
    assert!(
        hello.contains("proto") && hello.contains("redis"),
        "{hello}"
    );
    shotover.stop();
}

async fn resp3_invalidation_pushes_reach_a_tracking_client_that_sends_nothing(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}tracked", prefix("tracking"));
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        format!("HELLO 3\r\nCLIENT TRACKING on\r\nGET {key}\r\n").as_bytes(),
    )
    .expect("write");
    let mut got = Vec::new();
    wait_until(
        "HELLO, TRACKING and GET replies",
        Duration::from_secs(5),
        || {
            got.extend(read_available(&mut stream, 1, Duration::from_millis(100)));
            got.ends_with(b"+OK\r\n_\r\n")
        },
    );
    let mut writer = connect(port).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("changed")
        .query_async(&mut writer)
        .await
        .expect("SET");
    let push = format!(
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n${}\r\n{key}\r\n",
        key.len()
    );
    let mut pushed = Vec::new();
    wait_until("the invalidation push", Duration::from_secs(5), || {
        pushed.extend(read_available(
            &mut stream,
            push.len(),
            Duration::from_millis(100),
        ));
        pushed.len() >= push.len()
    });
    assert_eq!(String::from_utf8_lossy(&pushed), push);
    shotover.stop();
}

/// Reads from `stream` until what arrived ends with `tail`, or fails after 5 s.
fn read_until(stream: &mut std::net::TcpStream, tail: &[u8], what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    wait_until(what, Duration::from_secs(5), || {
        got.extend(read_available(stream, 1, Duration::from_millis(100)));
        got.ends_with(tail)
    });
    got
}

/// Client-side caching with a redirect, as against Redis directly: the target (RESP3, which
/// only asked for its id) receives the invalidation pushes while it sends nothing, still
/// with `CLIENT REPLY OFF`, and when it goes away the tracking client gets
/// `tracking-redir-broken`.
async fn resp3_tracking_redirect_reaches_a_silent_target_and_reports_it_gone(mode: Mode) {
    use std::io::Write;
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}redirected", prefix("redirect"));
    let connect_raw = || std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut target = connect_raw();
    target.write_all(b"HELLO 3\r\n").expect("write");
    // HELLO's map ends with its (empty) list of modules.
    read_until(&mut target, b"$7\r\nmodules\r\n*0\r\n", "the HELLO reply");
    target.write_all(b"CLIENT ID\r\n").expect("write");
    let reply = String::from_utf8_lossy(&read_until(&mut target, b"\r\n", "the CLIENT ID reply"))
        .into_owned();
    let id = reply
        .strip_prefix(':')
        .map(|id| id.trim_end().to_string())
        .unwrap_or_else(|| panic!("CLIENT ID reply {reply:?}"));
    let mut tracker = connect_raw();
    tracker
        .write_all(
            format!("HELLO 3\r\nCLIENT TRACKING on REDIRECT {id}\r\nGET {key}\r\n").as_bytes(),
        )
        .expect("write");
    read_until(
        &mut tracker,
        b"+OK\r\n_\r\n",
        "HELLO, TRACKING and GET replies",
    );
    let mut writer = connect(port).await;
    let push = format!(
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n${}\r\n{key}\r\n",
        key.len()
    );
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("one")
        .query_async(&mut writer)
        .await
        .expect("SET");
    read_until(
        &mut target,
        push.as_bytes(),
        "the invalidation push on the target",
    );
    // With replies off, pushes still reach the target.
    target.write_all(b"CLIENT REPLY OFF\r\n").expect("write");
    tracker
        .write_all(format!("GET {key}\r\n").as_bytes())
        .expect("write");
    read_until(&mut tracker, b"$3\r\none\r\n", "the tracked GET");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("two")
        .query_async(&mut writer)
        .await
        .expect("SET");
    let after_off = read_until(&mut target, push.as_bytes(), "the push with replies off");
    assert_eq!(
        String::from_utf8_lossy(&after_off),
        push,
        "nothing but the push"
    );
    // The target goes away: at the next invalidation Redis tells the tracking client.
    drop(target);
    tracker
        .write_all(format!("GET {key}\r\n").as_bytes())
        .expect("write");
    read_until(&mut tracker, b"$3\r\ntwo\r\n", "the tracked GET");
    wait_until(
        "the target's upstream connection to close",
        Duration::from_secs(5),
        || {
            !redis_cli(&["-p", &redis_port(), "CLIENT", "LIST"])
                .lines()
                .any(|l| l.starts_with(&format!("id={id} ")))
        },
    );
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("three")
        .query_async(&mut writer)
        .await
        .expect("SET");
    let broken = format!(">2\r\n$21\r\ntracking-redir-broken\r\n:{id}\r\n");
    read_until(&mut tracker, broken.as_bytes(), "tracking-redir-broken");
    shotover.stop();
}

async fn client_reply_off_and_skip_silence_replies_without_hanging(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}quiet", prefix("reply"));
    let request = format!(
        "CLIENT REPLY OFF\r\nSET {key} 1\r\nINCR {key}\r\nCLIENT REPLY ON\r\nGET {key}\r\nCLIENT REPLY SKIP\r\nINCR {key}\r\nGET {key}\r\n"
    );
    let reply = raw(&format!("127.0.0.1:{port}"), request.as_bytes(), 19);
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "+OK\r\n$1\r\n2\r\n$1\r\n3\r\n"
    );
    shotover.stop();
}

async fn quit_pipelined_with_more_commands_answers_up_to_quit_and_closes(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    std::io::Write::write_all(&mut stream, b"PING\r\nQUIT\r\nPING\r\n").expect("write");
    let reply = read_available(&mut stream, 100, Duration::from_secs(2));
    assert_eq!(String::from_utf8_lossy(&reply), "+PONG\r\n+OK\r\n");
    assert!(is_closed(&mut stream, Duration::from_secs(5)));
    // A normal client action: no WARN or ERROR.
    shotover.stop();
}

async fn monitor_streams_other_clients_commands_until_reset(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}monitored", prefix("monitor"));
    let mut monitor = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    std::io::Write::write_all(&mut monitor, b"MONITOR\r\n").expect("write");
    assert_eq!(
        read_available(&mut monitor, 5, Duration::from_secs(5)),
        b"+OK\r\n"
    );
    let mut con = connect(port).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("seen")
        .query_async(&mut con)
        .await
        .expect("SET");
    let mut seen = Vec::new();
    wait_until(
        "the SET in the MONITOR stream",
        Duration::from_secs(5),
        || {
            seen.extend(read_available(&mut monitor, 1, Duration::from_millis(100)));
            String::from_utf8_lossy(&seen).contains(&format!("\"SET\" \"{key}\" \"seen\""))
        },
    );
    std::io::Write::write_all(&mut monitor, b"RESET\r\nPING\r\n").expect("write");
    let mut after = Vec::new();
    wait_until("RESET and PING replies", Duration::from_secs(5), || {
        after.extend(read_available(&mut monitor, 1, Duration::from_millis(100)));
        String::from_utf8_lossy(&after).ends_with("+RESET\r\n+PONG\r\n")
    });
    shotover.stop();
}

async fn resp3_subscriber_can_run_commands_whose_replies_look_like_messages(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let p = prefix("resp3-sub");
    let mut con = connect(port).await;
    let () = redis::cmd("RPUSH")
        .arg(format!("{p}list"))
        .arg("message")
        .arg("x")
        .query_async(&mut con)
        .await
        .map(|_: i64| ())
        .expect("RPUSH");
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        format!("HELLO 3\r\nSUBSCRIBE {p}ch\r\n").as_bytes(),
    )
    .expect("write");
    let mut got = Vec::new();
    wait_until(
        "HELLO and SUBSCRIBE replies",
        Duration::from_secs(5),
        || {
            got.extend(read_available(&mut stream, 1, Duration::from_millis(100)));
            String::from_utf8_lossy(&got).ends_with(":1\r\n")
        },
    );
    std::io::Write::write_all(
        &mut stream,
        format!("LRANGE {p}list 0 -1\r\nPING\r\n").as_bytes(),
    )
    .expect("write");
    let expected = "*2\r\n$7\r\nmessage\r\n$1\r\nx\r\n+PONG\r\n";
    let reply = read_available(&mut stream, expected.len(), Duration::from_secs(5));
    assert_eq!(String::from_utf8_lossy(&reply), expected);
    shotover.stop();
}

async fn a_client_leaving_during_blpop_does_not_take_an_element_with_it(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}left", prefix("blpop-gone"));
    let name = prefix("blpop-gone").replace(':', "-");
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        format!("CLIENT SETNAME {name}\r\nBLPOP {key} 30\r\n").as_bytes(),
    )
    .expect("write");
    wait_until(
        "the client to block in BLPOP",
        Duration::from_secs(5),
        || client_line(&name).is_some_and(|l| l.contains("cmd=blpop")),
    );
    drop(stream);
    // Redis sees the upstream connection go too, so nobody is blocked any more...
    wait_until(
        "the blocked upstream connection to go",
        Duration::from_secs(5),
        || client_line(&name).is_none(),
    );
    // ...and an element pushed now stays in the list.
    let mut con = connect(port).await;
    let () = redis::cmd("RPUSH")
        .arg(&key)
        .arg("kept")
        .query_async(&mut con)
        .await
        .map(|_: i64| ())
        .expect("RPUSH");
    let len: i64 = redis::cmd("LLEN")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("LLEN");
    assert_eq!(len, 1);
    shotover.stop();
}

async fn status_lines_longer_than_64_kib_from_redis_pass_through(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let mut con = connect(port).await;
    let reply: String = redis::cmd("EVAL")
        .arg("return redis.status_reply(string.rep('x', 70000))")
        .arg(0)
        .query_async(&mut con)
        .await
        .expect("a 70000-byte status line");
    assert_eq!(reply.len(), 70000);
    shotover.stop();
}

async fn reset_then_client_reply_off_in_one_pipeline_keeps_counting_replies(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}reset", prefix("reset-reply"));
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        format!("RESET\r\nCLIENT REPLY OFF\r\nSET {key} 1\r\n").as_bytes(),
    )
    .expect("write");
    assert_eq!(
        read_available(&mut stream, 8, Duration::from_secs(5)),
        b"+RESET\r\n"
    );
    std::io::Write::write_all(
        &mut stream,
        format!("SET {key} 2\r\nCLIENT REPLY ON\r\nGET {key}\r\n").as_bytes(),
    )
    .expect("write");
    assert_eq!(
        String::from_utf8_lossy(&read_available(&mut stream, 12, Duration::from_secs(5))),
        "+OK\r\n$1\r\n2\r\n"
    );
    shotover.stop();
}

async fn a_script_reply_nested_deeper_than_1024_levels_reaches_the_client(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let (request, expected) = nested_script(3000);
    // What Redis itself answers, so the test checks the proxy against Redis.
    let direct = raw(&redis_addr(), request.as_bytes(), expected.len());
    assert_eq!(direct, expected, "Redis's own reply");
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(&mut client, request.as_bytes()).expect("write");
    let got = read_available(&mut client, expected.len(), Duration::from_secs(5));
    assert!(
        got == expected,
        "the proxy's reply differs from Redis's ({} bytes)",
        got.len()
    );
    std::io::Write::write_all(&mut client, b"PING\r\n").expect("write");
    assert_eq!(
        read_available(&mut client, 7, Duration::from_secs(5)),
        b"+PONG\r\n",
        "the connection stays"
    );
    shotover.stop();
}

async fn resp3_subscribe_with_replies_off_still_gets_its_pushes(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let channel = prefix("silent-sub");
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(&mut client, b"HELLO 3\r\n").expect("write");
    let hello = read_available(&mut client, 1, Duration::from_secs(5));
    assert!(
        hello.starts_with(b"%"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    // Whatever else of the HELLO map is still on its way.
    let _ = read_available(&mut client, usize::MAX, Duration::from_millis(300));
    // Redis answers neither command, but sends the confirmation as a push.
    std::io::Write::write_all(
        &mut client,
        format!("CLIENT REPLY OFF\r\nSUBSCRIBE {channel}\r\n").as_bytes(),
    )
    .expect("write");
    let confirmation = format!(
        ">3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:1\r\n",
        channel.len()
    );
    assert_eq!(
        String::from_utf8_lossy(&read_available(
            &mut client,
            confirmation.len(),
            Duration::from_secs(5)
        )),
        confirmation
    );
    // The subscriber sends nothing more; a message published elsewhere reaches it.
    assert_eq!(
        redis_cli(&["-p", &redis_port(), "PUBLISH", &channel, "hi"]).trim(),
        "1"
    );
    let message = format!(
        ">3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n$2\r\nhi\r\n",
        channel.len()
    );
    assert_eq!(
        String::from_utf8_lossy(&read_available(
            &mut client,
            message.len(),
            Duration::from_secs(5)
        )),
        message
    );
    shotover.stop();
}

crate::in_both_modes!(
    async: [
        pipelined_requests_keep_their_order_under_50_concurrent_clients,
        values_of_64_mib_go_through_both_ways,
        a_script_reply_nested_deeper_than_1024_levels_reaches_the_client,
        resp3_subscribe_with_replies_off_still_gets_its_pushes,
        multi_exec_runs_as_a_transaction,
        blpop_blocks_until_another_client_pushes,
        pubsub_messages_flow_back_while_the_subscriber_sends_nothing,
        subscribed_connection_goes_back_to_normal_after_unsubscribing,
        inline_commands_work_as_telnet_sends_them,
        unknown_and_module_commands_pass_through_and_the_connection_stays,
        redis_py_with_resp3_works_through_the_proxy,
        redis_cli_talks_through_the_proxy,
        resp3_invalidation_pushes_reach_a_tracking_client_that_sends_nothing,
        resp3_tracking_redirect_reaches_a_silent_target_and_reports_it_gone,
        client_reply_off_and_skip_silence_replies_without_hanging,
        quit_pipelined_with_more_commands_answers_up_to_quit_and_closes,
        monitor_streams_other_clients_commands_until_reset,
        resp3_subscriber_can_run_commands_whose_replies_look_like_messages,
        a_client_leaving_during_blpop_does_not_take_an_element_with_it,
        status_lines_longer_than_64_kib_from_redis_pass_through,
        reset_then_client_reply_off_in_one_pipeline_keeps_counting_replies,
    ],
    sync: [
    ],
);
