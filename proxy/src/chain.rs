//! Transform chains: the trait every transform implements, and the per-connection chain that
//! runs a batch of requests through them.
//!
//! # The contract of a transform
//!
//! A chain is built once per client connection, so a transform's fields are that
//! connection's state; anything shared between connections is set up by its builder. The
//! connection handler calls [`TransformChain::process`] with a batch: every complete request
//! read so far (possibly none, when a transform or sink asked to run the chain through the
//! connection's `force_run` notifier). Each transform receives the batch in
//! [`ChainState::requests`], may inspect, change, drop or add requests, and calls
//! [`ChainState::call_next`] at most once to pass the batch on. A sink ends the chain: it
//! answers the requests itself.
//!
//! Invariants every transform keeps:
//! - every request gets exactly one response, carrying the request's id in
//!   `Message::request_id`. It need not come back in the same call (Coalesce holds requests
//!   back), but it must come eventually, or the connection must fail;
//! - a transform that drops a request answers it itself (QueryTypeFilter answers with an
//!   error); a transform that injects a request removes that request's response;
//! - frames nobody asked for (pub/sub messages, RESP3 pushes) are responses with
//!   `request_id: None`, and are passed back in the order they arrived;
//! - the handler writes responses in request order for in-order protocols (Redis), holding
//!   back any response that overtakes an earlier one, so transforms may return them in any
//!   order;
//! - a sink whose upstream answers arrive on their own (CQL) waits for them in
//!   [`Transform::ready`], which the handler awaits whenever it waits for the client; when it
//!   resolves, the handler runs the chain with an empty batch and the sink hands over what
//!   arrived. `ready` must be cancel-safe: the handler drops it whenever the client speaks;
//! - a sink may answer part of a batch now and the rest in later runs when
//!   [`ChainState::partial`] allows it, to bound the replies held in memory: it sets
//!   [`ChainState::more`], and the handler writes what it got, sends no new requests, and
//!   runs the chain with empty batches until `more` is no longer set. A transform that
//!   needs every answer of a batch in one run (a Tee comparing two chains) clears `partial`
//!   before calling the next;
//! - an `Err` means the connection's upstream state is broken: every request still pending
//!   gets an error reply and the client connection is closed. A transform that can answer
//!   with a protocol error and go on (an unreachable upstream, a filtered request) returns
//!   error replies instead.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::message::Messages;
use crate::metrics::{self, Counter, Histogram};

/// Why a chain could not answer a batch. The client receives `-ERR shotover: <this>` for
/// every pending request, then its connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("upstream {addr} closed the connection")]
    UpstreamClosed { addr: String },
    #[error("upstream {addr} failed: {source}")]
    UpstreamIo {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {addr} sent a malformed response: {reason}")]
    UpstreamProtocol { addr: String, reason: String },
    #[error("DebugReturner `{name}` is set to Fail")]
    DebugFail { name: String },
    #[error("the chain ended without a sink")]
    NoSink,
}

/// What a transform learns about the connection it serves, when it is built.
#[derive(Clone, Debug)]
pub struct TransformContext {
    /// Name of the chain the transform belongs to.
    pub chain_name: Arc<str>,
    /// The client's address, for logs.
    pub client: Arc<str>,
    /// Notify this to have the handler run the chain with an empty batch, for example when
    /// responses arrive that no request is waiting for, or a flush timer fires.
    pub force_run: Arc<Notify>,
    /// Spawn background work that must finish before the process exits (a Tee's queued
    /// writes) here: shutdown waits for it, within the grace period.
    pub tasks: TaskTracker,
}

#[async_trait]
pub trait Transform: Send {
    /// Handles one batch. See the module documentation for the contract.
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError>;

    /// Resolves when this transform has something to deliver without a new request (an
    /// upstream answer arrived, or its upstream failed); the handler then runs the chain with
    /// an empty batch. Only the sink's is awaited. Must be cancel-safe. Default: never.
    async fn ready(&mut self) {
        std::future::pending::<()>().await
    }
}

/// Builds the per-connection instances of one configured transform.
pub trait TransformBuilder: Send + Sync {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform>;
}

/// The batch being processed and the rest of the chain.
pub struct ChainState<'a> {
    /// The requests of this batch, as changed by the transforms so far.
    pub requests: Messages,
    /// Set when the client is going away or the proxy is shutting down: a transform that
    /// holds requests back must send them on now.
    pub flush: bool,
    /// A transform sets this to have the client connection closed after this batch's
    /// responses are written.
    pub close_client: bool,
    /// The caller takes part of the answers now and the rest in later runs (see the module
    /// documentation). When `false`, a sink answers the whole batch in this run.
    pub partial: bool,
    /// Set by a sink that holds answers back for later runs (only when `partial`).
    pub more: bool,
    rest: &'a mut [Link],
}

impl ChainState<'static> {
    /// A state with no chain after it, for a transform that runs sinks of its own (the
    /// cluster sink runs one sink per node).
    pub(crate) fn detached(requests: Messages, partial: bool) -> Self {
        ChainState {
            requests,
            flush: false,
            close_client: false,
            partial,
            more: false,
            rest: &mut [],
        }
    }
}

