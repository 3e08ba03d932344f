//! Hot reload: the proxy watches its topology and config files and reloads on a change or
//! on SIGHUP, without dropping a connection.
//!
//! A reload reads both files, validates them, builds every chain that changed, its TLS
//! acceptor, and binds every new listener before anything running is touched: any failure
//! refuses the whole reload, and the running config stays (logged, counted in
//! `shotover_config_reloads_count{result="refused"}`, shown by `/config`). A valid one is
//! then applied per source, matched by `listen_addr`:
//!
//! - a source whose chain is unchanged keeps its chain and everything it holds (shared
//!   upstream connections, a cluster's slot map); its listener settings (`name`,
//!   `connection_limit`, `hard_connection_limit`, `timeout`, `max_frame_size_bytes`, `tls`,
//!   re-read from their files) apply to the connections it accepts from then on;
//! - a source whose chain changed gets the new chain for new connections, and its open
//!   connections move over at a request boundary (see [`follow`]) or are closed at the
//!   drain deadline;
//! - a new source is bound and accepts; a removed one stops accepting, and its connections
//!   are closed once nothing they sent is in flight (at the latest at the drain deadline);
//!   a source whose protocol changed is removed and added again (its port is closed for the
//!   moment in between).
//!
//! From the config file, `main_log_level` applies at once (unless `--log-level` overrides
//! it) and so do `max_buffered_reply_bytes` and `max_buffered_request_bytes`; `observability_interface` needs a restart
//! (the reload says so in `/config` and the log).

pub mod follow;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use shotover_crds::{ProxyConfig, SourceConfig, config_hash};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{self, Counter, Gauge};
use crate::server::{Source, SourceSettings, connection_limit};
use crate::telemetry::FilterHandle;
use crate::transforms;

/// The two files as read, and what the TLS files the topology names hold.
#[derive(Clone, PartialEq)]
pub struct Files {
    pub topology: String,
    pub config: String,
    /// Every TLS file the topology names (certificates, keys, CAs) with the SHA-256 of its
    /// content, in topology order: a new certificate (a cert-manager renewal, a rotated
    /// Kubernetes Secret) reloads too. Empty while the topology does not load.
    pub tls: Vec<TlsFile>,
}

impl Files {
    pub fn read(topology: &PathBuf, config: &PathBuf) -> Result<Files> {
        let topology_text = std::fs::read_to_string(topology)
            .with_context(|| format!("reading the topology file {}", topology.display()))?;
        let tls = tls_files(&topology_text);
        Ok(Files {
            topology: topology_text,
            config: std::fs::read_to_string(config)
                .with_context(|| format!("reading the config file {}", config.display()))?,
            tls,
        })
    }

    pub fn hash(&self) -> String {
        config_hash(&self.topology, &self.config)
    }
}

/// One TLS file the topology names, and what it holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TlsFile {
    /// Where the topology names it (`sources[0].tls.certificatePath`).
    pub at: String,
    pub path: String,
    /// SHA-256 of its content (hex, as `sha256sum` prints it)...
    pub sha256: Option<String>,
    /// ...or why it cannot be read.
    pub error: Option<String>,
}

/// See [`Files::tls`]. An unreadable file counts as its error, so that it reloads (and is
/// refused, saying why) when it becomes readable or unreadable.
fn tls_files(topology: &str) -> Vec<TlsFile> {
    use sha2::{Digest, Sha256};
    let Ok(topology) = shotover_crds::load_topology(topology) else {
        return Vec::new();
    };
    shotover_crds::tls_files(&topology)
        .into_iter()
        .map(|(at, path)| {
            let (sha256, error) = match std::fs::read(&path) {
                Ok(content) => (
                    Some(
                        Sha256::digest(&content)
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect(),
                    ),
                    None,
                ),
                Err(e) => (None, Some(e.to_string())),
            };
            TlsFile {
                at,
                path,
                sha256,
                error,
            }
        })
        .collect()
}

