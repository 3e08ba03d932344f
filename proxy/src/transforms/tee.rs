//! `Tee`: sends every batch down a second chain too (dual write), and optionally compares
//! the two chains' answers.
//!
//! The tee chain runs in its own task per client connection, fed through a bounded queue
//! of `buffer_size` batches. With `behavior: Ignore` a batch that does not fit is not sent
//! to the tee chain and is counted in `shotover_tee_dropped_messages_count`; the client is
//! never slowed down by the tee chain. The comparing behaviors wait for both chains (the
//! tee chain for at most `timeout_micros`).
//!
//! With `switch_port`, an HTTP API switches which chain answers the client:
//! `GET /transform/tee/result-source` says `regular-chain` or `tee-chain`, and `PUT` with one
//! of those as the body switches it for every connection at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use shotover_crds::transform::{TeeBehavior, TeeConfig};
use tokio::sync::{Notify, mpsc, oneshot};

use super::build_chain;
use crate::chain::{
    ChainError, ChainState, Transform, TransformBuilder, TransformChainBuilder, TransformContext,
};
use crate::message::{Message, Messages};
use crate::metrics::{self, Counter};

pub const MISMATCH_REPLY: &str = "ERR The responses from the Tee subchain and down-chain did not match and behavior is set to fail on mismatch";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Behavior {
    Ignore,
    FailOnMismatch,
    LogWarningOnMismatch,
    SubchainOnMismatch,
}

pub struct TeeBuilder {
    name: Arc<str>,
    tee_chain: Arc<TransformChainBuilder>,
    mismatch_chain: Option<Arc<TransformChainBuilder>>,
    behavior: Behavior,
    buffer_size: usize,
    timeout: Option<Duration>,
    dropped: Counter,
    /// `true` when the tee chain answers the client.
    tee_answers: Arc<AtomicBool>,
}

impl TeeBuilder {
    pub fn new(config: &TeeConfig, chain: &str) -> Result<Self> {
        let name: Arc<str> = config.name.as_deref().unwrap_or("Tee").into();
        let tee_chain = Arc::new(build_chain(&format!("{name}.chain"), &config.chain)?);
        let (behavior, mismatch_chain) = match &config.behavior {
            TeeBehavior::Ignore => (Behavior::Ignore, None),
            TeeBehavior::FailOnMismatch => (Behavior::FailOnMismatch, None),
            TeeBehavior::LogWarningOnMismatch => (Behavior::LogWarningOnMismatch, None),
            TeeBehavior::SubchainOnMismatch(sub) => {
                let sub_name = sub
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{name}.mismatch"));
                let built = build_chain(&sub_name, &sub.chain)?;
                (Behavior::SubchainOnMismatch, Some(Arc::new(built)))
            }
        };
        let tee_answers = match config.switch_port {
            Some(port) => serve_switch(port)?,
            None => Arc::new(AtomicBool::new(false)),
        };
        Ok(TeeBuilder {
            dropped: metrics::counter(
                "shotover_tee_dropped_messages_count",
                "Requests a Tee did not send to its chain because its buffer was full.",
                &[("chain", chain), ("transform", &name)],
            ),
            name,
            tee_chain,
            mismatch_chain,
            behavior,
            buffer_size: config
                .buffer_size
                .unwrap_or(shotover_crds::transform::DEFAULT_TEE_BUFFER_SIZE),
            timeout: config.timeout_micros.map(Duration::from_micros),
            tee_answers,
        })
    }
}

impl TransformBuilder for TeeBuilder {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform> {
        Box::new(Tee {
            name: self.name.clone(),
            behavior: self.behavior,
            timeout: self.timeout,
            dropped: self.dropped.clone(),
            tee_answers: self.tee_answers.clone(),
            tee_chain: BufferedChain::spawn(&self.tee_chain, ctx, self.buffer_size),
            mismatch_chain: self
                .mismatch_chain
                .as_ref()
                .map(|b| BufferedChain::spawn(b, ctx, self.buffer_size)),
        })
    }
}

type Job = (
    Messages,
    Option<oneshot::Sender<Result<Messages, ChainError>>>,
);

