//! `CassandraSinkSingle`: one upstream connection to a Cassandra node per client connection,
//! opened on the first request.
//!
//! The proxy is transparent to the CQL session: the client's own STARTUP, AUTH_RESPONSE,
//! `USE`, REGISTER and compression go to the node on the client's connection, frames are
//! forwarded as read (stream ids untouched, bodies never parsed here), and the node's answers
//! go back as they arrive, matched to their requests by stream id. A reader task owns the
//! socket's read half and wakes the chain for every frame, so a slow query does not hold up
//! the others on the connection, and events (stream -1) reach a client that sends nothing.
//!
//! An unreachable node gives each request a CQL Server error and the client connection stays
//! open (nothing was sent, so the next request tries again; drivers try another node). When
//! the connection breaks after use, or `read_timeout` passes with requests waiting and
//! nothing arriving, every request in flight gets a Server error and the client connection is
//! closed: a new upstream connection would not carry the client's handshake, login or
//! keyspace, and drivers reconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use shotover_crds::transform::CassandraSinkSingleConfig;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::cassandra::{Compression, EnvelopeDecoder, Header};
use crate::message::{ErrorKind, Message, MessageId, Messages, ReplyTo};
use crate::metrics::{self, Counter};
use crate::outbox::Outbox;
use crate::upstream::{Upstream, UpstreamStream};

/// Largest frame accepted from the node (Cassandra's own limit is 256 MiB at most).
const MAX_RESPONSE: usize = 512 * 1024 * 1024;
/// Frames the reader task may queue ahead of the chain.
const FRAME_QUEUE: usize = 1024;

pub struct CassandraSinkSingleBuilder {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Upstream,
    read_timeout: Option<Duration>,
    failed_requests: Counter,
}

impl CassandraSinkSingleBuilder {
    pub fn new(config: &CassandraSinkSingleConfig, chain: &str) -> Result<Self> {
        let name = config.name.as_deref().unwrap_or("CassandraSinkSingle");
        Ok(CassandraSinkSingleBuilder {
            shared: Arc::new(Shared {
                upstream: Upstream::new(
                    &config.remote_address,
                    config.connect_timeout_ms,
                    config.tls.as_ref(),
                )?,
                read_timeout: config.read_timeout.map(Duration::from_secs),
                failed_requests: metrics::counter(
                    "shotover_failed_requests_count",
                    "Requests a sink answered with an error because its upstream could not be reached.",
                    &[("chain", chain), ("transform", name)],
                ),
            }),
        })
    }
}

impl TransformBuilder for CassandraSinkSingleBuilder {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform> {
        Box::new(CassandraSinkSingle {
            shared: self.shared.clone(),
            force_run: ctx.force_run.clone(),
            conn: Conn::NotConnected,
            in_flight: HashMap::new(),
            waiting: Arc::new(Waiting::default()),
            compression: Compression::None,
            outbox: Outbox::default(),
        })
    }
}

enum Conn {
    NotConnected,
    Connected {
        writer: WriteHalf<UpstreamStream>,
        frames: mpsc::Receiver<Result<(Bytes, Header), ChainError>>,
    },
    /// The connection broke; the client connection is being closed.
    Broken,
}

/// Shared by the sink and its reader task: how many requests wait, and when the last was sent.
struct Waiting {
    count: AtomicUsize,
    since: Instant,
    /// Milliseconds from `since` to the last write.
    last_write_ms: AtomicU64,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            count: AtomicUsize::new(0),
            since: Instant::now(),
            last_write_ms: AtomicU64::new(0),
        }
    }
}

impl Waiting {
    fn wrote(&self, count: usize) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last_write_ms.store(ms, Ordering::Relaxed);
        self.count.store(count, Ordering::Relaxed);
    }

    fn last_write(&self) -> Instant {
        self.since + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed))
    }
}

struct CassandraSinkSingle {
    shared: Arc<Shared>,
    force_run: Arc<Notify>,
    conn: Conn,
    /// Requests sent and not answered, by stream id.
    in_flight: HashMap<i16, (MessageId, ReplyTo)>,
    /// What the reader task's read timeout needs to know.
    waiting: Arc<Waiting>,
    /// The compression the client negotiated, to read the node's answers with.
    compression: Compression,
    outbox: Outbox,
}

#[async_trait]
impl Transform for CassandraSinkSingle {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        let requests = std::mem::take(&mut state.requests);
        let mut responses = Vec::new();
        if !requests.is_empty() {
            if matches!(self.conn, Conn::NotConnected) {
                match self.connect().await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(upstream = %self.shared.upstream.address, error = %e, "upstream unreachable");
                        self.shared.failed_requests.add(requests.len() as u64);
                        let text = format!(
                            "shotover: upstream {} is unreachable: {e}",
                            self.shared.upstream.address
                        );
                        return Ok(requests
                            .iter()
                            .map(|r| r.error_to(ErrorKind::Server, &text))
                            .collect());
                    }
                }
            }
            if let Err(e) = self.write(requests).await {
                return Ok(self.broke(e, responses, state));
            }
        }
        if let Err(e) = self.drain(&mut responses) {
            return Ok(self.broke(e, responses, state));
        }
        Ok(responses)
    }
}

impl CassandraSinkSingle {
    async fn connect(&mut self) -> std::io::Result<()> {
        let stream = self.shared.upstream.connect().await?;
        let (reader, writer) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(FRAME_QUEUE);
        tokio::spawn(read_frames(
            reader,
            tx,
            self.force_run.clone(),
            self.shared.upstream.address.clone(),
            self.shared.read_timeout,
            self.waiting.clone(),
        ));
        self.conn = Conn::Connected { writer, frames: rx };
        Ok(())
    }

