//! What the running proxies say they run: the operator asks each proxy Pod (sidecars and
//! DB-side proxies) for `GET /config` on its observability port, and the status counts a
//! proxy as up to date only when its answer names the current configuration hash.
//!
//! A proxy is asked only once its container runs. An answer naming the current hash is kept
//! for [`FRESH`] (the proxy is not asked again within that time); any other answer, or none,
//! is asked again at the next reconcile, which comes after [`RECHECK`] while some proxy is
//! behind. At most [`CONCURRENCY`] requests are in flight at once, each bounded by
//! [`TIMEOUT`], so a reconcile waits at most a few seconds for proxies that do not answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long an up-to-date answer is trusted.
pub const FRESH: Duration = Duration::from_secs(60);
/// The next reconcile while a proxy is behind or did not answer.
pub const RECHECK: Duration = Duration::from_secs(5);
/// Time for one `GET /config`, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests in flight at once.
pub const CONCURRENCY: usize = 32;
/// The most one reconcile spends asking (proxies not asked by then are asked at the next
/// one), so that thousands of silent Pods cannot hold a reconcile for minutes.
pub const BUDGET: Duration = Duration::from_secs(20);
/// The most bytes of an answer read (a `/config` answer is a few hundred bytes).
const MAX_ANSWER: u64 = 256 * 1024;
/// Entries not asked for in this long are dropped (their Pods are gone).
const FORGET: Duration = Duration::from_secs(600);

/// What one proxy runs, as far as the operator knows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Running {
    /// The proxy's container does not run yet (or the Pod has no IP): nothing to ask.
    #[default]
    NotStarted,
    /// Its answer to `GET /config`.
    Reported(Report),
    /// `GET /config` failed: why.
    Unreachable(String),
}

/// The part of the proxy's `/config` the status uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Report {
    /// Hash of the files it runs.
    pub hash: String,
    /// Settings of those files that wait for a restart.
    #[serde(default)]
    pub needs_restart: Vec<String>,
    /// The last reload that did not apply, after the running config.
    #[serde(default)]
    pub last_refused: Option<Refused>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Refused {
    pub hash: Option<String>,
    pub error: String,
}

/// How a proxy stands against the current configuration `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    Current,
    /// It runs something else, or needs a restart for part of it: why, in a few words.
    Behind(String),
    /// It tried to reload this configuration and refused it: the proxy's error.
    Refused(String),
    /// It did not answer: why.
    Unreported(String),
    NotStarted,
}

impl Standing {
    /// Why a proxy is not current, in a few words after its name (`None` when it is, or
    /// has not started).
    pub fn why_not(&self) -> Option<String> {
        match self {
            Standing::Current | Standing::NotStarted => None,
            Standing::Behind(why) => Some(why.clone()),
            Standing::Refused(error) => Some(format!("refused it: {error}")),
            Standing::Unreported(why) => Some(format!("did not answer GET /config: {why}")),
        }
    }
}

impl Running {
    pub fn standing(&self, hash: &str) -> Standing {
        match self {
            Running::NotStarted => Standing::NotStarted,
            Running::Unreachable(why) => Standing::Unreported(why.clone()),
            Running::Reported(report) => {
                if let Some(refused) = report
                    .last_refused
                    .as_ref()
                    .filter(|r| r.hash.as_deref() == Some(hash) && report.hash != hash)
                {
                    return Standing::Refused(crate::pods::shorten(&refused.error));
                }
                if report.hash != hash {
                    Standing::Behind(format!("runs {}", report.hash))
                } else if !report.needs_restart.is_empty() {
                    Standing::Behind(format!(
                        "needs a restart for {}",
                        report.needs_restart.join(", ")
                    ))
                } else {
                    Standing::Current
                }
            }
        }
    }
}

/// One proxy to ask: a key that names its Pod (`namespace/name`) and where it answers.
#[derive(Debug, Clone)]
pub struct Target {
    pub key: String,
    pub address: Option<SocketAddr>,
}

/// The answers, kept between reconciles.
#[derive(Default)]
pub struct Reports {
    cache: Mutex<HashMap<(String, SocketAddr), (Instant, Report)>>,
}

impl Reports {
    /// What each target runs, in the order given, against the current `hash`.
    pub async fn ask(&self, targets: &[Target], hash: &str) -> Vec<Running> {
        let now = Instant::now();
        let cached: Vec<Option<Report>> = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|_, (at, _)| now.duration_since(*at) < FORGET);
            targets
                .iter()
                .map(|t| {
                    let address = t.address?;
                    let (at, report) = cache.get(&(t.key.clone(), address))?;
                    (now.duration_since(*at) < FRESH
                        && report.hash == hash
                        && report.needs_restart.is_empty())
                    .then(|| report.clone())
                })
                .collect()
        };
        let asks: Vec<(Option<SocketAddr>, Option<Report>)> =
            targets.iter().map(|t| t.address).zip(cached).collect();
        let deadline = now + BUDGET;
        let answers: Vec<Running> = futures_util::stream::iter(asks)
            .map(|(address, cached)| async move {
                match (address, cached) {
                    (None, _) => Running::NotStarted,
                    (Some(_), Some(report)) => Running::Reported(report),
                    (Some(_), None) if Instant::now() > deadline => Running::Unreachable(format!(
                        "not asked yet: this reconcile's {} s for asking proxies ran out",
                        BUDGET.as_secs()
                    )),
                    (Some(address), None) => match get_config(address).await {
                        Ok(report) => Running::Reported(report),
                        Err(why) => Running::Unreachable(why),
                    },
                }
            })
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        for (target, answer) in targets.iter().zip(&answers) {
            let Some(address) = target.address else {
                continue;
            };
            let key = (target.key.clone(), address);
            match answer {
                Running::Reported(report) => {
                    // A reused answer keeps the time it was given.
                    let at = match cache.get(&key) {
                        Some((at, kept)) if kept == report => *at,
                        _ => now,
                    };
                    cache.insert(key, (at, report.clone()));
                }
                _ => {
                    cache.remove(&key);
                }
            }
        }
        answers
    }
}

