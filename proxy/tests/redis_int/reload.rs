//! Hot reload against the real Redis: edited, broken, swapped and removed topology files,
//! with connections open and traffic running.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::AsyncCommands;

use crate::helpers::*;

const APPLIED: &str = "shotover_config_reloads_count{result=\"applied\"}";
const REFUSED: &str = "shotover_config_reloads_count{result=\"refused\"}";
const FAST_WATCH: &[&str] = &["--watch-interval-ms", "50", "--reload-drain-seconds", "3"];

/// The passthrough topology with a QueryCounter named `counter` in front of the sink.
fn counted(port: u16, counter: &str) -> String {
    passthrough(port, &redis_addr(), "").replace(
        "      chain:\n",
        &format!("      chain:\n        - QueryCounter: {{ counter_name: \"{counter}\" }}\n"),
    )
}

fn counted_gets(shotover: &Shotover, counter: &str) -> f64 {
    shotover
        .metric(&format!(
            "shotover_query_count{{name=\"{counter}\",query=\"GET\",type=\"redis\"}}"
        ))
        .unwrap_or(0.0)
}

fn config_json(shotover: &Shotover) -> serde_json::Value {
    let (status, _, body) =
        http(&shotover.observability, "GET", "/config", "").expect("GET /config");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/config is JSON")
}

fn running_hash(shotover: &Shotover) -> String {
    let topology = std::fs::read_to_string(shotover.dir.join("topology.yaml")).expect("topology");
    let config = std::fs::read_to_string(shotover.dir.join("config.yaml")).expect("config");
    shotover_crds::config_hash(&topology, &config)
}

