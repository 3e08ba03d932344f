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
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::chain::{TransformChainBuilder, TransformContext};
use crate::connection::{self, ConnectionSettings, Ended};
use crate::metrics::{self, Counter, Gauge};

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound source, ready to accept.
pub struct Source {
    name: Arc<str>,
    protocol: Protocol,
    listener: TcpListener,
    chain: Arc<TransformChainBuilder>,
    tls: Option<TlsAcceptor>,
    limit: Arc<Semaphore>,
    hard_limit: bool,
    idle_timeout: Option<Duration>,
    max_frame: usize,
    metrics: SourceMetrics,
}

#[derive(Clone)]
struct SourceMetrics {
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

    /// Binds the listener.
    pub async fn bind(
        source: &SourceConfig,
        chain: TransformChainBuilder,
        tls: Option<TlsAcceptor>,
    ) -> Result<Source> {
        let config = source.listener();
        let default_max_frame = match source.protocol() {
            Protocol::Redis => DEFAULT_MAX_FRAME_SIZE_BYTES,
            Protocol::Cassandra => DEFAULT_CQL_MAX_FRAME_SIZE_BYTES,
        };
        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .with_context(|| format!("binding {}", config.listen_addr))?;
        let limit = config.connection_limit.unwrap_or(DEFAULT_CONNECTION_LIMIT);
        let metrics = SourceMetrics::new(&config.name);
        metrics.available.set(limit as i64);
        Ok(Source {
            name: config.name.as_str().into(),
            protocol: source.protocol(),
            listener,
            chain: Arc::new(chain),
            tls,
            limit: Arc::new(Semaphore::new(limit)),
            hard_limit: config.hard_connection_limit.unwrap_or(false),
            idle_timeout: config.timeout.map(Duration::from_secs),
            max_frame: config.max_frame_size_bytes.unwrap_or(default_max_frame),
            metrics,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown`; each connection runs in a task tracked by `tracker`.
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let mut backoff = Duration::from_secs(1);
        loop {
            // With a soft limit, wait for a free slot before accepting: new clients queue in
            // the listen backlog.
            let permit = if self.hard_limit {
                None
            } else {
                tokio::select! {
                    permit = self.limit.clone().acquire_owned() => permit.ok(),
                    _ = shutdown.cancelled() => return,
                }
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
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
                    self.metrics.accept_failures.inc();
                    tracing::debug!(source = %self.name, error = %e, "accept failed for one client");
                    continue;
                }
                // Out of file descriptors or memory: back off so as not to spin.
                Err(e) => {
                    self.metrics.accept_failures.inc();
                    tracing::warn!(source = %self.name, error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
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
                        self.metrics.refused.inc();
                        tracing::debug!(source = %self.name, %peer, "connection refused: hard_connection_limit reached");
                        drop(stream);
                        continue;
                    }
                },
            };
            self.metrics.opened.inc();
            let _ = stream.set_nodelay(true);
            crate::upstream::set_keepalive(&stream);
            // Upstream Shotover's target, so `shotover::connection_span=debug` works here too.
            let span = tracing::debug_span!(target: "shotover::connection_span", "connection", source = %self.name, client = %peer);
            tracker.spawn(
                self.clone_parts(&tracker)
                    .handle(stream, peer, permit, shutdown.clone())
                    .instrument(span),
            );
        }
    }

    fn clone_parts(&self, tracker: &TaskTracker) -> ConnectionParts {
        ConnectionParts {
            protocol: self.protocol,
            tracker: tracker.clone(),
            chain: self.chain.clone(),
            tls: self.tls.clone(),
            idle_timeout: self.idle_timeout,
            max_frame: self.max_frame,
            metrics: self.metrics.clone(),
        }
    }
}

/// What one connection task takes from its source.
struct ConnectionParts {
    protocol: Protocol,
    tracker: TaskTracker,
    chain: Arc<TransformChainBuilder>,
    tls: Option<TlsAcceptor>,
    idle_timeout: Option<Duration>,
    max_frame: usize,
    metrics: SourceMetrics,
}

impl ConnectionParts {
    async fn handle(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        self.metrics.available.dec();
        let ended = match self.tls.clone() {
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
        self.metrics.available.inc();
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
        let settings = ConnectionSettings {
            protocol: self.protocol,
            max_frame: self.max_frame,
            idle_timeout: self.idle_timeout,
            shutdown: shutdown.clone(),
            force_run,
            protocol_errors: self.metrics.protocol_errors.clone(),
        };
        Some(connection::serve(stream, chain, &settings).await)
    }
}