/// A chain running in its own task, fed through a bounded queue.
struct BufferedChain {
    jobs: mpsc::Sender<Job>,
}

impl BufferedChain {
    fn spawn(builder: &TransformChainBuilder, ctx: &TransformContext, buffer: usize) -> Self {
        let force_run = Arc::new(Notify::new());
        let ctx = TransformContext {
            force_run: force_run.clone(),
            ..ctx.clone()
        };
        let mut chain = builder.build(&ctx);
        let (jobs, mut rx) = mpsc::channel::<Job>(buffer);
        // Tracked, so that on shutdown the writes already queued for the tee chain are sent.
        ctx.tasks.spawn(async move {
            let mut failed = false;
            loop {
                let (requests, reply) = tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => job,
                        None => break,
                    },
                    // Frames nobody asked for, and answers that arrive on their own, are read
                    // and dropped.
                    _ = force_run.notified(), if !failed => (Vec::new(), None),
                    _ = chain.ready(), if !failed => (Vec::new(), None),
                };
                let result = if failed {
                    Err(ChainError::UpstreamClosed {
                        addr: "(tee chain failed earlier)".into(),
                    })
                } else {
                    // Answers nobody compares are taken a part at a time, like a client's:
                    // the replies held for the tee chain stay bounded.
                    let partial = reply.is_none();
                    let mut processed = chain.process(requests, false, partial).await;
                    while let Ok(p) = &processed
                        && p.more
                        && !p.close_client
                    {
                        processed = chain.process(Vec::new(), false, partial).await;
                    }
                    match processed {
                        // The tee chain's own client connection would be closed now: it
                        // stops here, and the regular chain goes on.
                        Ok(p) if p.close_client => {
                            failed = true;
                            tracing::warn!(chain = chain.name(), "tee chain closed; its requests are no longer sent");
                            Ok(p.responses)
                        }
                        other => other.map(|p| p.responses),
                    }
                };
                if let Err(e) = &result
                    && !failed
                {
                    tracing::warn!(chain = chain.name(), error = %e, "tee chain failed; its requests are no longer sent");
                    failed = true;
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            // The client went away: let held requests go.
            let _ = chain.process(Vec::new(), true, false).await;
        });
        BufferedChain { jobs }
    }

    /// Queues a batch without waiting; `false` if the queue is full.
    fn try_send(&self, requests: Messages) -> bool {
        self.jobs.try_send((requests, None)).is_ok()
    }

    /// Queues a batch and returns where its responses will arrive.
    async fn send(&self, requests: Messages) -> oneshot::Receiver<Result<Messages, ChainError>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.jobs.send((requests, Some(tx))).await;
        rx
    }
}

struct Tee {
    name: Arc<str>,
    behavior: Behavior,
    timeout: Option<Duration>,
    dropped: Counter,
    tee_answers: Arc<AtomicBool>,
    tee_chain: BufferedChain,
    mismatch_chain: Option<BufferedChain>,
}

impl Tee {
    /// Runs `fut` until `deadline`, if there is one; `None` when the deadline passed first.
    async fn within<F: std::future::Future>(
        deadline: Option<tokio::time::Instant>,
        fut: F,
    ) -> Option<F::Output> {
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, fut).await.ok(),
            None => Some(fut.await),
        }
    }
}

