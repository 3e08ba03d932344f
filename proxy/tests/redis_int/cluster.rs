//! `RedisSinkCluster` and `RedisClusterPortsRewrite` in front of the real Redis Cluster of
//! `e2e/services up redis-cluster` (3 masters, 3 replicas): plain and cluster-aware clients,
//! commands over every master, contact points that are down, resharding and failover under
//! traffic.
//!
//! Tests that change the cluster's layout or flush it hold [`LAYOUT`] for writing; the
//! others hold it for reading, so they never see each other's reshard or FLUSHALL.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::helpers::*;

static LAYOUT: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The cluster's nodes. A missing cluster is a failure, not a skip.
fn cluster_addrs() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_ADDRS")
        .expect("REDIS_CLUSTER_ADDRS is not set: start the cluster with `eval \"$(e2e/services up redis-cluster)\"` (the test command does this)")
        .split(',')
        .map(str::to_string)
        .collect()
}

fn port_of(addr: &str) -> String {
    addr.rsplit_once(':').expect("host:port").1.to_string()
}

fn cli(addr: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port_of(addr)])
        .args(args)
        .output()
        .expect("running redis-cli (e2e/services installs it)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `CLUSTER NODES` of the first node that answers: (id, addr, is master, master id).
fn nodes() -> Vec<(String, String, bool, String)> {
    for addr in cluster_addrs() {
        let text = cli(&addr, &["cluster", "nodes"]);
        if text.is_empty() {
            continue;
        }
        return text
            .lines()
            .filter(|l| !l.contains("fail"))
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let addr = f[1].split('@').next().unwrap_or_default().to_string();
                (
                    f[0].to_string(),
                    addr,
                    f[2].contains("master"),
                    f[3].to_string(),
                )
            })
            .collect();
    }
    panic!("no cluster node answered CLUSTER NODES");
}

fn hiding_topology(port: u16, points: &[String], extra: &str) -> String {
    let points: Vec<String> = points.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        r#"
sources:
  - Valkey:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - ValkeySinkCluster:
            name: "cluster"
            first_contact_points: [{}]
            connect_timeout_ms: 2000
{extra}
"#,
        points.join(", ")
    )
}

fn cluster_ok() -> bool {
    let mut masters = 0;
    for addr in cluster_addrs() {
        if !cli(&addr, &["cluster", "info"]).contains("cluster_state:ok") {
            return false;
        }
        let info = cli(&addr, &["info", "replication"]);
        if info.contains("role:master") {
            masters += 1;
        } else if !info.contains("master_link_status:up") {
            return false;
        }
    }
    masters == 3
}

#[test]
fn redis_py_sees_one_redis_through_the_hiding_proxy() {
    plain_redis_py_through_the_hiding_proxy(false)
}

/// The same with every request and reply re-encoded by the proxy's RESP codec first
/// (upstream's `cluster-hiding/topology-encode.yaml`): what redis-py reads is the same.
#[test]
fn redis_py_sees_one_redis_through_the_hiding_proxy_with_every_message_re_encoded() {
    plain_redis_py_through_the_hiding_proxy(true)
}

fn plain_redis_py_through_the_hiding_proxy(encode: bool) {
    let _layout = LAYOUT.blocking_read();
    let port = free_port();
    let mut topology = hiding_topology(port, &cluster_addrs()[..2], "");
    if encode {
        topology = topology.replace(
            "      chain:\n",
            "      chain:\n        - DebugForceEncode: {encode_requests: true, encode_responses: true}\n",
        );
    }
    let shotover = Shotover::start(&topology);
    let out = python(
        "cluster_plain.py",
        &[
            "127.0.0.1",
            &port.to_string(),
            &prefix("cluster_plain"),
            &cluster_addrs().join(","),
        ],
    );
    assert!(out.contains("cluster plain ok"), "{out}");
    if encode {
        assert_eq!(
            shotover.metric(
                r#"shotover_debug_force_unparsed_count{chain="redis",transform="DebugForceEncode"}"#
            ),
            Some(0.0),
            "every message parsed"
        );
    }
    shotover.stop();
}