/// What `/config` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConfigStatus {
    /// The hash of the running files (the operator's `configHash` of the same files).
    pub hash: String,
    /// 1 at start, +1 per applied reload.
    pub generation: u64,
    pub topology_file: String,
    pub config_file: String,
    /// Unix time the running config was applied.
    pub applied_at: u64,
    /// The sources running, by name.
    pub sources: Vec<String>,
    /// The last reload that did not apply, if it came after the running config.
    pub last_refused: Option<Refused>,
    /// Settings of the running files that wait for a restart.
    pub needs_restart: Vec<String>,
    /// The TLS files running, with the SHA-256 of what was read: after a certificate is
    /// renewed, the new one's hash shows here once it is applied.
    pub tls_files: Vec<TlsFile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Refused {
    pub hash: Option<String>,
    pub at: u64,
    pub error: String,
}

static STATUS: LazyLock<Mutex<ConfigStatus>> = LazyLock::new(Mutex::default);

/// The running config, for `/config`.
pub fn status() -> ConfigStatus {
    STATUS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Metrics {
    applied: Counter,
    refused: Counter,
    last_successful: Gauge,
    last_success_at: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let reloads = |result| {
            metrics::counter(
                "shotover_config_reloads_count",
                "Reloads of the topology and config files, by result (applied, refused).",
                &[("result", result)],
            )
        };
        Metrics {
            applied: reloads("applied"),
            refused: reloads("refused"),
            last_successful: metrics::gauge(
                "shotover_config_last_reload_successful",
                "1 if the last reload (or the start) applied, 0 if it was refused.",
                &[],
            ),
            last_success_at: metrics::gauge(
                "shotover_config_last_reload_success_timestamp_seconds",
                "Unix time of the last applied reload (or the start).",
                &[],
            ),
        }
    }
}

/// Sets `shotover_config_info{hash}` to 1 for the running config and removes the old one.
fn set_info(old: Option<&str>, new: &str) {
    let name = "shotover_config_info";
    if let Some(old) = old {
        metrics::global().remove(name, &[("hash", old)]);
    }
    metrics::gauge(
        name,
        "1 for the hash of the running topology and config files (the operator's configHash).",
        &[("hash", new)],
    )
    .set(1);
}

