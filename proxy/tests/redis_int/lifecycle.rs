//! Starting, configuring, observing and stopping the proxy process.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::helpers::*;

async fn sigterm_finishes_in_flight_requests_then_exits(mode: Mode) {
    let port = free_port();
    let mut shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let key = format!("{}drain", prefix("drain"));
    let in_flight = blpop_in_flight(port, &key, 2).await;
    shotover.terminate();
    // New connections are refused once the listener is closed...
    wait_until("the listener to close", Duration::from_secs(5), || {
        TcpStream::connect(format!("127.0.0.1:{port}")).is_err()
    });
    // Probes still answer during the drain: not ready, but alive.
    assert_eq!(
        http(&shotover.observability, "GET", "/ready", "")
            .expect("ready")
            .0,
        503
    );
    assert_eq!(
        http(&shotover.observability, "GET", "/live", "")
            .expect("live")
            .0,
        200
    );
    // ...while the request in flight still gets its answer (nil after the 2 s timeout).
    let (got, took) = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(got, None);
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    let status = shotover.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let logs = shotover.logs();
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(logs.contains("shotover stopped"), "{logs}");
}

#[test]
fn invalid_topology_exits_non_zero_with_every_error_and_binds_nothing() {
    let port = free_port();
    let topology = format!(
        r#"
sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - QueryCounter: {{ counter_name: "c" }}
        - NoSuchTransform: {{}}
  - Valkey:
      name: "redis"
      listen_addr: "not-an-address"
      chain:
        - ValkeySinkSingle: {{ remote_address: "127.0.0.1:1", bogus: 1 }}
"#
    );
    let stderr = start_failing(&topology, "main_log_level: info\n", "config.yaml");
    let expected = "topology.yaml: invalid topology (4 errors):
  sources[0].chain[1]: unknown transform `NoSuchTransform`, expected one of: RedisSinkSingle, ValkeySinkSingle, RedisSinkCluster, ValkeySinkCluster, RedisClusterPortsRewrite, ValkeyClusterPortsRewrite, CassandraSinkSingle, CassandraPeersRewrite, RequestThrottling, NullSink, DebugPrinter, DebugReturner, DebugForceParse, DebugForceEncode, QueryCounter, QueryTypeFilter, Coalesce, Tee
  sources[1].chain[0].bogus: unknown field `bogus`, expected one of `name`, `remoteAddress`, `remote_address`, `connectTimeoutMs`, `connect_timeout_ms`, `tls`, `connectionCount`, `connection_count`, `readTimeout`, `read_timeout`, `maxBufferedReplyBytes`, `max_buffered_reply_bytes`
  sources[1].name: duplicate name `redis`, already used at sources[0]
  sources[1].listenAddr: `not-an-address` is not a listen address: expected ip:port, for example 127.0.0.1:6379 or 0.0.0.0:6379";
    assert!(
        stderr.contains(expected),
        "stderr:\n{stderr}\nexpected to contain:\n{expected}"
    );
    assert!(
        TcpStream::connect(format!("127.0.0.1:{port}")).is_err(),
        "nothing may be bound"
    );
}

#[test]
fn bad_config_file_and_missing_files_are_named() {
    let topology = passthrough(free_port(), "127.0.0.1:1", "");
    let stderr = start_failing(
        &topology,
        "main_log_level: info\nobservability: x\n",
        "config.yaml",
    );
    assert!(
        stderr.contains("config.yaml: unknown field `observability`"),
        "{stderr}"
    );
    let stderr = start_failing(&topology, "main_log_level: info\n", "missing.yaml");
    assert!(
        stderr.contains("reading the config file") && stderr.contains("missing.yaml"),
        "{stderr}"
    );
}

async fn observability_serves_metrics_filter_ready_and_live(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let mut con = connect(port).await;
    let _: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING");
    let (status, headers, body) =
        http(&shotover.observability, "GET", "/metrics", "").expect("metrics");
    assert_eq!(status, 200);
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        content_type,
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    for name in [
        "# TYPE shotover_chain_total_count counter",
        "# TYPE shotover_chain_latency_seconds histogram",
        "shotover_transform_total_count{transform=\"sink\"}",
        "shotover_transform_latency_seconds_bucket{transform=\"sink\",le=\"+Inf\"}",
        "shotover_available_connections_count{source=\"redis\"} 511",
        "connections_opened{source=\"redis\"} 1",
        "shotover_chain_requests_batch_size_count{chain=\"redis\"}",
    ] {
        assert!(body.contains(name), "missing `{name}` in:\n{body}");
    }
    assert_eq!(
        http(&shotover.observability, "GET", "/ready", "")
            .expect("ready")
            .0,
        200
    );
    assert_eq!(
        http(&shotover.observability, "GET", "/live", "")
            .expect("live")
            .0,
        200
    );
    // The log filter changes live: at debug, a connection's end is logged.
    let (status, _, body) =
        http(&shotover.observability, "PUT", "/filter", "not a [ filter").expect("filter");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        http(&shotover.observability, "PUT", "/filter", "debug")
            .expect("filter")
            .0,
        200
    );
    drop(con);
    shotover.wait_for_log("connection ended");
    shotover.stop();
}

