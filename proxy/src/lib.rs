//! The shotover proxy: the data plane. It reads upstream Shotover's `topology.yaml` and
//! `config.yaml`, listens on every source, runs each request through its source's chain of
//! transforms and sends it on through a sink, and serves metrics and health over HTTP.
//!
//! Layout: [`codec`] finds and parses frames, [`message`] carries them, [`chain`] defines
//! the transform contract, [`transforms`] holds every transform, [`server`] and
//! [`connection`] run sources and client connections, [`observability`] and [`metrics`]
//! report on all of it.

pub mod budget;
pub mod chain;
pub mod codec;
pub mod connection;
pub mod message;
pub mod metrics;
pub mod observability;
pub mod outbox;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod transforms;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use shotover_crds::ProxyConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::{Source, SourceSettings};
use crate::telemetry::LogFormat;

/// Command line of the `shotover` binary (upstream Shotover's flags).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "shotover",
    version,
    about = "A Shotover-compatible L7 data-layer proxy"
)]
pub struct Opts {
    /// The topology: sources and their chains.
    #[arg(short = 't', long, default_value = "config/topology.yaml")]
    pub topology_file: PathBuf,
    /// Process settings: log level and observability address.
    #[arg(short = 'c', long, default_value = "config/config.yaml")]
    pub config_file: PathBuf,
    /// Worker threads of the runtime (default: one per CPU core); with
    /// `--thread-per-core`, the number of those threads.
    #[arg(long)]
    pub core_threads: Option<usize>,
    /// Run each client connection on one thread for its whole life, with the shared
    /// upstream connections it uses (one single-threaded runtime per core, connections
    /// handed to them in turn) instead of on tokio's work-stealing runtime.
    #[arg(long)]
    pub thread_per_core: bool,
    /// Stack size of each worker thread, in bytes.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub stack_size: usize,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the process exits.
    #[arg(long, default_value_t = 25)]
    pub shutdown_grace_seconds: u64,
    /// On SIGTERM, how long to keep serving (and accepting) with `/ready` failing before the
    /// drain starts, so that Services and kube-proxy stop sending new connections first. A
    /// second signal ends the delay at once.
    #[arg(long, default_value_t = 0)]
    pub shutdown_delay_seconds: u64,
    /// Overrides `main_log_level` of the config file (a filter such as `info` or
    /// `shotover=debug,warn`).
    #[arg(long, env = "SHOTOVER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Do not run the proxy: wait until the proxy whose observability server listens on
    /// ADDR (host:port) answers `/ready` with 200, then exit 0 (or 1 after
    /// `--await-timeout-seconds`). An injected sidecar uses this as its postStart hook, so the
    /// application starts after its proxy on clusters without native sidecars.
    #[arg(long, value_name = "ADDR")]
    pub await_ready: Option<String>,
    /// How long `--await-ready` waits.
    #[arg(long, default_value_t = 120)]
    pub await_timeout_seconds: u64,
    /// How often the topology and config files are checked for a change, which reloads
    /// them (0: only SIGHUP reloads).
    #[arg(long, default_value_t = 1000)]
    pub watch_interval_ms: u64,
    /// After a reload, how long a client connection that cannot move to its source's new
    /// chain (a transaction, a subscription...) may stay on the old one before it is closed.
    #[arg(long, default_value_t = 60)]
    pub reload_drain_seconds: u64,
    /// Upstream Shotover's hand-over of listening sockets to a new process. Not supported:
    /// this proxy reloads its files in place (see `--watch-interval-ms` and SIGHUP).
    #[arg(long, value_name = "PATH")]
    pub hotreload_socket: Option<String>,
    /// Upstream Shotover's drain time for `--hotreload-socket` (refused with it).
    #[arg(long, value_name = "SECONDS")]
    pub hotreload_gradual_shutdown_seconds: Option<u64>,
}