/// A running source, as the reloader holds it.
struct Running {
    config: SourceConfig,
    settings: watch::Sender<Arc<SourceSettings>>,
    limit: Arc<Semaphore>,
    limit_value: usize,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Everything a reload needs, owned by the task that watches the files.
pub struct Reloader {
    pub topology_file: PathBuf,
    pub config_file: PathBuf,
    /// `--log-level`, which the config file's `main_log_level` does not override.
    pub log_level_override: bool,
    pub filter: FilterHandle,
    pub observability_interface: Option<String>,
    pub drain: Duration,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    running: HashMap<String, Running>,
    /// The files running, and the last ones seen (refused or not), to reload on a change.
    applied: Files,
    seen: Option<std::result::Result<Files, String>>,
    metrics: Metrics,
}

/// A source bound at start, handed to [`Reloader::start`].
pub struct Started {
    pub config: SourceConfig,
    pub source: Source,
    pub settings: watch::Sender<Arc<SourceSettings>>,
    pub limit: Arc<Semaphore>,
}

impl Reloader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topology_file: PathBuf,
        config_file: PathBuf,
        log_level_override: bool,
        filter: FilterHandle,
        observability_interface: Option<String>,
        drain: Duration,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        files: Files,
    ) -> Reloader {
        Reloader {
            topology_file,
            config_file,
            log_level_override,
            filter,
            observability_interface,
            drain,
            shutdown,
            tracker,
            running: HashMap::new(),
            seen: Some(Ok(files.clone())),
            applied: files,
            metrics: Metrics::new(),
        }
    }

    /// Starts the accept loops of the sources bound at start and records the running config.
    pub fn start(&mut self, sources: Vec<Started>) {
        for started in sources {
            self.spawn(started);
        }
        let hash = self.applied.hash();
        set_info(None, &hash);
        self.metrics.last_successful.set(1);
        self.metrics.last_success_at.set(now() as i64);
        let mut status = STATUS.lock().unwrap_or_else(|e| e.into_inner());
        *status = ConfigStatus {
            hash,
            generation: 1,
            topology_file: self.topology_file.display().to_string(),
            config_file: self.config_file.display().to_string(),
            applied_at: now(),
            sources: self.source_names(),
            last_refused: None,
            needs_restart: Vec::new(),
            tls_files: self.applied.tls.clone(),
        };
    }

    fn source_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .running
            .values()
            .map(|r| r.config.name().to_owned())
            .collect();
        names.sort();
        names
    }

    fn spawn(&mut self, started: Started) {
        let stop = self.shutdown.child_token();
        let task = tokio::spawn(started.source.run(
            stop.clone(),
            self.shutdown.clone(),
            self.tracker.clone(),
        ));
        let limit_value = connection_limit(&started.config);
        self.running.insert(
            started.config.listener().listen_addr.clone(),
            Running {
                config: started.config,
                settings: started.settings,
                limit: started.limit,
                limit_value,
                stop,
                task,
            },
        );
    }

    /// Watches the files every `interval` (if any) and reloads on a change or on SIGHUP,
    /// until shutdown.
    pub async fn run(mut self, interval: Option<Duration>) -> Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut tick = interval.map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let forced = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = hup.recv() => true,
                _ = async {
                    match &mut tick {
                        Some(t) => { t.tick().await; }
                        None => std::future::pending().await,
                    }
                } => false,
            };
            self.check(forced).await;
        }
        // Shutdown: the accept loops end on their own (their tokens are children of it).
        for (_, running) in self.running.drain() {
            let _ = running.task.await;
        }
        Ok(())
    }

    /// Reads the files; reloads if they changed since last seen (or if `forced`, when they
    /// differ from the running ones).
    async fn check(&mut self, forced: bool) {
        let read = {
            // File reads block: keep them off the workers that serve connections.
            let (topology, config) = (self.topology_file.clone(), self.config_file.clone());
            tokio::task::spawn_blocking(move || Files::read(&topology, &config))
                .await
                .unwrap_or_else(|e| Err(anyhow!("reading the files: {e}")))
                .map_err(|e| format!("{e:#}"))
        };
        if !forced && self.seen.as_ref() == Some(&read) {
            return;
        }
        self.seen = Some(read.clone());
        match read {
            Err(error) => self.refuse(None, error),
            Ok(files) if files == self.applied => {
                if forced {
                    tracing::info!("SIGHUP: the topology and config files are unchanged");
                }
                // Back to the running files after a refused edit: nothing refused any more.
                STATUS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_refused = None;
                self.metrics.last_successful.set(1);
            }
            Ok(files) => {
                let hash = files.hash();
                let started = std::time::Instant::now();
                match self.apply(&files).await {
                    Ok(summary) => {
                        tracing::info!(
                            hash = %hash,
                            took_ms = started.elapsed().as_millis() as u64,
                            "reloaded the topology: {summary}"
                        );
                        set_info(Some(&self.applied.hash()), &hash);
                        self.applied = files;
                        self.metrics.applied.inc();
                        self.metrics.last_successful.set(1);
                        self.metrics.last_success_at.set(now() as i64);
                        let sources = self.source_names();
                        let mut status = STATUS.lock().unwrap_or_else(|e| e.into_inner());
                        status.hash = hash;
                        status.generation += 1;
                        status.applied_at = now();
                        status.sources = sources;
                        status.last_refused = None;
                        status.tls_files = self.applied.tls.clone();
                    }
                    Err(e) => self.refuse(Some(hash), format!("{e:#}")),
                }
            }
        }
    }

    fn refuse(&mut self, hash: Option<String>, error: String) {
        tracing::error!(error = %error, "reload refused: the running topology keeps serving");
        self.metrics.refused.inc();
        self.metrics.last_successful.set(0);
        STATUS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_refused = Some(Refused {
            hash,
            at: now(),
            error,
        });
    }

    /// Validates and prepares everything, then applies it. An error leaves the running
    /// sources untouched.
    async fn apply(&mut self, files: &Files) -> Result<String> {
        let config = ProxyConfig::from_yaml(&files.config)
            .map_err(|e| anyhow!("{}: {e}", self.config_file.display()))?;
        let topology = shotover_crds::load_topology(&files.topology)
            .map_err(|e| anyhow!("{}: {e}", self.topology_file.display()))?;
        let filter = (!self.log_level_override)
            .then(|| crate::telemetry::parse_filter(&config.main_log_level))
            .transpose()?;

        // Prepare: chains, TLS and new listeners. Nothing running changes yet.
        enum Plan {
            Update {
                settings: SourceSettings,
            },
            Add {
                bound: Box<Started>,
            },
            /// Same address, other protocol: bound once the old listener is closed.
            Replace {
                settings: SourceSettings,
            },
        }
        let mut plans: Vec<(SourceConfig, Plan)> = Vec::new();
        let mut new_tls: Vec<String> = Vec::new();
        // New TLS files: a chain that names one is built again (its connectors read them),
        // and every source's acceptor is built again anyway.
        let tls_changed = files.tls != self.applied.tls;
        let tls_files = shotover_crds::tls_files(&topology);
        for (i, source) in topology.sources.iter().enumerate() {
            let context = || format!("source `{}`", source.name());
            let chain_prefix = format!("sources[{i}].chain");
            let chain_tls_changed = tls_changed
                && tls_files
                    .iter()
                    .any(|(at, _)| at.starts_with(&chain_prefix));
            let source_prefix = format!("sources[{i}].");
            let source_tls_changed = tls_changed
                && tls_files
                    .iter()
                    .any(|(at, _)| at.starts_with(&source_prefix));
            let addr = &source.listener().listen_addr;
            let old = self.running.get(addr);
            let same_protocol = old.is_some_and(|o| o.config.protocol() == source.protocol());
            let chain = match old {
                // The chain is named after its source: a rename builds it again.
                Some(old)
                    if same_protocol
                        && !chain_tls_changed
                        && old.config.name() == source.name()
                        && old.config.chain() == source.chain() =>
                {
                    old.settings.borrow().chain.clone()
                }
                _ => None,
            };
            let chain = match chain {
                Some(kept) => kept,
                None => Arc::new(
                    transforms::build_chain(source.name(), source.chain()).with_context(context)?,
                ),
            };
            if source_tls_changed {
                new_tls.push(source.name().to_owned());
            }
            let tls = Source::tls_acceptor(source.listener()).with_context(context)?;
            let settings = SourceSettings::new(source, chain, tls);
            let plan = match old {
                Some(_) if same_protocol => Plan::Update { settings },
                Some(_) => Plan::Replace { settings },
                None => {
                    let (source_bound, tx, limit) = Source::bind(source, settings, self.drain)
                        .await
                        .with_context(context)?;
                    Plan::Add {
                        bound: Box::new(Started {
                            config: source.clone(),
                            source: source_bound,
                            settings: tx,
                            limit,
                        }),
                    }
                }
            };
            plans.push((source.clone(), plan));
        }

        // Apply.
        let mut summary = Summary {
            tls_changed: new_tls,
            ..Summary::default()
        };
        let wanted: Vec<String> = topology
            .sources
            .iter()
            .map(|s| s.listener().listen_addr.clone())
            .collect();
        let replaced: Vec<String> = plans
            .iter()
            .filter(|(_, p)| matches!(p, Plan::Replace { .. }))
            .map(|(s, _)| s.listener().listen_addr.clone())
            .collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|addr| !wanted.contains(addr) || replaced.contains(addr))
            .cloned()
            .collect();
        for addr in gone {
            if let Some(running) = self.running.remove(&addr) {
                let removed = running.settings.borrow().removed();
                running.settings.send_replace(Arc::new(removed));
                running.stop.cancel();
                let _ = running.task.await;
                if !replaced.contains(&addr) {
                    summary.removed.push(running.config.name().to_owned());
                }
            }
        }
        let mut late_failures = Vec::new();
        for (config, plan) in plans {
            let name = config.name().to_owned();
            match plan {
                Plan::Update { settings } => {
                    let Some(running) = self.running.get_mut(&config.listener().listen_addr) else {
                        continue;
                    };
                    let chain_changed = {
                        let old = running.settings.borrow();
                        !matches!((&old.chain, &settings.chain), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
                    };
                    let new_limit = connection_limit(&config);
                    resize(running, new_limit, &settings);
                    if running.config != config {
                        if chain_changed {
                            summary.chain_changed.push(name);
                        } else {
                            summary.listener_changed.push(name);
                        }
                    }
                    running.settings.send_replace(Arc::new(settings));
                    running.config = config;
                }
                Plan::Add { bound } => {
                    summary.added.push(name);
                    self.spawn(*bound);
                }
                Plan::Replace { settings } => {
                    match Source::bind(&config, settings, self.drain).await {
                        Ok((source, tx, limit)) => {
                            summary.chain_changed.push(name);
                            self.spawn(Started {
                                config,
                                source,
                                settings: tx,
                                limit,
                            });
                        }
                        Err(e) => late_failures.push(format!("source `{name}`: {e:#}")),
                    }
                }
            }
        }

        // The config file.
        if let Some(filter) = filter {
            self.filter.set_parsed(filter)?;
        }
        crate::budget::configure(config.max_buffered_reply_bytes);
        crate::budget::requests::configure(config.max_buffered_request_bytes);
        let mut needs_restart = Vec::new();
        if config.observability_interface != self.observability_interface {
            let text = format!(
                "observability_interface: {} until a restart ({} in the file)",
                self.observability_interface.as_deref().unwrap_or("none"),
                config.observability_interface.as_deref().unwrap_or("none"),
            );
            tracing::warn!("{text}");
            needs_restart.push(text);
        }
        STATUS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .needs_restart = needs_restart;
        if !late_failures.is_empty() {
            // The rest applied; say what did not.
            tracing::error!(failures = ?late_failures, "reload applied except for sources whose protocol changed and whose port could not be bound again");
        }
        Ok(summary.to_string())
    }
}