/// `GET /config` from the proxy at `address`, over HTTP/1.0 (the answer ends with the
/// connection), within [`TIMEOUT`].
pub async fn get_config(address: SocketAddr) -> Result<Report, String> {
    let answer = http_get(&address.to_string(), "/config", TIMEOUT).await?;
    parse_answer(&answer)
}

/// The whole answer to `GET path` from `authority` (`host:port`) over HTTP/1.0, at most
/// [`MAX_ANSWER`] bytes, within `timeout`.
async fn http_get(authority: &str, path: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        Ok::<_, String>(answer)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
}

/// `shotover-operator check URL`: GETs `http://host:port/path` over HTTP/1.0 within 5 s;
/// `Ok(status line)` for a 200, else why not.
pub async fn check_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| "only http:// URLs are checked".to_owned())?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let answer = http_get(authority, path, Duration::from_secs(5)).await?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or_default().trim().to_owned();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(status)
    } else {
        Err(format!("answered `{status}`"))
    }
}

/// The report in an HTTP answer.
pub fn parse_answer(answer: &[u8]) -> Result<Report, String> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "the answer has no end of headers".to_owned())?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered `{}`", status.trim()));
    }
    serde_json::from_slice(&answer[split + 4..])
        .map_err(|e| format!("the answer is not a proxy's /config: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(hash: &str) -> Report {
        Report {
            hash: hash.to_owned(),
            ..Report::default()
        }
    }

    #[test]
    fn standing_against_the_current_hash() {
        let current = Running::Reported(report("h2"));
        assert_eq!(current.standing("h2"), Standing::Current);
        assert_eq!(
            current.standing("h3"),
            Standing::Behind("runs h2".to_owned())
        );
        let refused = Running::Reported(Report {
            last_refused: Some(Refused {
                hash: Some("h3".to_owned()),
                error: "reading the TLS certificate /etc/tls/tls.crt: No such file".to_owned(),
            }),
            ..report("h2")
        });
        assert_eq!(
            refused.standing("h3"),
            Standing::Refused(
                "reading the TLS certificate /etc/tls/tls.crt: No such file".to_owned()
            )
        );
        // A refusal of another configuration says nothing about this one.
        assert_eq!(
            refused.standing("h4"),
            Standing::Behind("runs h2".to_owned())
        );
        let restart = Running::Reported(Report {
            needs_restart: vec!["observability_interface".to_owned()],
            ..report("h2")
        });
        assert_eq!(
            restart.standing("h2"),
            Standing::Behind("needs a restart for observability_interface".to_owned())
        );
        assert_eq!(Running::NotStarted.standing("h2"), Standing::NotStarted);
        assert_eq!(
            Running::Unreachable("connecting: refused".to_owned()).standing("h2"),
            Standing::Unreported("connecting: refused".to_owned())
        );
    }

    #[test]
    fn answers_are_parsed_or_explained() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"hash\":\"abc\",\"generation\":2,\"needs_restart\":[],\"last_refused\":null}";
        assert_eq!(parse_answer(ok), Ok(report("abc")));
        assert_eq!(
            parse_answer(b"HTTP/1.0 404 Not Found\r\n\r\n"),
            Err("answered `HTTP/1.0 404 Not Found`".to_owned())
        );
        assert!(
            parse_answer(b"HTTP/1.0 200 OK\r\n\r\n<html>")
                .expect_err("not JSON")
                .starts_with("the answer is not a proxy's /config")
        );
        assert_eq!(
            parse_answer(b"garbage"),
            Err("the answer has no end of headers".to_owned())
        );
    }

    /// A real listener: the answer is read, kept while fresh and current, and asked again
    /// when it names another hash.
    #[tokio::test]
    async fn answers_are_kept_only_while_current() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let body = "{\"hash\":\"h1\",\"needs_restart\":[]}";
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let reports = Reports::default();
        let targets = [
            Target {
                key: "ns/a".to_owned(),
                address: Some(address),
            },
            Target {
                key: "ns/b".to_owned(),
                address: None,
            },
        ];
        let first = reports.ask(&targets, "h1").await;
        assert_eq!(
            first,
            vec![Running::Reported(report("h1")), Running::NotStarted]
        );
        assert_eq!(reports.ask(&targets, "h1").await, first);
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1, "kept");
        reports.ask(&targets, "h2").await;
        assert_eq!(
            served.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "asked again for another hash"
        );
        // Nothing listens: an error that says so.
        drop(reports);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let gone = closed.local_addr().expect("address");
        drop(closed);
        match get_config(gone).await {
            Err(why) => assert!(why.starts_with("connecting:"), "{why}"),
            Ok(r) => panic!("{r:?}"),
        }
    }
}