/// A cluster that speaks only TLS (`e2e/services up redis-cluster-tls`), hidden behind a
/// proxy that speaks TLS to its clients too, as upstream's `cluster-tls` topology: redis-py's
/// whole plain-client run passes, with its own direct checks of the nodes over TLS.
#[test]
fn redis_py_sees_one_redis_through_a_tls_hiding_proxy_to_a_tls_cluster() {
    let nodes = std::env::var("REDIS_CLUSTER_TLS_ADDRS").expect(
        "REDIS_CLUSTER_TLS_ADDRS is not set: start the TLS cluster with `eval \"$(e2e/services up redis-cluster-tls)\"` (the test command does this)",
    );
    let ca = std::env::var("REDIS_CLUSTER_TLS_CA").expect("REDIS_CLUSTER_TLS_CA (e2e/services)");
    let dir = std::path::Path::new(&ca)
        .parent()
        .expect("the CA's folder")
        .to_path_buf();
    let port = free_port();
    let points: Vec<String> = nodes.split(',').map(|p| format!("\"{p}\"")).collect();
    let topology = format!(
        r#"
sources:
  - Valkey:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      tls:
        certificate_path: "{crt}"
        private_key_path: "{key}"
      chain:
        - ValkeySinkCluster:
            name: "cluster"
            first_contact_points: [{points}]
            connect_timeout_ms: 3000
            tls:
              certificate_authority_path: "{ca}"
              verify_hostname: true
"#,
        crt = dir.join("server.crt").display(),
        key = dir.join("server.key").display(),
        points = points.join(", "),
    );
    let shotover = Shotover::start(&topology);
    let out = python(
        "cluster_plain.py",
        &[
            "127.0.0.1",
            &port.to_string(),
            &prefix("cluster_tls"),
            &nodes,
            &ca,
        ],
    );
    assert!(out.contains("cluster plain ok"), "{out}");
    shotover.stop();
}

#[test]
fn cluster_aware_redis_py_talks_only_to_the_proxy_with_the_ports_rewrite() {
    let _layout = LAYOUT.blocking_read();
    let port = free_port();
    let topology = ports_rewrite_topology(port);
    let shotover = Shotover::start(&topology);
    let out = python(
        "cluster_aware.py",
        &["127.0.0.1", &port.to_string(), &prefix("cluster_aware")],
    );
    assert!(out.contains("cluster aware ok"), "{out}");
    // What a cluster-aware client reads names the proxy's port only.
    let slots = redis_cli(&["-p", &port.to_string(), "cluster", "slots"]);
    let cluster_ports: Vec<String> = cluster_addrs().iter().map(|a| port_of(a)).collect();
    assert!(slots.contains(&port.to_string()), "{slots}");
    assert!(
        !slots
            .lines()
            .any(|l| cluster_ports.contains(&l.to_string())),
        "{slots}"
    );
    let nodes = redis_cli(&["-p", &port.to_string(), "cluster", "nodes"]);
    assert_eq!(nodes.lines().count(), 6, "{nodes}");
    assert!(
        nodes.lines().all(|l| l
            .split(' ')
            .nth(1)
            .is_some_and(|a| a.starts_with(&format!("127.0.0.1:{port}@")))),
        "{nodes}"
    );
    shotover.stop();
}

