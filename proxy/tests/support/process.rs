//! Running the real `shotover` binary as a process, and talking to it: shared by the
//! integration test crates (each uses a part of it).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port nobody listens on right now, and that this process has not handed out before: the
/// OS may give a port just released to the next bind, so two calls for one topology could
/// otherwise name the same port.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A key prefix unique to one test run.
pub fn prefix(test: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{test}:{}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every 20 ms until it holds, failing after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "shotover-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}

/// Arguments every proxy a test starts gets, from `SHOTOVER_TEST_ARGS` (split on
/// whitespace): to run a whole suite with, say, `--thread-per-core --core-threads 1`.
fn extra_args() -> Vec<String> {
    std::env::var("SHOTOVER_TEST_ARGS")
        .map(|args| args.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// A running `shotover` process with its own topology and config files.
pub struct Shotover {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    /// Reads the process's stderr; ends when the process does.
    log_reader: Option<std::thread::JoinHandle<()>>,
    pub observability: String,
    /// Holds `topology.yaml` and `config.yaml`.
    pub dir: PathBuf,
}

impl Shotover {
    /// Starts the proxy with `topology` and waits until `/ready` says 200.
    pub fn start(topology: &str) -> Shotover {
        let shotover = Shotover::spawn(topology, &[]);
        shotover.wait_ready();
        shotover
    }

    /// Starts the proxy without waiting; extra arguments are passed on.
    pub fn spawn(topology: &str, args: &[&str]) -> Shotover {
        Shotover::spawn_with_config(topology, "", args)
    }

    /// Starts the proxy with `config` (lines) added to its config.yaml and waits until it
    /// is ready.
    #[allow(dead_code)]
    pub fn start_with_config(topology: &str, config: &str) -> Shotover {
        let shotover = Shotover::spawn_with_config(topology, config, &[]);
        shotover.wait_ready();
        shotover
    }

    fn spawn_with_config(topology: &str, config: &str, args: &[&str]) -> Shotover {
        let dir = temp_dir("proxy");
        let observability = format!("127.0.0.1:{}", free_port());
        std::fs::write(dir.join("topology.yaml"), topology).expect("writing topology.yaml");
        std::fs::write(
            dir.join("config.yaml"),
            format!(
                "main_log_level: \"info\"\nobservability_interface: \"{observability}\"\n{config}"
            ),
        )
        .expect("writing config.yaml");
        let mut child = Command::new(env!("CARGO_BIN_EXE_shotover"))
            .arg("--topology-file")
            .arg(dir.join("topology.yaml"))
            .arg("--config-file")
            .arg(dir.join("config.yaml"))
            .args(args)
            .args(extra_args())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the shotover binary");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = logs.clone();
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[shotover] {line}");
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Shotover {
            child: Some(child),
            logs,
            log_reader: Some(log_reader),
            observability,
            dir,
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _, _)) = http(&self.observability, "GET", "/ready", "") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "shotover was not ready within 20 s; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Waits until a log line contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        wait_until(
            &format!("a log line with `{text}`"),
            Duration::from_secs(10),
            || {
                self.logs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|l| l.contains(text))
            },
        );
    }

    /// The sum of every series whose line starts with `prefix` (a metric name and `{`, or
    /// a name with some of its labels).
    #[allow(dead_code)]
    pub fn metric_sum(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Replaces `topology.yaml` at once (written aside, then renamed over it), as an editor
    /// or `kubectl cp` would.
    #[allow(dead_code)]
    pub fn rewrite_topology(&self, topology: &str) {
        let aside = self.dir.join(".topology.yaml.new");
        std::fs::write(&aside, topology).expect("writing the new topology");
        std::fs::rename(&aside, self.dir.join("topology.yaml")).expect("renaming it over");
    }

    /// Waits until the series' value satisfies `check` (absent counts as 0).
    #[allow(dead_code)]
    pub fn wait_metric(&self, series: &str, check: impl Fn(f64) -> bool) {
        wait_until(
            &format!("`{series}` to reach its expected value"),
            Duration::from_secs(15),
            || check(self.metric(series).unwrap_or(0.0)),
        );
    }

    pub fn metrics(&self) -> String {
        let (status, _, body) =
            http(&self.observability, "GET", "/metrics", "").expect("GET /metrics");
        assert_eq!(status, 200);
        body
    }

    /// The value of one metric series, e.g. `shotover_query_count{name="a",query="GET",type="redis"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("process already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for shotover") {
                self.child = None;
                // Every line is in `logs` once the reader has seen the end of stderr.
                if let Some(reader) = self.log_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "shotover did not exit within {timeout:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, a clean exit, and no WARN or ERROR line except those containing one of
    /// `allowed`.
    pub fn stop_expecting(mut self, allowed: &[&str]) -> String {
        self.terminate();
        let status = self.wait_exit(Duration::from_secs(30));
        let logs = self.logs();
        assert!(
            status.success(),
            "shotover exited with {status}; logs:\n{logs}"
        );
        let unexpected: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| !allowed.iter().any(|a| l.contains(a)))
            .collect();
        assert!(
            unexpected.is_empty(),
            "unexpected WARN/ERROR lines:\n{}",
            unexpected.join("\n")
        );
        logs
    }

    /// Stops with no WARN or ERROR allowed.
    pub fn stop(self) -> String {
        self.stop_expecting(&[])
    }
}

impl Drop for Shotover {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Status, headers (lower-cased names) and body of an HTTP response.
pub type HttpResponse = (u16, Vec<(String, String)>, String);

/// A minimal HTTP/1.1 request.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}

/// A raw TCP conversation: writes `request`, reads until `expected_len` bytes arrived, the
/// peer closed, or 5 s passed.
pub fn raw(addr: &str, request: &[u8], expected_len: usize) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    stream.write_all(request).expect("writing");
    read_available(&mut stream, expected_len, Duration::from_secs(5))
}

pub fn read_available(stream: &mut TcpStream, expected_len: usize, timeout: Duration) -> Vec<u8> {
    // A read never blocks past the deadline.
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while out.len() < expected_len && Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    out
}

/// Whether the peer closed the connection (reads EOF or a reset within `timeout`).
pub fn is_closed(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Runs a Python script from `dir` (relative to the crate) with arguments; fails the test
/// with its output if it exits non-zero.
pub fn python_in(dir: &str, script: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("running python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}