impl ChainState<'_> {
    /// Passes `self.requests` to the next transform and returns its responses. Call it at
    /// most once per `transform` call.
    pub async fn call_next(&mut self) -> Result<Messages, ChainError> {
        let rest = std::mem::take(&mut self.rest);
        let Some((link, tail)) = rest.split_first_mut() else {
            return Err(ChainError::NoSink);
        };
        self.rest = tail;
        let start = Instant::now();
        let result = link.transform.transform(self).await;
        link.metrics.total.inc();
        link.metrics.latency.observe_duration(start.elapsed());
        if result.is_err() {
            link.metrics.failures.inc();
        }
        result
    }
}

#[derive(Clone)]
struct TransformMetrics {
    total: Counter,
    failures: Counter,
    latency: Histogram,
}

impl TransformMetrics {
    fn new(name: &str) -> Self {
        let labels = [("transform", name)];
        TransformMetrics {
            total: metrics::counter(
                "shotover_transform_total_count",
                "Batches each transform handled.",
                &labels,
            ),
            failures: metrics::counter(
                "shotover_transform_failures_count",
                "Batches each transform failed.",
                &labels,
            ),
            latency: metrics::latency(
                "shotover_transform_latency_seconds",
                "Time each transform took per batch, including the transforms after it.",
                &labels,
            ),
        }
    }
}

#[derive(Clone)]
struct ChainMetrics {
    total: Counter,
    failures: Counter,
    latency: Histogram,
    requests_batch: Histogram,
    responses_batch: Histogram,
}

impl ChainMetrics {
    fn new(chain: &str) -> Self {
        let labels = [("chain", chain)];
        ChainMetrics {
            total: metrics::counter(
                "shotover_chain_total_count",
                "Batches each chain ran.",
                &labels,
            ),
            failures: metrics::counter(
                "shotover_chain_failures_count",
                "Batches each chain failed (the client connection was closed).",
                &labels,
            ),
            latency: metrics::latency(
                "shotover_chain_latency_seconds",
                "Time each chain took per batch.",
                &labels,
            ),
            requests_batch: metrics::batch_size(
                "shotover_chain_requests_batch_size",
                "Requests per batch entering each chain.",
                &labels,
            ),
            responses_batch: metrics::batch_size(
                "shotover_chain_responses_batch_size",
                "Responses per batch leaving each chain.",
                &labels,
            ),
        }
    }
}

struct Link {
    transform: Box<dyn Transform>,
    metrics: TransformMetrics,
}

/// One connection's instance of a chain.
pub struct TransformChain {
    name: Arc<str>,
    links: Vec<Link>,
    metrics: ChainMetrics,
}

/// What running a batch produced.
pub struct Processed {
    pub responses: Messages,
    /// A transform asked for the client connection to be closed.
    pub close_client: bool,
    /// The sink holds answers for requests already sent: run the chain with empty batches,
    /// and send it no new requests, until this is `false`.
    pub more: bool,
}

impl TransformChain {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Resolves when the sink has something to deliver without a new request; see
    /// [`Transform::ready`].
    pub async fn ready(&mut self) {
        match self.links.last_mut() {
            Some(sink) => sink.transform.ready().await,
            None => std::future::pending().await,
        }
    }

    /// Runs one batch through the chain. With `partial`, the sink may answer part of it now
    /// and the rest in later runs (see [`Processed::more`]).
    pub async fn process(
        &mut self,
        requests: Messages,
        flush: bool,
        partial: bool,
    ) -> Result<Processed, ChainError> {
        let start = Instant::now();
        self.metrics.total.inc();
        if !requests.is_empty() {
            self.metrics.requests_batch.observe(requests.len() as u64);
        }
        let mut state = ChainState {
            requests,
            flush,
            close_client: false,
            partial,
            more: false,
            rest: &mut self.links,
        };
        let result = state.call_next().await;
        let close_client = state.close_client;
        let more = state.more && partial;
        self.metrics.latency.observe_duration(start.elapsed());
        match result {
            Ok(responses) => {
                if !responses.is_empty() {
                    self.metrics.responses_batch.observe(responses.len() as u64);
                }
                Ok(Processed {
                    responses,
                    close_client,
                    more,
                })
            }
            Err(e) => {
                self.metrics.failures.inc();
                Err(e)
            }
        }
    }
}

/// A chain as configured: builds a [`TransformChain`] for each connection.
pub struct TransformChainBuilder {
    name: Arc<str>,
    builders: Vec<(Box<dyn TransformBuilder>, TransformMetrics)>,
    metrics: ChainMetrics,
}

impl TransformChainBuilder {
    pub fn new(name: &str, builders: Vec<(String, Box<dyn TransformBuilder>)>) -> Self {
        TransformChainBuilder {
            name: name.into(),
            metrics: ChainMetrics::new(name),
            builders: builders
                .into_iter()
                .map(|(transform_name, b)| (b, TransformMetrics::new(&transform_name)))
                .collect(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh chain for one connection. `ctx.chain_name` is replaced by this chain's name.
    pub fn build(&self, ctx: &TransformContext) -> TransformChain {
        let ctx = TransformContext {
            chain_name: self.name.clone(),
            ..ctx.clone()
        };
        TransformChain {
            name: self.name.clone(),
            links: self
                .builders
                .iter()
                .map(|(b, metrics)| Link {
                    transform: b.build(&ctx),
                    metrics: metrics.clone(),
                })
                .collect(),
            metrics: self.metrics.clone(),
        }
    }
}
