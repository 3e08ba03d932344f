//! A source: the listener of one `sources:` entry, its connection limit, TLS, and the task
//! per client connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use shotover_crds::topology::{
    DEFAULT_CONNECTION_LIMIT, DEFAULT_CQL_MAX_FRAME_SIZE_BYTES, DEFAULT_MAX_FRAME_SIZE_BYTES,
};
use shotover_crds::{ListenerConfig, Protocol, SourceConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::chain::{TransformChainBuilder, TransformContext};
use crate::connection::{self, ConnectionSettings, Ended};
use crate::metrics::{self, Counter, Gauge};
use crate::reload::follow::Follow;

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a source gives the connections it accepts. A reload replaces it as a whole (see
/// [`crate::reload`]): new connections get the new settings, and connections already open
/// move to the new chain when they can.
pub struct SourceSettings {
    pub name: Arc<str>,
    pub protocol: Protocol,
    /// `None` once a reload removed the source: its connections close.
    pub chain: Option<Arc<TransformChainBuilder>>,
    tls: Option<TlsAcceptor>,
    hard_limit: bool,
    idle_timeout: Option<Duration>,
    max_frame: usize,
    metrics: SourceMetrics,
}

impl SourceSettings {
    pub fn new(
        source: &SourceConfig,
        chain: Arc<TransformChainBuilder>,
        tls: Option<TlsAcceptor>,
    ) -> SourceSettings {
        let config = source.listener();
        let default_max_frame = match source.protocol() {
            Protocol::Redis => DEFAULT_MAX_FRAME_SIZE_BYTES,
            Protocol::Cassandra => DEFAULT_CQL_MAX_FRAME_SIZE_BYTES,
        };
        SourceSettings {
            name: config.name.as_str().into(),
            protocol: source.protocol(),
            chain: Some(chain),
            tls,
            hard_limit: config.hard_connection_limit.unwrap_or(false),
            idle_timeout: config.timeout.map(Duration::from_secs),
            max_frame: config.max_frame_size_bytes.unwrap_or(default_max_frame),
            metrics: SourceMetrics::new(&config.name),
        }
    }

    /// The same settings for a source a reload removed: no chain to move to.
    pub fn removed(&self) -> SourceSettings {
        SourceSettings {
            name: self.name.clone(),
            protocol: self.protocol,
            chain: None,
            tls: self.tls.clone(),
            hard_limit: self.hard_limit,
            idle_timeout: self.idle_timeout,
            max_frame: self.max_frame,
            metrics: self.metrics.clone(),
        }
    }

    /// The connections a source can still take before its connection_limit.
    pub fn available(&self) -> &Gauge {
        &self.metrics.available
    }

    /// How the source's connections followed reloads.
    pub fn metrics(&self) -> &ReloadMetrics {
        &self.metrics.reload
    }
}

/// The connection limit of a source from its config.
pub fn connection_limit(source: &SourceConfig) -> usize {
    source
        .listener()
        .connection_limit
        .unwrap_or(DEFAULT_CONNECTION_LIMIT)
}

/// A bound source, ready to accept.
pub struct Source {
    listener: TcpListener,
    limit: Arc<Semaphore>,
    settings: watch::Receiver<Arc<SourceSettings>>,
    /// How long a connection that cannot move to a reloaded chain may stay on its old one.
    drain: Duration,
}

/// How the connections of a source followed reloads.
#[derive(Clone)]
pub struct ReloadMetrics {
    /// Connections moved to a reloaded chain.
    pub moved: Counter,
    /// Connections closed because they could not move before the drain deadline, or
    /// because a reload removed their source.
    pub retired: Counter,
    /// Connections still on a chain a reload replaced.
    pub draining: Gauge,
}

#[derive(Clone)]
struct SourceMetrics {
    reload: ReloadMetrics,
    available: Gauge,
    opened: Counter,
    refused: Counter,
    accept_failures: Counter,
    protocol_errors: Counter,
}

impl SourceMetrics {
    fn new(source: &str) -> Self {
        let labels = [("source", source)];
        SourceMetrics {
            reload: ReloadMetrics {
                moved: metrics::counter(
                    "shotover_connections_moved_count",
                    "Client connections moved to a reloaded chain at a request boundary.",
                    &labels,
                ),
                retired: metrics::counter(
                    "shotover_connections_retired_count",
                    "Client connections closed after a reload: they could not move to the new chain before the drain deadline, or their source was removed.",
                    &labels,
                ),
                draining: metrics::gauge(
                    "shotover_connections_draining_count",
                    "Client connections still on a chain that a reload replaced.",
                    &labels,
                ),
            },
            available: metrics::gauge(
                "shotover_available_connections_count",
                "Client connections each source can still take before its connection_limit.",
                &labels,
            ),
            opened: metrics::counter(
                "connections_opened",
                "Client connections each source accepted.",
                &labels,
            ),
            refused: metrics::counter(
                "shotover_connections_refused_count",
                "Client connections closed at once because of hard_connection_limit.",
                &labels,
            ),
            accept_failures: metrics::counter(
                "shotover_connections_accept_failures_count",
                "Failed accept() calls (the source retries with backoff).",
                &labels,
            ),
            protocol_errors: metrics::counter(
                "shotover_client_protocol_errors_count",
                "Client connections closed after a malformed or oversized frame.",
                &labels,
            ),
        }
    }
}

impl Source {
    /// The TLS acceptor of a source, if it serves TLS: built before anything is bound.
    pub fn tls_acceptor(config: &ListenerConfig) -> Result<Option<TlsAcceptor>> {
        config
            .tls
            .as_ref()
            .map(|tls| crate::tls::acceptor(tls).context("building the TLS acceptor"))
            .transpose()
    }

    /// Binds the listener. The returned sender replaces the settings on reload; the
    /// semaphore holds the connection limit (a reload adds or forgets permits).
    pub async fn bind(
        source: &SourceConfig,
        settings: SourceSettings,
        drain: Duration,
    ) -> Result<(Source, watch::Sender<Arc<SourceSettings>>, Arc<Semaphore>)> {
        let config = source.listener();
        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .with_context(|| format!("binding {}", config.listen_addr))?;
        let limit = connection_limit(source);
        settings.metrics.available.set(limit as i64);
        let limit = Arc::new(Semaphore::new(limit));
        let (tx, rx) = watch::channel(Arc::new(settings));
        Ok((
            Source {
                listener,
                limit: limit.clone(),
                settings: rx,
                drain,
            },
            tx,
            limit,
        ))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `stop` (a reload removed the source) or `shutdown`; each connection
    /// runs in a task tracked by `tracker`, and ends at `shutdown`.
    pub async fn run(
        self,
        stop: CancellationToken,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let current = self.settings.borrow().clone();
            // With a soft limit, wait for a free slot before accepting: new clients queue in
            // the listen backlog.
            let permit = if current.hard_limit {
                None
            } else {
                tokio::select! {
                    permit = self.limit.clone().acquire_owned() => permit.ok(),
                    _ = stop.cancelled() => return,
                }
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            // A reload while this loop waited: the connection gets the new settings.
            let current = self.settings.borrow().clone();
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_secs(1);
                    accepted
                }
                // A client that reset while queued is its own problem: accept the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    current.metrics.accept_failures.inc();
                    tracing::debug!(source = %current.name, error = %e, "accept failed for one client");
                    continue;
                }
                // Out of file descriptors or memory: back off so as not to spin.
                Err(e) => {
                    current.metrics.accept_failures.inc();
                    tracing::warn!(source = %current.name, error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(64));
                    continue;
                }
            };
            let permit = match permit {
                Some(p) => p,
                None => match self.limit.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        current.metrics.refused.inc();
                        tracing::debug!(source = %current.name, %peer, "connection refused: hard_connection_limit reached");
                        drop(stream);
                        continue;
                    }
                },
            };
            let Some(chain) = current.chain.clone() else {
                // Removed by a reload between the accept and here.
                return;
            };
            current.metrics.opened.inc();
            let _ = stream.set_nodelay(true);
            crate::upstream::set_keepalive(&stream);
            // Upstream Shotover's target, so `shotover::connection_span=debug` works here too.
            let span = tracing::debug_span!(target: "shotover::connection_span", "connection", source = %current.name, client = %peer);
            let name = current.name.clone();
            let parts = ConnectionParts {
                tracker: tracker.clone(),
                chain,
                settings: current,
                follow: self.settings.clone(),
                drain: self.drain,
            };
            let shutdown = shutdown.clone();
            match crate::runtime::next_worker() {
                None => {
                    tracker.spawn(
                        parts
                            .handle(stream, peer, permit, shutdown)
                            .instrument(span),
                    );
                }
                // `--thread-per-core`: the connection moves to its thread's reactor.
                Some(worker) => match stream.into_std() {
                    Ok(stream) => {
                        let moved = async move {
                            match TcpStream::from_std(stream) {
                                Ok(stream) => parts.handle(stream, peer, permit, shutdown).await,
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not hand the connection to its thread")
                                }
                            }
                        };
                        tracker.spawn_on(moved.instrument(span), worker);
                    }
                    Err(e) => {
                        tracing::warn!(source = %name, %peer, error = %e, "could not hand the connection to its thread")
                    }
                },
            }
        }
    }
}

