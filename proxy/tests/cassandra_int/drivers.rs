//! Real drivers through the proxy to a real Cassandra.

use crate::helpers::*;

#[test]
fn the_python_driver_negotiates_v4_and_runs_a_full_workout() {
    let port = free_port();
    let proxy = Shotover::start(&topology(port, &sink()));
    // No protocol version given: the driver starts above v4 and downgrades on our error.
    let out = workout(&format!("127.0.0.1:{port}"), "negotiates", &[]);
    assert!(out.contains("protocol 4"), "{out}");
    assert!(
        out.contains("Downgrading core protocol version from 5 to 4"),
        "{out}"
    );
    proxy.stop();
}

#[test]
fn lz4_and_snappy_sessions_work_and_their_queries_are_read() {
    let port = free_port();
    let chain = format!("        - QueryCounter: {{counter_name: compressed}}\n{}", sink());
    let proxy = Shotover::start(&topology(port, &chain));
    let addr = format!("127.0.0.1:{port}");
    workout(&addr, "lz4", &["--compression", "lz4", "--protocol", "4"]);
    let lz4_selects = proxy
        .metric(r#"shotover_query_count{name="compressed",query="SELECT",type="cassandra"}"#)
        .expect("SELECTs counted under LZ4");
    workout(&addr, "snappy", &["--compression", "snappy", "--protocol", "3"]);
    let all_selects = proxy
        .metric(r#"shotover_query_count{name="compressed",query="SELECT",type="cassandra"}"#)
        .expect("SELECTs counted");
    assert!(lz4_selects >= 5.0, "{lz4_selects}");
    assert!(all_selects >= 2.0 * lz4_selects - 1.0, "{all_selects}");
    // Every compressed QUERY was decompressed and read: none fell back to `unknown`.
    assert!(
        !proxy.metrics().contains(r#"query="unknown""#),
        "{}",
        proxy.metrics()
    );
    proxy.stop();
}

#[test]
fn password_auth_and_tls_between_client_proxy_and_node() {
    let node = auth_tls();
    let port = free_port();
    let topology = format!(
        "sources:\n  - Cassandra:\n      name: cql\n      listen_addr: \"127.0.0.1:{port}\"\n      tls:\n        certificate_path: \"{dir}/server.crt\"\n        private_key_path: \"{dir}/server.key\"\n      chain:\n        - CassandraSinkSingle:\n            remote_address: \"{addr}\"\n            tls:\n              certificate_authority_path: \"{ca}\"\n",
        dir = node.dir,
        addr = node.addr,
        ca = node.ca,
    );
    let proxy = Shotover::start(&topology);
    let addr = format!("127.0.0.1:{port}");
    workout(
        &addr,
        "auth_tls",
        &[
            "--user",
            &node.user,
            "--password",
            &node.password,
            "--ca",
            &node.ca,
            "--compression",
            "lz4",
        ],
    );
    let wrong = python_in(
        "tests/cassandra_int/py",
        "login.py",
        &[&addr, &node.user, "not-the-password", &node.ca],
    );
    assert!(
        wrong.contains("auth failed") && wrong.contains("Provided username cassandra and/or password are incorrect"),
        "{wrong}"
    );
    proxy.stop();
}
