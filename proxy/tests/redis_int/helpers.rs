//! Redis helpers of the integration tests; the process helpers are in `support/process.rs`.

pub use crate::process::*;

use std::process::Command;
use std::time::{Duration, Instant};
/// The address of the real Redis the tests use. A missing server is a failure, not a skip.
pub fn redis_addr() -> String {
    std::env::var("REDIS_ADDR").expect(
        "REDIS_ADDR is not set: start Redis with `eval \"$(e2e/services up redis redis-tls)\"` (the test command does this)",
    )
}

/// The TLS Redis: its address and the CA that signed its certificate.
pub fn redis_tls() -> (String, String) {
    let addr = std::env::var("REDIS_TLS_ADDR")
        .expect("REDIS_TLS_ADDR is not set: start it with `eval \"$(e2e/services up redis-tls)\"`");
    let ca = std::env::var("REDIS_TLS_CA").expect("REDIS_TLS_CA is not set (see e2e/services)");
    (addr, ca)
}

/// A passthrough topology on `port` to `upstream`, with optional extra source fields.
pub fn passthrough(port: u16, upstream: &str, source_extra: &str) -> String {
    format!(
        r#"
sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
{source_extra}
      chain:
        - RedisSinkSingle:
            name: "sink"
            remote_address: "{upstream}"
            connect_timeout_ms: 3000
"#
    )
}

pub async fn connect(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("client")
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("connecting through the proxy")
}

/// Runs a Python script from `py/` with arguments; fails the test with its output if it
/// exits non-zero.
pub fn python(script: &str, args: &[&str]) -> String {
    python_in("tests/redis_int/py", script, args)
}

/// Runs redis-cli with arguments and returns its stdout.
pub fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("running redis-cli (e2e/services installs it)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The port of the real Redis.
pub fn redis_port() -> String {
    redis_addr()
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .expect("REDIS_ADDR is host:port")
}

/// The `CLIENT LIST` line of the Redis client named `name`.
pub fn client_line(name: &str) -> Option<String> {
    redis_cli(&["-p", &redis_port(), "CLIENT", "LIST"])
        .lines()
        .find(|l| l.split(' ').any(|f| f == format!("name={name}")))
        .map(str::to_string)
}

/// The id of the Redis client named `name`.
pub fn client_id(name: &str) -> Option<String> {
    client_line(name)?
        .split(' ')
        .find_map(|f| f.strip_prefix("id=").map(str::to_string))
}

/// Starts `BLPOP key timeout_secs` through the proxy on a connection of its own and returns
/// once Redis reports that client blocked. The task yields the reply and how long it took.
pub async fn blpop_in_flight(
    port: u16,
    key: &str,
    timeout_secs: u64,
) -> tokio::task::JoinHandle<(Option<(String, String)>, Duration)> {
    let name = prefix("blpop-client").replace(':', "-");
    let task = {
        let (key, name) = (key.to_string(), name.clone());
        tokio::spawn(async move {
            let mut con = connect(port).await;
            let () = redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(&name)
                .query_async(&mut con)
                .await
                .expect("SETNAME");
            let started = Instant::now();
            let got: Option<(String, String)> = redis::cmd("BLPOP")
                .arg(&key)
                .arg(timeout_secs)
                .query_async(&mut con)
                .await
                .expect("BLPOP is answered");
            (got, started.elapsed())
        })
    };
    wait_until(
        "the client to block in BLPOP",
        Duration::from_secs(5),
        || client_line(&name).is_some_and(|l| l.contains("cmd=blpop")),
    );
    task
}