fn ports_rewrite_topology(port: u16) -> String {
    format!(
        r#"
sources:
  - Valkey:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - ValkeyClusterPortsRewrite:
            new_port: {port}
        - ValkeySinkCluster:
            first_contact_points: ["{}"]
            connect_timeout_ms: 3000
"#,
        cluster_addrs()[0]
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_crate_cluster_client_works_through_the_ports_rewrite() {
    let _layout = LAYOUT.read().await;
    let port = free_port();
    let shotover = Shotover::start(&ports_rewrite_topology(port));
    let client = redis::cluster::ClusterClient::new(vec![format!("redis://127.0.0.1:{port}/")])
        .expect("cluster client");
    let mut conn = client
        .get_async_connection()
        .await
        .expect("the cluster client connects through the proxy");
    let p = prefix("crate_cluster");
    for i in 0..300 {
        let () = conn.set(format!("{p}{i}"), i).await.expect("SET");
    }
    for i in (0..300).step_by(37) {
        let got: i64 = conn.get(format!("{p}{i}")).await.expect("GET");
        assert_eq!(got, i);
    }
    let tagged: Vec<String> = (0..10).map(|i| format!("{{{p}t}}{i}")).collect();
    for (i, k) in tagged.iter().enumerate() {
        let () = conn.set(k, i).await.expect("SET");
    }
    let values: Vec<i64> = conn.mget(&tagged).await.expect("MGET in one slot");
    assert_eq!(values, (0..10).collect::<Vec<i64>>());
    // The cluster client sends a pipeline to one node: its keys share a slot.
    let mut pipe = redis::pipe();
    for k in &tagged {
        pipe.incr(k, 100);
    }
    let incremented: Vec<i64> = pipe.query_async(&mut conn).await.expect("pipeline");
    assert_eq!(incremented, (100..110).collect::<Vec<i64>>());
    let _: i64 = conn.del(&tagged).await.expect("DEL");
    for i in 0..300 {
        let _: i64 = conn.del(format!("{p}{i}")).await.expect("DEL");
    }
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_commands_reach_every_master() {
    let _layout = LAYOUT.write().await;
    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(port, &cluster_addrs(), ""));
    let mut conn = connect(port).await;
    let p = prefix("keyless");
    let masters: Vec<String> = nodes().into_iter().filter(|n| n.2).map(|n| n.1).collect();
    assert_eq!(masters.len(), 3);
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    for m in &masters {
        assert_eq!(cli(m, &["dbsize"]), "0", "{m} was flushed");
    }
    for i in 0..300 {
        let () = conn.set(format!("{p}{i}"), i).await.expect("SET");
    }
    let direct: i64 = masters
        .iter()
        .map(|m| cli(m, &["dbsize"]).parse::<i64>().expect("dbsize"))
        .sum();
    assert_eq!(direct, 300);
    assert!(masters.iter().all(|m| cli(m, &["dbsize"]) != "0"));
    let dbsize: i64 = redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .expect("DBSIZE");
    assert_eq!(dbsize, 300);
    let mut keys: Vec<String> = conn.keys(format!("{p}*")).await.expect("KEYS");
    keys.sort();
    let mut expected: Vec<String> = (0..300).map(|i| format!("{p}{i}")).collect();
    expected.sort();
    assert_eq!(keys, expected);
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    let () = redis::cmd("FLUSHDB")
        .query_async(&mut conn)
        .await
        .expect("FLUSHDB");
    let dbsize: i64 = redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .expect("DBSIZE");
    assert_eq!(dbsize, 0);
    // A command whose keys span slots and that cannot be split is refused as Redis
    // Cluster refuses it.
    let err = redis::cmd("RENAME")
        .arg("a")
        .arg("b")
        .query_async::<()>(&mut conn)
        .await
        .expect_err("cross-slot RENAME");
    assert!(err.to_string().contains("same slot"), "{err}");
    shotover.stop();
}

/// An ACL user of the cluster (made on every node for this test): its AUTH, and a HELLO with
/// AUTH, apply on every node the client's requests reach; the nodes' own refusals
/// (NOPERM for a key outside the user's patterns, WRONGPASS) reach the client.
#[tokio::test(flavor = "multi_thread")]
async fn auth_and_hello_credentials_apply_on_every_node_the_client_reaches() {
    use std::io::Write;
    let _layout = LAYOUT.read().await;
    let p = prefix("acl");
    let user = format!("{}user", p.replace(':', "_"));
    let pattern = format!("~{p}*");
    for addr in cluster_addrs() {
        let ok = cli(
            &addr,
            &["acl", "setuser", &user, "on", ">secret", &pattern, "+@all"],
        );
        assert_eq!(ok, "OK", "ACL SETUSER on {addr}");
    }
    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(port, &cluster_addrs(), ""));
    let client =
        redis::Client::open(format!("redis://{user}:secret@127.0.0.1:{port}/")).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("AUTH through the proxy");
    let whoami: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut conn)
        .await
        .expect("ACL WHOAMI");
    assert_eq!(whoami, user);
    // Keys on every master, written and read as the user.
    let pairs: Vec<(String, String)> = (0..100)
        .map(|i| (format!("{p}{i}"), i.to_string()))
        .collect();
    let () = conn.mset(&pairs).await.expect("MSET as the user");
    let keys: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
    let values: Vec<String> = conn.mget(&keys).await.expect("MGET as the user");
    assert_eq!(
        values,
        pairs.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()
    );
    let masters: Vec<String> = nodes().into_iter().filter(|n| n.2).map(|n| n.1).collect();
    for m in &masters {
        assert!(
            !cli(m, &["keys", &format!("{p}*")]).is_empty(),
            "{m} got some keys"
        );
    }
    // The node refuses what the user may not do, as it would directly.
    let err = conn
        .set::<_, _, ()>(format!("outside-{p}"), 1)
        .await
        .expect_err("a key outside the user's pattern");
    assert!(err.to_string().contains("no permissions"), "NOPERM: {err}");
    // Another client, as the default user, shares the nodes' connections of its own lane:
    // it may write that key, and the user still may not.
    let mut default = connect(port).await;
    let () = default
        .set(format!("outside-{p}"), 1)
        .await
        .expect("the default user may");
    let err = conn
        .get::<_, i64>(format!("outside-{p}"))
        .await
        .expect_err("still refused to the user");
    assert!(err.to_string().contains("no permissions"), "NOPERM: {err}");
    let _: i64 = default.del(format!("outside-{p}")).await.expect("DEL");
    // HELLO 3 with AUTH on a connection of its own; a wrong password is WRONGPASS.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let hello = format!(
        "*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n${}\r\n{user}\r\n$5\r\nwrong\r\n",
        user.len()
    );
    raw.write_all(hello.as_bytes()).expect("write");
    let reply =
        String::from_utf8_lossy(&read_available(&mut raw, 10, Duration::from_secs(5))).into_owned();
    assert!(reply.starts_with("-WRONGPASS"), "{reply:?}");
    let hello = hello.replace("$5\r\nwrong", "$6\r\nsecret");
    let whoami = "*2\r\n$3\r\nACL\r\n$6\r\nWHOAMI\r\n";
    let key = &pairs[7].0;
    let get = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    raw.write_all(format!("{hello}{whoami}{get}").as_bytes())
        .expect("write");
    let expected_tail = format!("${}\r\n{user}\r\n$1\r\n7\r\n", user.len());
    let reply = read_available(&mut raw, usize::MAX, Duration::from_secs(3));
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with('%'), "HELLO 3 answers a map: {reply:?}");
    assert!(reply.ends_with(&expected_tail), "{reply:?}");
    let _: i64 = conn.del(&keys).await.expect("DEL");
    shotover.stop();
    for addr in cluster_addrs() {
        cli(&addr, &["acl", "deluser", &user]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn contact_points_that_are_down_are_skipped_and_all_down_is_an_error_per_request() {
    let _layout = LAYOUT.read().await;
    let dead = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let port = free_port();
    let mut points = dead.to_vec();
    points.push(cluster_addrs()[1].clone());
    let shotover = Shotover::start(&hiding_topology(port, &points, ""));
    let mut conn = connect(port).await;
    let key = format!("{}k", prefix("contact"));
    let () = conn
        .set(&key, "v")
        .await
        .expect("SET past the dead contact points");
    let got: String = conn.get(&key).await.expect("GET");
    assert_eq!(got, "v");
    let _: i64 = conn.del(&key).await.expect("DEL");
    shotover.stop();

    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(port, &dead, ""));
    let mut conn = connect(port).await;
    for _ in 0..2 {
        let err = conn.get::<_, String>("k").await.expect_err("no node is up");
        let text = err.to_string();
        assert!(
            text.contains(&dead[0]) && text.contains(&dead[1]),
            "the error names the contact points: {text}"
        );
    }
    // The client connection is still served.
    let err = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .expect_err("still no node");
    assert!(err.to_string().contains("CLUSTER SLOTS"), "{err}");
    shotover.stop_expecting(&["slot map"]);
}

/// INCRs over `keys` until `stop`, checking each reply against the count kept here. Returns
/// the counts and the errors seen.
async fn incr_traffic(
    port: u16,
    keys: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (HashMap<String, i64>, Vec<String>) {
    let mut conn = connect(port).await;
    let mut counts: HashMap<String, i64> = HashMap::new();
    let mut errors = Vec::new();
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = &keys[i % keys.len()];
        i += 1;
        let mut pipe = redis::pipe();
        pipe.incr(key, 1).get(key);
        match pipe.query_async::<(i64, i64)>(&mut conn).await {
            Ok((n, read)) => {
                let expected = counts.get(key).copied().unwrap_or(0) + 1;
                assert_eq!(n, expected, "INCR {key} answered {n}, expected {expected}");
                assert_eq!(read, n, "GET {key} after INCR");
                counts.insert(key.clone(), n);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    (counts, errors)
}

/// 60 keys under INCR traffic through the proxy on `port` (see [`incr_traffic`]), started
/// half a second ago.
async fn incr_traffic_on_60_keys(
    port: u16,
    tag: &str,
) -> (
    Vec<String>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<(HashMap<String, i64>, Vec<String>)>,
) {
    let p = prefix(tag);
    let keys: Vec<String> = (0..60).map(|i| format!("{p}{i}")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn(incr_traffic(port, keys.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    (keys, stop, traffic)
}

/// Lets the traffic run 2 s more, stops it and checks it: one client with one pipeline in
/// flight, so at most that one failed, and every key holds the INCRs acknowledged (one more
/// only if a request failed: it may have run before its node went away). Returns the counts
/// and a connection through the proxy.
async fn traffic_after_failover(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    traffic: tokio::task::JoinHandle<(HashMap<String, i64>, Vec<String>)>,
    what: &str,
) -> (HashMap<String, i64>, redis::aio::MultiplexedConnection) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (counts, errors) = traffic.await.expect("traffic");
    eprintln!(
        "failover ({what}): {} INCRs answered, {} failed: {errors:?}",
        counts.values().sum::<i64>(),
        errors.len()
    );
    assert!(errors.len() <= 1, "{errors:?}");
    let mut conn = connect(port).await;
    for (key, n) in &counts {
        let got: i64 = conn.get(key).await.expect("GET after the failover");
        assert!(
            got == *n || (got == *n + 1 && !errors.is_empty()),
            "{key}: {got} after {n} acknowledged INCRs and {} failed requests",
            errors.len()
        );
    }
    (counts, conn)
}

/// The master that holds `key` (the one node that answers GET for it directly).
fn master_of(key: &str) -> (String, String, bool, String) {
    nodes()
        .into_iter()
        .filter(|n| n.2)
        .find(|n| cli(&n.1, &["get", key]).parse::<i64>().is_ok())
        .expect("the key's master")
}

#[tokio::test(flavor = "multi_thread")]
async fn resharding_a_slot_range_under_traffic_loses_nothing() {
    let _layout = LAYOUT.write().await;
    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(port, &cluster_addrs(), ""));
    let masters: Vec<(String, String, bool, String)> =
        nodes().into_iter().filter(|n| n.2).collect();
    let (from, to) = (&masters[0], &masters[1]);
    let p = prefix("reshard");
    let keys: Vec<String> = (0..400).map(|i| format!("{p}{i}")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn(incr_traffic(port, keys.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reshard = tokio::task::spawn_blocking({
        let (seed, from, to) = (from.1.clone(), from.0.clone(), to.0.clone());
        move || {
            Command::new("redis-cli")
                .args([
                    "--cluster",
                    "reshard",
                    &seed,
                    "--cluster-from",
                    &from,
                    "--cluster-to",
                    &to,
                ])
                .args([
                    "--cluster-slots",
                    "1500",
                    "--cluster-yes",
                    "--cluster-pipeline",
                    "5",
                ])
                .output()
                .expect("redis-cli --cluster reshard")
        }
    })
    .await
    .expect("reshard");
    assert!(
        reshard.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&reshard.stdout)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (counts, errors) = traffic.await.expect("traffic");
    assert!(
        errors.is_empty(),
        "requests failed during the reshard: {errors:?}"
    );
    let mut conn = connect(port).await;
    for (key, n) in &counts {
        let got: i64 = conn.get(key).await.expect("GET");
        assert_eq!(got, *n, "{key}");
    }
    let total: i64 = counts.values().sum();
    assert!(
        total > 100,
        "traffic ran during the reshard ({total} INCRs)"
    );
    let redirects = shotover.metric_sum("shotover_redis_cluster_redirects_count{");
    assert!(redirects > 0.0, "the reshard was seen as redirects");
    let _: i64 = conn.del(&keys).await.expect("DEL");
    shotover.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_master_killed_under_traffic_fails_only_requests_in_flight_and_its_replica_takes_over() {
    let _layout = LAYOUT.write().await;
    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(port, &cluster_addrs(), ""));
    let (keys, stop, traffic) = incr_traffic_on_60_keys(port, "failover").await;
    // Kill the master of the first key.
    let victim_addr = master_of(&keys[0]).1;
    let dir = std::env::var("REDIS_CLUSTER_DIR").expect("REDIS_CLUSTER_DIR (e2e/services)");
    let victim_port = port_of(&victim_addr);
    let pid = std::fs::read_to_string(format!("{dir}/{victim_port}/pid")).expect("pidfile");
    let killed_at = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill")
            .success(),
        "kill -9 {pid}"
    );
    // Traffic goes on once a replica is promoted.
    wait_until("a replica to take over", Duration::from_secs(30), || {
        nodes().iter().filter(|n| n.2 && n.1 != victim_addr).count() == 3
    });
    let (_, mut conn) = traffic_after_failover(
        port,
        stop,
        traffic,
        &format!("{:?} after the kill", killed_at.elapsed()),
    )
    .await;
    let _: i64 = conn.del(&keys).await.expect("DEL");
    shotover.stop_expecting(&["shared upstream connection failed", "slot map"]);

    // The killed node comes back as a replica, so the cluster is whole again.
    let node_dir = format!("{dir}/{victim_port}");
    let status = Command::new("redis-server")
        .args([
            "--port",
            &victim_port,
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
        ])
        .args(["--cluster-config-file", &format!("{node_dir}/nodes.conf")])
        .args([
            "--cluster-node-timeout",
            "3000",
            "--dir",
            &node_dir,
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--daemonize",
            "yes",
            "--logfile",
            &format!("{node_dir}/log"),
        ])
        .args(["--pidfile", &format!("{node_dir}/pid")])
        .status()
        .expect("redis-server");
    assert!(status.success());
    wait_until(
        "the cluster to be whole again",
        Duration::from_secs(60),
        cluster_ok,
    );
}

/// `CLUSTER FAILOVER` on a replica mid-traffic (a planned failover: the master pauses its
/// clients until the replica has caught up, then answers MOVED): at most the request in
/// flight fails, no acknowledged write is lost, and traffic goes on on the promoted node
/// without restarting the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_failover_under_traffic_moves_it_to_the_promoted_replica() {
    let _layout = LAYOUT.write().await;
    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(port, &cluster_addrs(), ""));
    let (keys, stop, traffic) = incr_traffic_on_60_keys(port, "manual-failover").await;
    let master = master_of(&keys[0]);
    let replica = nodes()
        .into_iter()
        .find(|n| !n.2 && n.3 == master.0)
        .expect("a replica of that master");
    assert_eq!(cli(&replica.1, &["cluster", "failover"]).trim(), "OK");
    wait_until(
        "the replica to be promoted",
        Duration::from_secs(30),
        || nodes().iter().any(|n| n.0 == replica.0 && n.2),
    );
    let at_promotion: i64 = cli(&replica.1, &["get", &keys[0]])
        .trim()
        .parse()
        .expect("the promoted node has the key");
    let (counts, mut conn) = traffic_after_failover(port, stop, traffic, "manual").await;
    assert!(
        counts[&keys[0]] > at_promotion,
        "traffic went on on the promoted node ({} INCRs of the first key in all, {at_promotion} at the promotion)",
        counts[&keys[0]]
    );
    assert_eq!(
        cli(&replica.1, &["get", &keys[0]]).trim(),
        counts[&keys[0]].to_string(),
        "the promoted node serves the key"
    );
    let _: i64 = conn.del(&keys).await.expect("DEL");
    shotover.stop_expecting(&["shared upstream connection failed", "slot map"]);
    wait_until(
        "the cluster to be whole again",
        Duration::from_secs(60),
        cluster_ok,
    );
}

#[test]
fn upstream_cluster_topologies_start() {
    // shotover-proxy's own test-configs that use these transforms, unchanged but for the
    // listen port (and the certificate paths, made here).
    let dir = temp_dir("upstream-cluster");
    let certs = dir.join("tests/test-configs/valkey/tls/certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    std::fs::write(certs.join("localhost_CA.crt"), ca.cert.pem()).expect("ca");
    std::fs::write(certs.join("localhost.crt"), ca.cert.pem()).expect("crt");
    std::fs::write(certs.join("localhost.key"), ca.key_pair.serialize_pem()).expect("key");
    for name in [
        "cluster-auth",
        "cluster-dr",
        "cluster-handling",
        "cluster-hiding",
        "cluster-ports-rewrite",
        "cluster-tls",
        "cluster-tls-no-source-encryption",
        "cluster-hiding-encode",
        "cluster-tls-encode",
    ] {
        let text = std::fs::read_to_string(format!(
            "{}/tests/redis_int/upstream/{name}.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("upstream topology");
        let port = free_port();
        let text = text
            .replace("127.0.0.1:6379", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:6380", &format!("127.0.0.1:{port}"))
            .replace(
                "tests/test-configs/",
                &format!("{}/tests/test-configs/", dir.display()),
            );
        let shotover = Shotover::start(&text);
        shotover.stop();
    }
}

/// A fake cluster node for what a real cluster does not do on purpose: `CLUSTER SLOTS` says
/// it serves every slot, and every keyed request is answered `MOVED` to itself. Returns its
/// port and the number of MOVED replies it sent.
fn node_that_moves_everything_to_itself() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let moved = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = moved.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    // Whole requests: `*N` then N `$len` lines with their data.
                    while let Some((args, used)) = parse_request(&buf) {
                        buf.drain(..used);
                        let name = args
                            .first()
                            .map(|a| a.to_ascii_uppercase())
                            .unwrap_or_default();
                        let reply = match &name[..] {
                            b"CLUSTER" => format!(
                                "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{port}\r\n"
                            ),
                            b"COMMAND" => "*0\r\n".to_string(),
                            b"CLIENT" | b"ASKING" => "+OK\r\n".to_string(),
                            _ => {
                                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                format!("-MOVED 12182 127.0.0.1:{port}\r\n")
                            }
                        };
                        if stream.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, moved)
}

fn parse_request(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    let line = |at: usize| -> Option<(&[u8], usize)> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    };
    let (head, mut at) = line(0)?;
    let count: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, next) = line(at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if buf.len() < next + len + 2 {
            return None;
        }
        args.push(buf[next..next + len].to_vec());
        at = next + len + 2;
    }
    Some((args, at))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_loop_ends_after_its_bound_with_an_error_and_the_client_goes_on() {
    let (node, moved) = node_that_moves_everything_to_itself();
    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(port, &[format!("127.0.0.1:{node}")], ""));
    let mut conn = connect(port).await;
    for round in 1..=2 {
        let err = conn
            .get::<_, String>("foo")
            .await
            .expect_err("a redirect loop");
        assert!(
            err.to_string().contains("redirected this request 6 times"),
            "{err}"
        );
        // The first try and 5 redirects followed.
        assert_eq!(moved.load(std::sync::atomic::Ordering::Relaxed), 6 * round);
    }
    shotover.stop();
}

/// `cmdstat_get` calls of each replica.
fn replica_gets() -> Vec<(String, u64)> {
    nodes()
        .into_iter()
        .filter(|n| !n.2)
        .map(|n| {
            let stats = cli(&n.1, &["info", "commandstats"]);
            let calls = stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
                .and_then(|rest| rest.split(',').next())
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (n.1, calls)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_go_to_replicas_when_asked_and_writes_to_masters() {
    let _layout = LAYOUT.write().await;
    let port = free_port();
    let shotover = Shotover::start(&hiding_topology(
        port,
        &cluster_addrs(),
        "            read_from_replicas: true",
    ));
    let mut conn = connect(port).await;
    let p = prefix("replica_reads");
    let keys: Vec<String> = (0..200).map(|i| format!("{p}{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let () = conn.set(k, i).await.expect("SET");
    }
    let before = replica_gets();
    // Replicas lag a little: every key reads back once replicated.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = true;
        for (i, k) in keys.iter().enumerate() {
            let got: Option<i64> = conn.get(k).await.expect("GET from a replica");
            all &= got == Some(i as i64);
        }
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "replicas did not catch up");
    }
    let after = replica_gets();
    let served: Vec<u64> = after
        .iter()
        .map(|(addr, calls)| {
            calls
                - before
                    .iter()
                    .find(|(a, _)| a == addr)
                    .map_or(0, |(_, c)| *c)
        })
        .collect();
    assert!(
        served.iter().all(|&n| n > 0),
        "every replica served GETs: {served:?}"
    );
    // Writes still go to masters (a replica would answer MOVED, counted as a redirect).
    let () = conn.set(&keys[0], "w").await.expect("SET");
    let redirects = shotover.metric_sum("shotover_redis_cluster_redirects_count{");
    assert_eq!(redirects, 0.0, "no request went to the wrong node");
    let _: i64 = conn.del(&keys).await.expect("DEL");
    shotover.stop();
}