/// Moves a running source's connection limit to `new`: permits are added at once; when it
/// shrinks below the connections open, the rest are taken as those connections end.
fn resize(running: &mut Running, new: usize, settings: &SourceSettings) {
    let old = running.limit_value;
    let in_use = old as i64 - running.settings.borrow().available().get();
    if new > old {
        running.limit.add_permits(new - old);
    } else if new < old {
        let owed = old - new;
        let forgotten = running.limit.forget_permits(owed);
        if forgotten < owed {
            let limit = running.limit.clone();
            let rest = (owed - forgotten) as u32;
            tokio::spawn(async move {
                if let Ok(permits) = limit.acquire_many_owned(rest).await {
                    permits.forget();
                }
            });
        }
    }
    running.limit_value = new;
    settings.available().set(new as i64 - in_use);
}

#[derive(Default)]
struct Summary {
    added: Vec<String>,
    removed: Vec<String>,
    chain_changed: Vec<String>,
    listener_changed: Vec<String>,
    /// Sources whose TLS files (certificates, keys, CAs) hold something new.
    tls_changed: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            ("added", &self.added),
            ("removed", &self.removed),
            ("new chain", &self.chain_changed),
            ("new listener settings", &self.listener_changed),
            ("new TLS files", &self.tls_changed),
        ];
        let mut any = false;
        for (what, names) in parts {
            if !names.is_empty() {
                if any {
                    write!(f, "; ")?;
                }
                write!(f, "{what}: {}", names.join(", "))?;
                any = true;
            }
        }
        if !any {
            write!(f, "no source changed")?;
        }
        Ok(())
    }
}