/// `--await-ready`: polls `GET /ready` on `addr` every 100 ms until it answers 200.
pub async fn await_ready(addr: &str, timeout: Duration) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream
                .write_all(
                    format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await?;
            std::io::Result::Ok(String::from_utf8_lossy(&head).into_owned())
        };
        let last = match tokio::time::timeout(Duration::from_secs(1), attempt).await {
            Ok(Ok(head)) if head.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(Ok(head)) => format!("answered `{}`", head.trim()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 1 s".to_owned(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!(
                "the proxy at {addr} was not ready within {} s (last attempt: {last})",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads both files, validates everything, binds every listener, then serves until
/// SIGTERM or SIGINT and drains. Errors here are fatal and name what failed.
pub async fn run(opts: Opts) -> Result<()> {
    if let Some(addr) = &opts.await_ready {
        return await_ready(addr, Duration::from_secs(opts.await_timeout_seconds)).await;
    }
    if opts.hotreload_socket.is_some() || opts.hotreload_gradual_shutdown_seconds.is_some() {
        return Err(anyhow!(
            "--hotreload-socket and --hotreload-gradual-shutdown-seconds are upstream Shotover's hand-over of listening sockets to a new process, which this proxy does not do: it reloads its topology and config files in place, without dropping connections, when they change (checked every --watch-interval-ms) or on SIGHUP; remove the flags"
        ));
    }
    let files = reload::Files::read(&opts.topology_file, &opts.config_file)?;
    let config = ProxyConfig::from_yaml(&files.config)
        .map_err(|e| anyhow!("{}: {e}", opts.config_file.display()))?;
    let topology = shotover_crds::load_topology(&files.topology)
        .map_err(|e| anyhow!("{}: {e}", opts.topology_file.display()))?;
    let level = opts.log_level.as_deref().unwrap_or(&config.main_log_level);
    let filter = telemetry::init(level, opts.log_format)?;
    let budget = budget::configure(config.max_buffered_reply_bytes);
    let requests = budget::requests::configure(config.max_buffered_request_bytes);
    tracing::debug!(
        max_buffered_reply_bytes = budget,
        max_buffered_request_bytes = requests,
        "process-wide budgets for buffered replies and requests"
    );

    // Build every chain and TLS acceptor before binding any source, so that a bad TLS file
    // fails the start cleanly. (A Tee's switch API port is bound while its chain is built.)
    let mut prepared = Vec::new();
    for source in &topology.sources {
        let context = || format!("source `{}`", source.name());
        let chain = transforms::build_chain(source.name(), source.chain()).with_context(context)?;
        let tls = Source::tls_acceptor(source.listener()).with_context(context)?;
        prepared.push((source, SourceSettings::new(source, Arc::new(chain), tls)));
    }

    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let observability = match &config.observability_interface {
        Some(addr) => Some(observability::bind(addr).await?),
        None => None,
    };
    // The observability listener outlives the drain, so probes and scrapes still answer
    // (`/ready` with 503) while in-flight requests finish.
    let observability_stop = CancellationToken::new();
    let observability_task = observability.map(|listener| {
        tokio::spawn(observability::serve(
            listener,
            filter.clone(),
            ready.clone(),
            observability_stop.clone(),
        ))
    });

    let drain = Duration::from_secs(opts.reload_drain_seconds);
    let mut sources = Vec::new();
    for (source, settings) in prepared {
        let (bound, tx, limit) = Source::bind(source, settings, drain)
            .await
            .with_context(|| format!("source `{}`", source.name()))?;
        tracing::info!(source = %source.name(), protocol = %source.protocol(), addr = %bound.local_addr()?, "listening");
        sources.push(reload::Started {
            config: source.clone(),
            source: bound,
            settings: tx,
            limit,
        });
    }
    let tracker = TaskTracker::new();
    let mut reloader = reload::Reloader::new(
        opts.topology_file.clone(),
        opts.config_file.clone(),
        opts.log_level.is_some(),
        filter,
        config.observability_interface.clone(),
        drain,
        shutdown.clone(),
        tracker.clone(),
        files,
    );
    reloader.start(sources);
    let interval =
        (opts.watch_interval_ms > 0).then(|| Duration::from_millis(opts.watch_interval_ms));
    let reloader = tokio::spawn(reloader.run(interval));
    let mut signals = Signals::new()?;
    ready.store(true, Ordering::Relaxed);
    tracing::info!("shotover is ready");

    signals.next().await;
    ready.store(false, Ordering::Relaxed);
    if opts.shutdown_delay_seconds > 0 {
        tracing::info!(
            delay_seconds = opts.shutdown_delay_seconds,
            "shutting down: /ready fails, still serving until the endpoints are gone"
        );
        let delay = tokio::time::sleep(Duration::from_secs(opts.shutdown_delay_seconds));
        tokio::select! {
            _ = delay => {}
            _ = signals.next() => tracing::info!("second signal: ending the shutdown delay"),
        }
    }
    tracing::info!(
        grace_seconds = opts.shutdown_grace_seconds,
        "shutting down: no new connections, finishing in-flight requests"
    );
    shutdown.cancel();
    match reloader.await {
        Ok(Err(e)) => tracing::error!(error = %e, "the reloader failed"),
        Err(e) => tracing::error!(error = %e, "the reloader panicked"),
        Ok(Ok(())) => {}
    }
    tracker.close();
    let grace = Duration::from_secs(opts.shutdown_grace_seconds);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = tracker.len(),
            "grace period expired with connections still busy; exiting anyway"
        );
    }
    observability_stop.cancel();
    if let Some(task) = observability_task {
        let _ = task.await;
    }
    tracing::info!("shotover stopped");
    Ok(())
}

/// SIGTERM and SIGINT, installed once, so that a second signal is seen too.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
