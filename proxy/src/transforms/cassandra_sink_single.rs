//! `CassandraSinkSingle`: one upstream connection to a Cassandra node per client connection,
//! opened on the first request.
//!
//! The proxy is transparent to the CQL session: the client's own STARTUP, AUTH_RESPONSE,
//! `USE`, REGISTER and compression go to the node on the client's connection, frames are
//! forwarded as read (stream ids untouched, bodies never parsed here), and the node's answers
//! go back as they arrive, matched to their requests by stream id. The connection's own task
//! waits for them ([`Transform::ready`]) whenever it waits for its client, so a slow query
//! does not hold up the others on the connection, events (stream -1) reach a client that
//! sends nothing, and an answer costs no hop through another task.
//!
//! An unreachable node gives each request a CQL Server error and the client connection stays
//! open (nothing was sent, so the next request tries again; drivers try another node). When
//! the connection breaks after use, or `read_timeout` passes with requests waiting and
//! nothing arriving, every request in flight gets a Server error and the client connection is
//! closed: a new upstream connection would not carry the client's handshake, login or
//! keyspace, and drivers reconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use bytes::BytesMut;
use shotover_crds::transform::CassandraSinkSingleConfig;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::cassandra::Compression;
use crate::codec::cassandra::segment::{FrameDecoder, Handshake};
use crate::message::{ErrorKind, Message, MessageId, Messages, ReplyTo};
use crate::metrics::Counter;
use crate::outbox::Outbox;
use crate::upstream::{Upstream, UpstreamStream, failed_requests_counter};

/// Largest frame accepted from the node (Cassandra's own limit is 256 MiB at most).
const MAX_RESPONSE: usize = 512 * 1024 * 1024;
/// Most answer bytes read ahead while a large batch is being written (the node may stop
/// reading requests until its answers are read).
const READ_AHEAD: usize = 64 * 1024 * 1024;

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
                failed_requests: failed_requests_counter(chain, name),
            }),
        })
    }
}

impl TransformBuilder for CassandraSinkSingleBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(CassandraSinkSingle {
            shared: self.shared.clone(),
            conn: Conn::NotConnected,
            in_flight: HashMap::new(),
            compression: Compression::None,
            startup: Handshake::default(),
            outbox: Outbox::default(),
        })
    }
}

enum Conn {
    NotConnected,
    Connected(Box<Link>),
    /// The connection broke; the client connection is being closed.
    Broken,
}

/// An open connection to the node.
struct Link {
    reader: ReadHalf<UpstreamStream>,
    writer: WriteHalf<UpstreamStream>,
    read_buf: BytesMut,
    /// Envelopes, or v5 segments once the node answered the client's STARTUP.
    decoder: FrameDecoder,
    /// When something was last written or read: the read timeout counts from here.
    last_activity: Instant,
    /// The connection closed or failed while reading; delivered by the next `transform`.
    failed: Option<ChainError>,
}

impl Link {
    /// Whether a whole frame is waiting in the buffer.
    fn has_frame(&self) -> bool {
        self.decoder.has_frame(&self.read_buf)
    }

    fn reserve(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > 1024 * 1024 {
            self.read_buf = BytesMut::with_capacity(16 * 1024);
        }
        if self.read_buf.capacity() - self.read_buf.len() < 1024 {
            self.read_buf.reserve(16 * 1024);
        }
    }

    /// Records the outcome of a read.
    fn read_done(&mut self, result: std::io::Result<usize>, addr: &str) {
        match result {
            Ok(0) => {
                self.failed = Some(ChainError::UpstreamClosed {
                    addr: addr.to_string(),
                })
            }
            Ok(_) => self.last_activity = Instant::now(),
            Err(source) => {
                self.failed = Some(ChainError::UpstreamIo {
                    addr: addr.to_string(),
                    source,
                })
            }
        }
    }
}