/// Sends one RESP command on a raw connection and reads its reply.
fn send(stream: &mut TcpStream, args: &[&str]) -> String {
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(out.as_bytes()).expect("write");
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn raw_connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

async fn an_edited_topology_reaches_open_connections_with_their_session_and_no_request_fails(
    mode: Mode,
) {
    let port = free_port();
    let shotover = mode.spawn(&passthrough(port, &redis_addr(), ""), FAST_WATCH);
    shotover.wait_ready();
    let first_hash = config_json(&shotover)["hash"].as_str().map(str::to_owned);
    assert_eq!(
        first_hash.as_deref(),
        Some(running_hash(&shotover).as_str())
    );
    let key = format!("{}k", prefix("reload_edit"));

    // A connection on db 3 (the client sends SELECT 3 when it connects).
    let mut db3 = redis::Client::open(format!("redis://127.0.0.1:{port}/3"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connecting on db 3");
    let () = db3.set(&key, "on-db-3").await.expect("SET on db 3");

    // Traffic on 8 more connections through the whole reload.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (stop, done) = (stop.clone(), done.clone());
        let mut conn = connect(port).await;
        let key = format!("{key}:{w}");
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let set: redis::RedisResult<()> = conn.set(&key, i).await;
                let got: redis::RedisResult<u64> = conn.get(&key).await;
                match (set, got) {
                    (Ok(()), Ok(v)) if v == i => {}
                    other => failures.push(format!("{other:?}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let before = done.load(Ordering::Relaxed);
    wait_until("traffic to run", Duration::from_secs(10), || {
        done.load(Ordering::Relaxed) > before + 100
    });

    shotover.rewrite_topology(&mode.topology(&counted(port, "after")));
    shotover.wait_metric(APPLIED, |v| v == 1.0);
    // Every connection moves at its next request boundary.
    shotover.wait_metric("shotover_connections_moved_count{source=\"redis\"}", |v| {
        v >= 8.0
    });
    let gets = counted_gets(&shotover, "after");
    let got: String = db3.get(&key).await.expect("GET on db 3 after the reload");
    assert_eq!(got, "on-db-3", "the moved connection is still on db 3");
    assert!(
        counted_gets(&shotover, "after") > gets,
        "the GET of the open connection went through the new chain"
    );
    let before = done.load(Ordering::Relaxed);
    wait_until("traffic after the reload", Duration::from_secs(10), || {
        done.load(Ordering::Relaxed) > before + 100
    });
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let failures = worker.await.expect("worker");
        assert!(
            failures.is_empty(),
            "requests failed across the reload: {failures:?}"
        );
    }
    assert_eq!(shotover.metric(REFUSED).unwrap_or(0.0), 0.0);
    assert_eq!(
        shotover.metric("shotover_connections_draining_count{source=\"redis\"}"),
        Some(0.0)
    );
    let config = config_json(&shotover);
    assert_eq!(config["generation"], 2, "{config}");
    assert_eq!(
        config["hash"].as_str(),
        Some(running_hash(&shotover).as_str())
    );
    assert!(
        shotover.metrics().contains(&format!(
            "shotover_config_info{{hash=\"{}\"}} 1",
            running_hash(&shotover)
        )),
        "the info metric names the running hash only"
    );
    assert!(!shotover.metrics().contains(&format!(
        "shotover_config_info{{hash=\"{}\"}}",
        first_hash.unwrap_or_default()
    )));
    let _: () = db3.del(&key).await.expect("DEL");
    shotover.stop();
}

#[test]
fn a_broken_half_written_or_removed_topology_is_refused_and_the_running_one_keeps_serving() {
    let port = free_port();
    let shotover = Shotover::spawn(&passthrough(port, &redis_addr(), ""), FAST_WATCH);
    shotover.wait_ready();
    let mut client = raw_connect(port);
    assert_eq!(send(&mut client, &["PING"]), "+PONG\r\n");
    let topology = std::fs::read_to_string(shotover.dir.join("topology.yaml")).expect("read");

    // Not a topology at all.
    shotover.rewrite_topology(
        "sources:\n  - Redis: {name: \"redis\", listen_addr: \"nowhere\", chain: []}\n",
    );
    shotover.wait_metric(REFUSED, |v| v == 1.0);
    assert_eq!(
        shotover.metric("shotover_config_last_reload_successful"),
        Some(0.0)
    );
    let config = config_json(&shotover);
    let error = config["last_refused"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("topology.yaml") && error.contains("is not a listen address"),
        "{config}"
    );
    assert_eq!(config["generation"], 1);
    assert_eq!(
        send(&mut client, &["PING"]),
        "+PONG\r\n",
        "the open connection goes on"
    );
    assert_eq!(
        send(&mut raw_connect(port), &["PING"]),
        "+PONG\r\n",
        "new ones too"
    );

    // Cut in the middle, as a file being written is.
    shotover.rewrite_topology(&topology[..topology.len() / 2]);
    shotover.wait_metric(REFUSED, |v| v == 2.0);
    assert_eq!(send(&mut client, &["PING"]), "+PONG\r\n");

    // Gone.
    std::fs::remove_file(shotover.dir.join("topology.yaml")).expect("remove");
    shotover.wait_metric(REFUSED, |v| v == 3.0);
    let error = config_json(&shotover)["last_refused"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("reading the topology file"), "{error}");
    assert_eq!(send(&mut client, &["PING"]), "+PONG\r\n");

    // Fixed: a new source opens, the old one keeps its connection.
    let added = free_port();
    let fixed = format!(
        "{topology}  - Redis:\n      name: \"added\"\n      listen_addr: \"127.0.0.1:{added}\"\n      chain:\n        - RedisSinkSingle: {{ remote_address: \"{}\" }}\n",
        redis_addr()
    );
    shotover.rewrite_topology(&fixed);
    shotover.wait_metric(APPLIED, |v| v == 1.0);
    assert_eq!(
        shotover.metric("shotover_config_last_reload_successful"),
        Some(1.0)
    );
    assert!(config_json(&shotover)["last_refused"].is_null());
    assert_eq!(send(&mut raw_connect(added), &["PING"]), "+PONG\r\n");
    assert_eq!(send(&mut client, &["PING"]), "+PONG\r\n");
    shotover.stop_expecting(&["reload refused"]);
}

#[test]
fn a_kubelet_style_symlink_swap_of_the_mounted_files_reloads() {
    let port = free_port();
    let shotover = Shotover::spawn(&passthrough(port, &redis_addr(), ""), FAST_WATCH);
    shotover.wait_ready();
    let dir = &shotover.dir;
    let topology = std::fs::read_to_string(dir.join("topology.yaml")).expect("read");
    // The layout of a ConfigMap volume: topology.yaml -> ..data/topology.yaml,
    // ..data -> ..<timestamp>; an update writes a new timestamped directory and renames a
    // new ..data link over the old one.
    let version = |name: &str, text: &str| {
        std::fs::create_dir_all(dir.join(name)).expect("mkdir");
        std::fs::write(dir.join(name).join("topology.yaml"), text).expect("write");
    };
    let point_data_at = |name: &str| {
        let _ = std::fs::remove_file(dir.join("..data_tmp"));
        std::os::unix::fs::symlink(name, dir.join("..data_tmp")).expect("symlink");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    };
    version("..2026_12_03_10_00_00.1", &topology);
    point_data_at("..2026_12_03_10_00_00.1");
    std::os::unix::fs::symlink("..data/topology.yaml", dir.join("topology.yaml.link"))
        .expect("link");
    std::fs::rename(dir.join("topology.yaml.link"), dir.join("topology.yaml")).expect("link over");
    version("..2026_12_03_10_01_00.2", &counted(port, "swapped"));
    point_data_at("..2026_12_03_10_01_00.2");
    shotover.wait_metric(APPLIED, |v| v == 1.0);
    let mut client = raw_connect(port);
    assert_eq!(send(&mut client, &["GET", "nothing-here"]), "$-1\r\n");
    assert_eq!(counted_gets(&shotover, "swapped"), 1.0);
    assert_eq!(shotover.metric(REFUSED).unwrap_or(0.0), 0.0);
    shotover.stop();
}

/// SHA-256 of a file, as `sha256sum` prints it.
fn sha256_of(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(std::fs::read(path).expect("read"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A renewed certificate (a Kubernetes Secret volume's swap, as cert-manager's renewals
/// cause) is served to new connections without a restart, the open ones keep going, and a
/// broken renewal (a key that does not match) is refused with the old certificate serving.
#[test]
fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_refused() {
    let secret = temp_dir("rotation");
    // A Secret volume: each file a link into ..data, ..data a link to the generation.
    let generation = |name: &str| {
        let dir = secret.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        crate::lifecycle::make_certs_for(&dir, &["localhost", "127.0.0.1"]);
        dir
    };
    let point_data_at = |name: &str| {
        let _ = std::fs::remove_file(secret.join("..data_tmp"));
        std::os::unix::fs::symlink(name, secret.join("..data_tmp")).expect("symlink");
        std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).expect("swap ..data");
    };
    let first = generation("..1");
    let second = generation("..2");
    point_data_at("..1");
    for file in ["server.pem", "server.key", "ca.pem"] {
        std::os::unix::fs::symlink(format!("..data/{file}"), secret.join(file)).expect("link");
    }
    let port = free_port();
    let d = secret.display();
    let tls = format!(
        "      tls:\n        certificate_path: \"{d}/server.pem\"\n        private_key_path: \"{d}/server.key\""
    );
    let shotover = Shotover::spawn(&passthrough(port, &redis_addr(), &tls), FAST_WATCH);
    shotover.wait_ready();
    let ping = |ca: &std::path::Path| {
        let (ca, p) = (ca.join("ca.pem").display().to_string(), port.to_string());
        redis_cli(&["--tls", "--cacert", &ca, "-p", &p, "PING"])
            .trim()
            .to_owned()
    };
    let served = |shotover: &Shotover| {
        config_json(shotover)["tls_files"]
            .as_array()
            .expect("tls_files")
            .iter()
            .map(|f| {
                (
                    f["at"].as_str().unwrap_or_default().to_owned(),
                    f["sha256"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(ping(&first), "PONG");
    assert_eq!(
        served(&shotover),
        [
            (
                "sources[0].tls.certificatePath".to_owned(),
                sha256_of(&first.join("server.pem"))
            ),
            (
                "sources[0].tls.privateKeyPath".to_owned(),
                sha256_of(&first.join("server.key"))
            ),
        ]
    );
    let hash = config_json(&shotover)["hash"].clone();
    let mut open = raw_connect_tls_free(port, &first);

    // Renewed: new connections get the new certificate (only its CA trusts it).
    point_data_at("..2");
    shotover.wait_metric(APPLIED, |v| v == 1.0);
    assert_eq!(ping(&second), "PONG");
    assert_ne!(ping(&first), "PONG", "the old certificate is still served");
    assert_eq!(
        served(&shotover)[0].1,
        sha256_of(&second.join("server.pem"))
    );
    assert_eq!(
        config_json(&shotover)["hash"],
        hash,
        "the topology did not change"
    );
    assert_eq!(open.ping(), "+PONG\r\n", "an open connection keeps going");

    // Broken: a certificate with another generation's key. Refused, the last one serves.
    let third = secret.join("..3");
    std::fs::create_dir_all(&third).expect("mkdir");
    std::fs::copy(second.join("ca.pem"), third.join("ca.pem")).expect("copy");
    std::fs::copy(second.join("server.pem"), third.join("server.pem")).expect("copy");
    std::fs::copy(first.join("server.key"), third.join("server.key")).expect("copy");
    point_data_at("..3");
    shotover.wait_metric(REFUSED, |v| v == 1.0);
    assert_eq!(ping(&second), "PONG");
    let refused = config_json(&shotover)["last_refused"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(refused.contains("TLS"), "{refused}");
    shotover.stop_expecting(&["reload refused"]);
}

/// A TLS client connection (rustls, trusting `ca_dir/ca.pem`) that sends PINGs.
struct TlsPing(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl TlsPing {
    fn ping(&mut self) -> String {
        self.0.write_all(b"*1\r\n$4\r\nPING\r\n").expect("write");
        let mut buf = [0u8; 64];
        let n = self.0.read(&mut buf).expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn raw_connect_tls_free(port: u16, ca_dir: &std::path::Path) -> TlsPing {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_dir.join("ca.pem")).expect("ca")
    {
        roots.add(cert.expect("cert")).expect("add");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let connection = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut tls = TlsPing(rustls::StreamOwned::new(connection, raw_connect(port)));
    assert_eq!(tls.ping(), "+PONG\r\n");
    tls
}

#[test]
fn sources_added_removed_and_changed_open_and_close_while_the_others_keep_serving() {
    let (kept, removed, added) = (free_port(), free_port(), free_port());
    let source = |name: &str, port: u16, extra: &str| {
        format!(
            "  - Redis:\n      name: \"{name}\"\n      listen_addr: \"127.0.0.1:{port}\"\n{extra}      chain:\n        - RedisSinkSingle: {{ remote_address: \"{}\" }}\n",
            redis_addr()
        )
    };
    let before = format!(
        "sources:\n{}{}",
        source("kept", kept, ""),
        source("removed", removed, "")
    );
    let shotover = Shotover::spawn(&before, FAST_WATCH);
    shotover.wait_ready();
    let mut on_kept = raw_connect(kept);
    assert_eq!(
        send(&mut on_kept, &["CLIENT", "SETNAME", "kept-client"]),
        "+OK\r\n"
    );
    let upstream_id = send(&mut on_kept, &["CLIENT", "ID"]);
    let mut on_removed = raw_connect(removed);
    assert_eq!(send(&mut on_removed, &["PING"]), "+PONG\r\n");

    let after = format!(
        "sources:\n{}{}",
        source("kept", kept, "      connection_limit: 7\n"),
        source("added", added, "")
    );
    shotover.rewrite_topology(&after);
    shotover.wait_metric(APPLIED, |v| v == 1.0);
    // The kept source's chain did not change: the connection keeps its upstream connection.
    assert_eq!(send(&mut on_kept, &["CLIENT", "ID"]), upstream_id);
    assert_eq!(
        shotover
            .metric("shotover_connections_moved_count{source=\"kept\"}")
            .unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        shotover.metric("shotover_available_connections_count{source=\"kept\"}"),
        Some(6.0),
        "the new limit less the open connection"
    );
    // The removed source's idle connection is closed, and its port no longer accepts.
    assert!(is_closed(&mut on_removed, Duration::from_secs(10)));
    wait_until("the removed port to close", Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", removed)).is_err()
    });
    assert_eq!(
        shotover.metric("shotover_connections_retired_count{source=\"removed\"}"),
        Some(1.0)
    );
    assert_eq!(send(&mut raw_connect(added), &["PING"]), "+PONG\r\n");
    let sources = config_json(&shotover)["sources"].clone();
    assert_eq!(sources, serde_json::json!(["added", "kept"]));
    shotover.stop();
}

#[test]
fn a_transaction_moves_after_exec_and_a_subscriber_is_closed_at_the_drain_deadline() {
    let port = free_port();
    let shotover = Shotover::spawn(&passthrough(port, &redis_addr(), ""), FAST_WATCH);
    shotover.wait_ready();
    let key = format!("{}tx", prefix("reload_tx"));
    let mut tx = raw_connect(port);
    assert_eq!(send(&mut tx, &["MULTI"]), "+OK\r\n");
    assert_eq!(send(&mut tx, &["SET", &key, "in-tx"]), "+QUEUED\r\n");
    let mut subscriber = raw_connect(port);
    assert!(send(&mut subscriber, &["SUBSCRIBE", "reload-channel"]).contains("subscribe"));

    shotover.rewrite_topology(&counted(port, "tx"));
    shotover.wait_metric(APPLIED, |v| v == 1.0);
    shotover.wait_metric(
        "shotover_connections_draining_count{source=\"redis\"}",
        |v| v == 2.0,
    );
    // The transaction finishes on the chain it started on...
    assert_eq!(send(&mut tx, &["EXEC"]), "*1\r\n+OK\r\n");
    // ...and the connection moves before its next request.
    assert_eq!(send(&mut tx, &["GET", &key]), "$5\r\nin-tx\r\n");
    assert_eq!(counted_gets(&shotover, "tx"), 1.0);
    // The subscriber cannot move: it is closed at the drain deadline (3 s).
    assert!(is_closed(&mut subscriber, Duration::from_secs(10)));
    shotover.wait_metric(
        "shotover_connections_retired_count{source=\"redis\"}",
        |v| v == 1.0,
    );
    assert_eq!(
        shotover.metric("shotover_connections_draining_count{source=\"redis\"}"),
        Some(0.0)
    );
    assert_eq!(send(&mut tx, &["DEL", &key]), ":1\r\n");
    shotover.stop();
}

#[test]
fn sighup_reloads_when_watching_is_off_and_a_tee_keeps_its_switch() {
    let (port, switch) = (free_port(), free_port());
    let topology = |counter: &str| {
        format!(
            r#"
sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - QueryCounter: {{ counter_name: "{counter}" }}
        - Tee:
            behavior: Ignore
            switch_port: {switch}
            chain:
              - RedisSinkSingle: {{ remote_address: "{redis}" }}
        - RedisSinkSingle: {{ remote_address: "{redis}" }}
"#,
            redis = redis_addr()
        )
    };
    let shotover = Shotover::spawn(&topology("before"), &["--watch-interval-ms", "0"]);
    shotover.wait_ready();
    let switch_addr = format!("127.0.0.1:{switch}");
    let path = "/transform/tee/result-source";
    assert_eq!(
        http(&switch_addr, "PUT", path, "tee-chain").expect("PUT").0,
        200
    );
    shotover.rewrite_topology(&topology("after"));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &shotover.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    shotover.wait_metric(APPLIED, |v| v == 1.0);
    let (_, _, body) = http(&switch_addr, "GET", path, "").expect("GET");
    assert_eq!(body.trim(), "tee-chain", "the switch kept its position");
    assert_eq!(
        send(&mut raw_connect(port), &["GET", "nothing-here"]),
        "$-1\r\n"
    );
    assert_eq!(counted_gets(&shotover, "after"), 1.0);
    shotover.stop();
}

#[test]
fn upstreams_hotreload_socket_is_refused_with_what_to_use_instead() {
    let port = free_port();
    let mut shotover = Shotover::spawn(
        &passthrough(port, &redis_addr(), ""),
        &["--hotreload-socket", "/tmp/shotover-hotreload.sock"],
    );
    let status = shotover.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let logs = shotover.logs();
    assert!(
        logs.contains("reloads its topology and config files in place") && logs.contains("SIGHUP"),
        "{logs}"
    );
}

crate::in_both_modes!(
    async: [an_edited_topology_reaches_open_connections_with_their_session_and_no_request_fails],
    sync: [],
);
