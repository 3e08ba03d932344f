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

/// How the Redis sinks of a test topology reach Redis: every test that has a Redis sink runs
/// in both modes (see `in_both_modes!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One upstream connection per client connection (no `connection_count`).
    Dedicated,
    /// Shared upstream connections (`connection_count: 2`).
    Shared,
}

impl Mode {
    /// `topology` with `connection_count: 2` added to every `RedisSinkSingle` in shared mode,
    /// in block (`- RedisSinkSingle:` then its fields) or flow (`RedisSinkSingle: { .. }`)
    /// style.
    pub fn topology(self, topology: &str) -> String {
        if self == Mode::Dedicated {
            return topology.to_string();
        }
        let lines: Vec<&str> = topology.lines().collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            if let Some(at) = line.find("RedisSinkSingle: {") {
                let split = at + "RedisSinkSingle: {".len();
                out.push_str(&line[..split]);
                out.push_str(" connection_count: 2,");
                out.push_str(&line[split..]);
                out.push('\n');
                continue;
            }
            out.push_str(line);
            out.push('\n');
            if line.trim_end().ends_with("RedisSinkSingle:") {
                let next = lines.get(i + 1).expect("RedisSinkSingle has fields");
                let indent = next.len() - next.trim_start().len();
                out.push_str(&" ".repeat(indent));
                out.push_str("connection_count: 2\n");
            }
        }
        assert!(
            out.contains("connection_count: 2"),
            "a test run in both modes has no RedisSinkSingle:\n{topology}"
        );
        out
    }

    /// Starts the proxy with `topology` in this mode.
    pub fn start(self, topology: &str) -> Shotover {
        Shotover::start(&self.topology(topology))
    }

    /// Starts the proxy with `topology` in this mode without waiting.
    pub fn spawn(self, topology: &str, args: &[&str]) -> Shotover {
        Shotover::spawn(&self.topology(topology), args)
    }
}

/// Runs each listed test (a function taking a [`Mode`]) once per mode, as
/// `dedicated_mode::<name>` and `shared_mode::<name>`.
#[macro_export]
macro_rules! in_both_modes {
    (async: [$($async_test:ident),* $(,)?], sync: [$($sync_test:ident),* $(,)?] $(,)?) => {
        mod dedicated_mode {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $async_test() {
                    super::$async_test($crate::helpers::Mode::Dedicated).await
                }
            )*
            $(
                #[test]
                fn $sync_test() {
                    super::$sync_test($crate::helpers::Mode::Dedicated)
                }
            )*
        }
        mod shared_mode {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $async_test() {
                    super::$async_test($crate::helpers::Mode::Shared).await
                }
            )*
            $(
                #[test]
                fn $sync_test() {
                    super::$sync_test($crate::helpers::Mode::Shared)
                }
            )*
        }
    };
}

/// An EVAL whose script returns a table nested `levels` deep, and the reply Redis sends for
/// it (`levels + 1` nested one-element arrays around `:7`).
pub fn nested_script(levels: usize) -> (String, Vec<u8>) {
    let script = format!(
        "local t = {{}} local c = t for i = 1, {levels} do local n = {{}} c[1] = n c = n end c[1] = 7 return t"
    );
    let request = format!(
        "*3\r\n$4\r\nEVAL\r\n${}\r\n{script}\r\n$1\r\n0\r\n",
        script.len()
    );
    let mut expected = b"*1\r\n".repeat(levels + 1);
    expected.extend_from_slice(b":7\r\n");
    (request, expected)
}

/// A kB field of /proc/<pid>/status (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}