struct CassandraSinkSingle {
    shared: Arc<Shared>,
    conn: Conn,
    /// Requests sent and not answered, by stream id.
    in_flight: HashMap<i16, (MessageId, ReplyTo)>,
    /// The compression the client negotiated, to read the node's answers with.
    compression: Compression,
    /// The client's v5 STARTUP until the node answers it.
    startup: Handshake,
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
            // A v5 STARTUP still unanswered: what follows it goes in envelopes or in segments
            // depending on the answer, so wait for it. (Drivers wait for READY themselves;
            // this covers a client, or a chain in front of this sink, that does not.)
            while self.startup.pending() && matches!(self.conn, Conn::Connected(_)) {
                self.ready().await;
                if let Err(e) = self.drain(&mut responses) {
                    return Ok(self.broke(e, responses, state));
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

    /// Waits until an answer (or the connection's end) arrives from the node: the bytes go
    /// into the read buffer, which `transform` decodes. Cancel-safe: a read either completes
    /// or takes nothing.
    async fn ready(&mut self) {
        let Conn::Connected(link) = &mut self.conn else {
            return std::future::pending().await;
        };
        if link.failed.is_some() || link.has_frame() {
            return;
        }
        link.reserve();
        let deadline = self
            .shared
            .read_timeout
            .map(|limit| (link.last_activity + limit, limit));
        let Link {
            reader, read_buf, ..
        } = &mut **link;
        let read = reader.read_buf(read_buf);
        let result = match deadline {
            Some((deadline, limit)) if !self.in_flight.is_empty() => {
                match tokio::time::timeout_at(deadline, read).await {
                    Ok(result) => result,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within the read_timeout of {} s", limit.as_secs()),
                    )),
                }
            }
            _ => read.await,
        };
        link.read_done(result, &self.shared.upstream.address);
    }
}

impl CassandraSinkSingle {
    async fn connect(&mut self) -> std::io::Result<()> {
        let stream = self.shared.upstream.connect().await?;
        let (reader, writer) = tokio::io::split(stream);
        self.conn = Conn::Connected(Box::new(Link {
            reader,
            writer,
            read_buf: BytesMut::with_capacity(16 * 1024),
            decoder: FrameDecoder::new(MAX_RESPONSE),
            last_activity: Instant::now(),
            failed: None,
        }));
        Ok(())
    }

    /// Writes the batch in as few syscalls as it can, remembering each request's stream,
    /// and reads answers meanwhile, so that a node waiting for its answers to be read never
    /// stops a large batch half way.
    async fn write(&mut self, requests: Messages) -> Result<(), ChainError> {
        let addr = &self.shared.upstream.address;
        let Conn::Connected(link) = &mut self.conn else {
            return Err(ChainError::UpstreamClosed { addr: addr.clone() });
        };
        let segments = link.decoder.segments();
        for request in &requests {
            if let (Some(meta), ReplyTo::Cql { stream, .. }) = (request.cql(), request.reply_to()) {
                self.compression = meta.compression;
                self.in_flight
                    .insert(stream, (request.id, request.reply_to()));
                if segments.is_none() {
                    self.startup.sent(&meta.header, meta.compression);
                }
            }
        }
        match segments {
            Some(codec) => {
                let frames: Vec<_> = requests.into_iter().map(Message::into_bytes).collect();
                self.outbox.push(codec.encode_all(&frames));
            }
            None => {
                for request in requests {
                    self.outbox.push(request.into_bytes());
                }
            }
        }
        link.last_activity = Instant::now();
        let written = {
            let Link {
                reader,
                writer,
                read_buf,
                failed,
                ..
            } = &mut **link;
            let write = self.outbox.write_to(writer);
            tokio::pin!(write);
            loop {
                if read_buf.capacity() - read_buf.len() < 1024 {
                    read_buf.reserve(16 * 1024);
                }
                tokio::select! {
                    biased;
                    written = &mut write => break written,
                    read = reader.read_buf(read_buf), if failed.is_none() && read_buf.len() < READ_AHEAD => {
                        match read {
                            Ok(0) => *failed = Some(ChainError::UpstreamClosed { addr: addr.clone() }),
                            Ok(_) => {}
                            Err(source) => *failed = Some(ChainError::UpstreamIo { addr: addr.clone(), source }),
                        }
                    }
                }
            }
        };
        link.last_activity = Instant::now();
        written.map_err(|source| ChainError::UpstreamIo {
            addr: addr.clone(),
            source,
        })
    }

    /// Decodes every whole answer in the read buffer; then reports a failure `ready` saw.
    fn drain(&mut self, responses: &mut Messages) -> Result<(), ChainError> {
        let addr = &self.shared.upstream.address;
        let Conn::Connected(link) = &mut self.conn else {
            return Ok(());
        };
        loop {
            let (bytes, header) = match link.decoder.next(&mut link.read_buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    return Err(ChainError::UpstreamProtocol {
                        addr: addr.clone(),
                        reason: e.to_string(),
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
            if let Some(codec) = self.startup.answered(&header) {
                link.decoder.switch_to_segments(codec);
                self.compression = Compression::None;
            }
            responses.push(Message::cql_response(
                request_id,
                bytes,
                header,
                self.compression,
            ));
        }
        match link.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