#[async_trait]
impl Transform for Tee {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        let tee_answers = self.tee_answers.load(Ordering::Relaxed);
        if state.requests.is_empty() {
            return state.call_next().await;
        }
        if self.behavior == Behavior::Ignore && !tee_answers {
            let count = state.requests.len() as u64;
            if !self.tee_chain.try_send(state.requests.clone()) {
                self.dropped.add(count);
            }
            return state.call_next().await;
        }
        let ids: Vec<u64> = state.requests.iter().map(|r| r.id).collect();
        // Kept only for the mismatch chain.
        let copy = (self.behavior == Behavior::SubchainOnMismatch).then(|| state.requests.clone());
        // One deadline covers queuing the batch and waiting for the answers: a stuck tee
        // chain must not block the client once its queue is full.
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let batch = state.requests.clone();
        let queued = Tee::within(deadline, self.tee_chain.send(batch)).await;
        // Both chains' answers are compared: the regular chain answers the whole batch now.
        state.partial = false;
        let main = state.call_next().await?;
        let tee = match queued {
            Some(rx) => Tee::within(deadline, rx)
                .await
                .and_then(|r| r.ok())
                .and_then(|r| r.ok()),
            None => None,
        };
        if tee_answers {
            return Ok(match tee {
                Some(responses) => responses,
                None => ids
                    .iter()
                    .map(|id| {
                        Message::error_reply(*id, "ERR shotover: the tee chain did not answer")
                    })
                    .collect(),
            });
        }
        if self.behavior == Behavior::Ignore {
            return Ok(main);
        }
        let matched = tee.as_ref().is_some_and(|tee| same_answers(&main, tee));
        if matched {
            return Ok(main);
        }
        match self.behavior {
            Behavior::FailOnMismatch => Ok(ids
                .iter()
                .map(|id| Message::error_reply(*id, MISMATCH_REPLY))
                .collect()),
            Behavior::LogWarningOnMismatch => {
                tracing::warn!(transform = %self.name, requests = ids.len(), "the tee chain's responses differ from the regular chain's");
                Ok(main)
            }
            Behavior::SubchainOnMismatch => {
                if let (Some(chain), Some(copy)) = (&self.mismatch_chain, copy)
                    && !chain.try_send(copy)
                {
                    self.dropped.add(ids.len() as u64);
                }
                Ok(main)
            }
            Behavior::Ignore => Ok(main),
        }
    }
}

/// Whether both chains answered every request with the same bytes.
fn same_answers(main: &Messages, tee: &Messages) -> bool {
    let answered = |ms: &Messages| ms.iter().filter(|m| m.request_id.is_some()).count();
    if answered(main) != answered(tee) {
        return false;
    }
    main.iter().filter(|m| m.request_id.is_some()).all(|m| {
        tee.iter()
            .find(|t| t.request_id == m.request_id)
            .is_some_and(|t| t.raw_bytes().is_some() && t.raw_bytes() == m.raw_bytes())
    })
}

/// The switch API of each port already serving, and its switch: a reload that builds a
/// Tee's chain again while the old one still serves shares the port and the switch (its
/// position survives the reload).
static SWITCHES: LazyLock<Mutex<HashMap<u16, Arc<AtomicBool>>>> = LazyLock::new(Mutex::default);

fn serve_switch(port: u16) -> Result<Arc<AtomicBool>> {
    let mut switches = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = switches.get(&port) {
        return Ok(existing.clone());
    }
    // Localhost only, as upstream: the switch changes what clients get, so only the Pod
    // itself (kubectl exec, kubectl port-forward) may flip it.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("binding the Tee switch API on port {port}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let tee_answers = Arc::new(AtomicBool::new(false));
    switches.insert(port, tee_answers.clone());
    drop(switches);
    let app = Router::new()
        .route(
            "/transform/tee/result-source",
            get(read_source).put(write_source),
        )
        .with_state(tee_answers.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the Tee switch API stopped");
        }
    });
    Ok(tee_answers)
}

async fn read_source(State(tee_answers): State<Arc<AtomicBool>>) -> &'static str {
    if tee_answers.load(Ordering::Relaxed) {
        "tee-chain"
    } else {
        "regular-chain"
    }
}

async fn write_source(
    State(tee_answers): State<Arc<AtomicBool>>,
    body: String,
) -> (StatusCode, String) {
    match body.trim() {
        "tee-chain" => {
            tee_answers.store(true, Ordering::Relaxed);
            (StatusCode::OK, "tee-chain".into())
        }
        "regular-chain" => {
            tee_answers.store(false, Ordering::Relaxed);
            (StatusCode::OK, "regular-chain".into())
        }
        other => (
            StatusCode::BAD_REQUEST,
            format!("expected `regular-chain` or `tee-chain`, got `{other}`"),
        ),
    }
}