/// What one connection task takes from its source.
struct ConnectionParts {
    tracker: TaskTracker,
    chain: Arc<TransformChainBuilder>,
    /// The source's settings when the connection was accepted.
    settings: Arc<SourceSettings>,
    /// The source's settings as reloads change them.
    follow: watch::Receiver<Arc<SourceSettings>>,
    drain: Duration,
}

impl ConnectionParts {
    async fn handle(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        // The gauge of the source as it is named now (a reload may rename it).
        self.follow.borrow().metrics.available.dec();
        let ended = match self.settings.tls.clone() {
            None => self.serve(stream, peer, &shutdown).await,
            Some(acceptor) => {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.serve(tls, peer, &shutdown).await,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        None
                    }
                }
            }
        };
        match ended {
            Some(Ended::ChainFailed(e)) => {
                tracing::warn!(error = %e, "closed the client connection: its chain failed (the client got an error reply for each pending request)")
            }
            Some(ended) => tracing::debug!(?ended, "connection ended"),
            None => {}
        }
        self.follow.borrow().metrics.available.inc();
        drop(permit);
    }

    async fn serve<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        shutdown: &CancellationToken,
    ) -> Option<Ended>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let force_run = Arc::new(Notify::new());
        let ctx = TransformContext {
            chain_name: self.chain.name().into(),
            client: peer.to_string().into(),
            force_run: force_run.clone(),
            tasks: self.tracker.clone(),
        };
        let chain = self.chain.build(&ctx);
        let follow = Follow::new(self.follow.clone(), self.chain.clone(), ctx, self.drain);
        let settings = ConnectionSettings {
            protocol: self.settings.protocol,
            max_frame: self.settings.max_frame,
            idle_timeout: self.settings.idle_timeout,
            shutdown: shutdown.clone(),
            force_run,
            protocol_errors: self.settings.metrics.protocol_errors.clone(),
        };
        Some(connection::serve(stream, chain, &settings, Some(follow)).await)
    }
}