fn json_log_format_and_core_threads_flags_work(mode: Mode) {
    let port = free_port();
    let shotover = mode.spawn(
        &passthrough(port, "127.0.0.1:1", ""),
        &["--log-format", "json", "--core-threads", "1"],
    );
    shotover.wait_ready();
    shotover.wait_for_log("\"message\":\"shotover is ready\"");
    shotover.stop();
}

/// Certificates for a CA, a server (localhost, 127.0.0.1) and a client, written to `dir`.
fn make_certs(dir: &std::path::Path) {
    make_certs_for(dir, &["localhost", "127.0.0.1"]);
}

/// Certificates for a CA, a server with the given names, and a client, written to `dir`.
pub(crate) fn make_certs_for(dir: &std::path::Path, server_names: &[&str]) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    // OpenSSL (redis-cli) takes a leaf whose subject equals its issuer for self-signed.
    let named = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name = named("shotover-test-ca");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let cn = names.first().cloned().unwrap_or_default();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name = named(&cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        server_names.iter().map(|n| n.to_string()).collect(),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        leaf(vec!["client".into()], ExtendedKeyUsagePurpose::ClientAuth);
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ] {
        std::fs::write(dir.join(name), pem).expect("write cert");
    }
}

fn tls_source_serves_tls_and_requires_client_certificates_when_given_a_ca(mode: Mode) {
    let dir = temp_dir("tls");
    make_certs(&dir);
    let (tls_port, mtls_port) = (free_port(), free_port());
    let d = dir.display();
    let tls = format!(
        "      tls:\n        certificate_path: \"{d}/server.pem\"\n        private_key_path: \"{d}/server.key\""
    );
    let mtls = format!("{tls}\n        certificate_authority_path: \"{d}/ca.pem\"");
    let redis = redis_addr();
    let topology = format!(
        "{}{}",
        passthrough(tls_port, &redis, &tls),
        passthrough(mtls_port, &redis, &mtls)
            .replace("sources:\n", "")
            .replace("name: \"redis\"", "name: \"mtls\"")
            .replace("name: \"sink\"", "name: \"mtls-sink\"")
    );
    let shotover = mode.start(&topology);
    let ca = format!("{d}/ca.pem");
    let cli = |port: u16, extra: &[&str]| {
        let p = port.to_string();
        let mut args = vec!["--tls", "--cacert", &ca, "-p", &p];
        args.extend_from_slice(extra);
        args.push("PING");
        redis_cli(&args).trim().to_string()
    };
    assert_eq!(cli(tls_port, &[]), "PONG");
    let (cert, key) = (format!("{d}/client.pem"), format!("{d}/client.key"));
    assert_eq!(cli(mtls_port, &["--cert", &cert, "--key", &key]), "PONG");
    assert_ne!(
        cli(mtls_port, &[]),
        "PONG",
        "a client without a certificate must be refused"
    );
    // Plain text on a TLS port gets nowhere, and the proxy keeps serving.
    let plain = raw(&format!("127.0.0.1:{tls_port}"), b"PING\r\n", 7);
    assert!(
        !String::from_utf8_lossy(&plain).contains("PONG"),
        "plain text was served on a TLS port"
    );
    assert_eq!(cli(tls_port, &[]), "PONG");
    shotover.stop();
}