    /// Writes the batch in as few syscalls as it can, remembering each request's stream.
    async fn write(&mut self, requests: Messages) -> Result<(), ChainError> {
        for request in requests {
            if let (Some(meta), ReplyTo::Cql { stream, .. }) = (request.cql(), request.reply_to()) {
                self.compression = meta.compression;
                self.in_flight
                    .insert(stream, (request.id, request.reply_to()));
            }
            self.outbox.push(request.into_bytes());
        }
        self.waiting.wrote(self.in_flight.len());
        let result = match &mut self.conn {
            Conn::Connected { writer, .. } => self.outbox.write_to(writer).await,
            Conn::NotConnected | Conn::Broken => {
                return Err(ChainError::UpstreamClosed {
                    addr: self.shared.upstream.address.clone(),
                });
            }
        };
        result.map_err(|source| ChainError::UpstreamIo {
            addr: self.shared.upstream.address.clone(),
            source,
        })
    }

    /// Takes every frame the reader task has queued, without waiting.
    fn drain(&mut self, responses: &mut Messages) -> Result<(), ChainError> {
        let Conn::Connected { frames, .. } = &mut self.conn else {
            return Ok(());
        };
        loop {
            let (bytes, header) = match frames.try_recv() {
                Ok(frame) => frame?,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(ChainError::UpstreamClosed {
                        addr: self.shared.upstream.address.clone(),
                    });
                }
            };
            // Negative streams are events the node pushes (after REGISTER).
            let request_id = if header.stream < 0 {
                None
            } else {
                match self.in_flight.remove(&header.stream) {
                    Some((id, _)) => Some(id),
                    None => {
                        tracing::debug!(
                            stream = header.stream,
                            "dropping a response to no request in flight"
                        );
                        continue;
                    }
                }
            };
            responses.push(Message::cql_response(
                request_id,
                bytes,
                header,
                self.compression,
            ));
        }
        self.waiting
            .count
            .store(self.in_flight.len(), Ordering::Relaxed);
        Ok(())
    }

    /// The upstream connection broke: what was received goes to the client, every request
    /// in flight gets a Server error, and the client connection is closed.
    fn broke(
        &mut self,
        error: ChainError,
        mut responses: Messages,
        state: &mut ChainState<'_>,
    ) -> Messages {
        let text = format!("shotover: {error}");
        let failed = self.in_flight.len();
        self.shared.failed_requests.add(failed as u64);
        let mut pending: Vec<(MessageId, ReplyTo)> =
            self.in_flight.drain().map(|(_, v)| v).collect();
        pending.sort_unstable_by_key(|(id, _)| *id);
        responses.extend(
            pending
                .into_iter()
                .map(|(id, to)| Message::error(id, to, ErrorKind::Server, &text)),
        );
        self.waiting.count.store(0, Ordering::Relaxed);
        tracing::warn!(
            upstream = %self.shared.upstream.address,
            error = %error,
            failed,
            "upstream connection broke: answers already received were passed on, requests in flight got a Server error, and the client connection is closed"
        );
        state.close_client = true;
        self.conn = Conn::Broken;
        responses
    }
}

/// The reader task: frames off the socket, into the queue, waking the chain. Ends when the
/// node closes, the sink goes away, or `read_timeout` passes with requests waiting.
async fn read_frames(
    mut reader: ReadHalf<UpstreamStream>,
    tx: mpsc::Sender<Result<(Bytes, Header), ChainError>>,
    force_run: Arc<Notify>,
    addr: String,
    read_timeout: Option<Duration>,
    waiting: Arc<Waiting>,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut decoder = EnvelopeDecoder::new(MAX_RESPONSE);
    let fail = |error: ChainError| {
        let tx = tx.clone();
        let force_run = force_run.clone();
        async move {
            let _ = tx.send(Err(error)).await;
            force_run.notify_one();
        }
    };
    loop {
        let mut got = false;
        loop {
            match decoder.next(&mut buf) {
                Ok(Some(frame)) => {
                    got = true;
                    match tx.try_send(Ok(frame)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(frame)) => {
                            // Wake the chain before waiting for room, or neither side moves.
                            force_run.notify_one();
                            if tx.send(frame).await.is_err() {
                                return;
                            }
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    fail(ChainError::UpstreamProtocol {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    })
                    .await;
                    return;
                }
            }
        }
        if got {
            force_run.notify_one();
        }
        if buf.is_empty() && buf.capacity() > 1024 * 1024 {
            buf = BytesMut::with_capacity(16 * 1024);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        // Nothing arrived since `read_started`: give up once a request has waited the
        // whole read_timeout since then (or since it was sent, if later).
        let read_started = Instant::now();
        let timeout = async {
            let Some(limit) = read_timeout else {
                return std::future::pending().await;
            };
            loop {
                let since = read_started.max(waiting.last_write());
                let waited = since.elapsed();
                if waiting.count.load(Ordering::Relaxed) > 0 && waited >= limit {
                    return;
                }
                tokio::time::sleep(limit.saturating_sub(waited).max(Duration::from_millis(10)))
                    .await;
            }
        };
        let result = tokio::select! {
            r = reader.read_buf(&mut buf) => r,
            _ = tx.closed() => return,
            _ = timeout => {
                let limit = read_timeout.unwrap_or_default();
                fail(ChainError::UpstreamIo {
                    addr: addr.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within the read_timeout of {} s", limit.as_secs()),
                    ),
                })
                .await;
                return;
            }
        };
        match result {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                fail(ChainError::UpstreamClosed { addr }).await;
                return;
            }
            Err(source) => {
                fail(ChainError::UpstreamIo { addr, source }).await;
                return;
            }
        }
    }
}