async fn tls_sink_checks_the_upstream_certificate_and_its_name_unless_told_not_to(mode: Mode) {
    // Upstream 1: the real TLS Redis (its certificate names 127.0.0.1).
    let (redis_tls_addr, redis_ca) = redis_tls();
    // Upstream 2: a TLS source of this same proxy whose certificate names only
    // `wrong.example`, in front of the plain Redis.
    let dir = temp_dir("tls-sink");
    make_certs_for(&dir, &["wrong.example"]);
    let d = dir.display();
    let wrong_name = free_port();
    let (ok, refused_name, unchecked_name, unknown_ca) =
        (free_port(), free_port(), free_port(), free_port());
    let sink = |port: u16, remote: &str, ca: &str, verify: bool| {
        format!(
            r#"  - Redis:
      name: "s{port}"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - RedisSinkSingle:
            name: "sink{port}"
            remote_address: "{remote}"
            connect_timeout_ms: 3000
            tls:
              certificate_authority_path: "{ca}"
              verify_hostname: {verify}
"#
        )
    };
    let wrong_addr = format!("127.0.0.1:{wrong_name}");
    // Upstream 3: a TLS source that requires client certificates (mutual TLS).
    let mtls = free_port();
    let (with_cert, without_cert) = (free_port(), free_port());
    let mtls_addr = format!("127.0.0.1:{mtls}");
    let client_cert = format!(
        "              certificate_path: \"{d}/client.pem\"\n              private_key_path: \"{d}/client.key\"\n"
    );
    let topology = format!(
        "{}{}{}{}{}",
        passthrough(
            wrong_name,
            &redis_addr(),
            &format!(
                "      tls:\n        certificate_path: \"{d}/server.pem\"\n        private_key_path: \"{d}/server.key\""
            )
        ),
        sink(ok, &redis_tls_addr, &redis_ca, true),
        sink(refused_name, &wrong_addr, &format!("{d}/ca.pem"), true),
        sink(unchecked_name, &wrong_addr, &format!("{d}/ca.pem"), false),
        sink(unknown_ca, &redis_tls_addr, &format!("{d}/ca.pem"), false),
    );
    let topology = format!(
        "{topology}{}{}{}",
        passthrough(mtls, &redis_addr(), &format!("      tls:\n        certificate_path: \"{d}/server.pem\"\n        private_key_path: \"{d}/server.key\"\n        certificate_authority_path: \"{d}/ca.pem\""))
            .replace("sources:\n", "")
            .replace("name: \"redis\"", "name: \"mtls\"")
            .replace("name: \"sink\"", "name: \"mtls-sink\""),
        sink(with_cert, &mtls_addr, &format!("{d}/ca.pem"), false) + &client_cert,
        sink(without_cert, &mtls_addr, &format!("{d}/ca.pem"), false),
    );
    let shotover = mode.start(&topology);
    for port in [ok, unchecked_name, with_cert] {
        let mut con = connect(port).await;
        let pong: String = redis::cmd("PING")
            .query_async(&mut con)
            .await
            .expect("TLS upstream");
        assert_eq!(pong, "PONG");
    }
    for (port, reason) in [
        (refused_name, "not valid for name"),
        (unknown_ca, "UnknownIssuer"),
    ] {
        let mut con = connect(port).await;
        let err = redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .expect_err("refused");
        assert!(
            err.to_string().contains("unreachable") && err.to_string().contains(reason),
            "{err}"
        );
    }
    // Without a client certificate the mTLS upstream refuses the connection: the handshake
    // or the first read fails, and the client gets an error either way.
    let mut con = connect(without_cert).await;
    let err = redis::cmd("PING")
        .query_async::<String>(&mut con)
        .await
        .expect_err("refused");
    match mode {
        // The dedicated connection breaks at its first read, and says why in the log.
        Mode::Dedicated => shotover.wait_for_log("CertificateRequired"),
        // A shared connection is opened with a handshake (CLIENT SETNAME): its reply is
        // where the refusal shows, and the client gets it.
        Mode::Shared => assert!(err.to_string().contains("CertificateRequired"), "{err}"),
    }
    shotover.stop_expecting(&["upstream connection broke"]);
}

/// Runs the binary with `topology` and `config` written to a temp dir, passing `config_name`
/// (in that dir) as the config file; it must exit non-zero. Returns its stderr.
fn start_failing(topology: &str, config: &str, config_name: &str) -> String {
    let dir = temp_dir("failing");
    std::fs::write(dir.join("topology.yaml"), topology).expect("write");
    std::fs::write(dir.join("config.yaml"), config).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_shotover"))
        .arg("-t")
        .arg(dir.join("topology.yaml"))
        .arg("-c")
        .arg(dir.join(config_name))
        .output()
        .expect("run");
    assert!(!out.status.success(), "the start should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The proxy's sockets of process `pid` (from `ss -tnop`), with their timers.
fn sockets_of(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnopH", "state", "established"])
        .output()
        .expect("running ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .map(str::to_string)
        .collect()
}

async fn both_sides_use_tcp_keepalive(mode: Mode) {
    let port = free_port();
    let shotover = mode.start(&passthrough(port, &redis_addr(), ""));
    let mut con = connect(port).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    // A socket with unacknowledged data shows its retransmit timer instead: wait for both
    // sides to be idle.
    let keepalive_on_both_sides = || {
        let sockets = sockets_of(shotover.pid());
        let client_side: Vec<&String> = sockets
            .iter()
            .filter(|l| l.contains(&format!("127.0.0.1:{port} ")))
            .collect();
        let upstream_side: Vec<&String> = sockets
            .iter()
            .filter(|l| l.contains(&format!(" {} ", redis_addr())))
            .collect();
        !client_side.is_empty()
            && !upstream_side.is_empty()
            && client_side
                .iter()
                .chain(&upstream_side)
                .all(|socket| socket.contains("timer:(keepalive"))
    };
    wait_until(
        "keepalive timers on the client and upstream sockets",
        Duration::from_secs(10),
        keepalive_on_both_sides,
    );
    drop(con);
    shotover.stop();
}

crate::in_both_modes!(
    async: [
        sigterm_finishes_in_flight_requests_then_exits,
        observability_serves_metrics_filter_ready_and_live,
        tls_sink_checks_the_upstream_certificate_and_its_name_unless_told_not_to,
        both_sides_use_tcp_keepalive,
    ],
    sync: [
        json_log_format_and_core_threads_flags_work,
        tls_source_serves_tls_and_requires_client_certificates_when_given_a_ca,
    ],
);
