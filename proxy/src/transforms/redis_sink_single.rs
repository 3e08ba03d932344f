//! `RedisSinkSingle` (upstream's `ValkeySinkSingle`): one upstream Redis connection per
//! client connection, opened on the first request.
//!
//! The batch is written in one go and the replies are read straight off the socket in the
//! same task: no channel hop on the request path. The sink follows the RESP state that
//! decides which frames answer which request: subscribe confirmations (one per channel),
//! pub/sub messages and RESP3 pushes (answers to nobody), MONITOR output, RESET and QUIT.
//! Once a connection can receive frames nobody asked for (it subscribed, ran MONITOR or
//! turned on CLIENT TRACKING), a reader task takes over the socket's read half and wakes the
//! chain for each frame, so pushes reach the client while it sends nothing.
//!
//! An upstream that cannot be reached gives each request `-ERR` and the client connection
//! stays open (the next request tries again: nothing was sent, so no state is lost). When an
//! upstream connection breaks after use, the replies already received still go to the
//! client, every request still waiting gets `-ERR`, and the client connection is closed:
//! reconnecting silently would drop the client's AUTH, SELECT, subscriptions or transaction.

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use shotover_crds::transform::RedisSinkSingleConfig;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::DecodeError;
use crate::codec::redis::ResponseDecoder;
use crate::message::{Message, Messages};
use crate::metrics::Counter;
use crate::outbox::Outbox;
use crate::upstream::{Upstream, UpstreamStream, failed_requests_counter};

mod replies;

use replies::ReplyTracker;

/// Largest response accepted from Redis (1 GiB: above Redis's 512 MiB bulk limit).
const MAX_RESPONSE: usize = 1024 * 1024 * 1024;
/// Frames the reader task may queue ahead of the chain in streaming mode.
const STREAM_QUEUE: usize = 1024;

pub struct RedisSinkSingleBuilder {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Upstream,
    failed_requests: Counter,
}

impl RedisSinkSingleBuilder {
    pub fn new(config: &RedisSinkSingleConfig, chain: &str) -> Result<Self> {
        let name = config.name.as_deref().unwrap_or("RedisSinkSingle");
        Ok(RedisSinkSingleBuilder {
            shared: Arc::new(Shared {
                upstream: Upstream::new(
                    &config.remote_address,
                    config.connect_timeout_ms,
                    config.tls.as_ref(),
                )?,
                failed_requests: failed_requests_counter(chain, name),
            }),
        })
    }
}

impl TransformBuilder for RedisSinkSingleBuilder {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform> {
        Box::new(RedisSinkSingle {
            shared: self.shared.clone(),
            force_run: ctx.force_run.clone(),
            conn: Conn::NotConnected,
            replies: ReplyTracker::default(),
            outbox: Outbox::default(),
        })
    }
}

enum Conn {
    NotConnected,
    /// The sink reads replies itself.
    Direct {
        stream: UpstreamStream,
        read_buf: BytesMut,
        decoder: ResponseDecoder,
    },
    /// A reader task owns the read half and queues frames.
    Streaming {
        writer: WriteHalf<UpstreamStream>,
        frames: mpsc::Receiver<Result<Bytes, ChainError>>,
    },
    /// The upstream went away after QUIT.
    Closed,
}

struct RedisSinkSingle {
    shared: Arc<Shared>,
    force_run: Arc<Notify>,
    conn: Conn,
    replies: ReplyTracker,
    outbox: Outbox,
}

#[async_trait]
impl Transform for RedisSinkSingle {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        let requests = std::mem::take(&mut state.requests);
        let mut responses = Vec::with_capacity(requests.len());
        if requests.is_empty() {
            if let Err(e) = self.drain_queued(&mut responses) {
                return Ok(self.broke(e, responses, state));
            }
            return Ok(responses);
        }
        if matches!(self.conn, Conn::NotConnected) {
            match self.shared.upstream.connect().await {
                Ok(stream) => {
                    self.conn = Conn::Direct {
                        stream,
                        read_buf: BytesMut::with_capacity(8 * 1024),
                        decoder: ResponseDecoder::new(MAX_RESPONSE),
                    }
                }
                Err(e) => {
                    tracing::debug!(upstream = %self.shared.upstream.address, error = %e, "upstream unreachable");
                    self.shared.failed_requests.add(requests.len() as u64);
                    let text = format!(
                        "ERR shotover: upstream {} is unreachable: {e}",
                        self.shared.upstream.address
                    );
                    return Ok(requests
                        .iter()
                        .map(|r| Message::error_reply(r.id, &text))
                        .collect());
                }
            }
        }
        if matches!(self.conn, Conn::Closed) {
            for request in &requests {
                self.replies.expect_one(request.id);
            }
            return Ok(self.broke(self.closed(), responses, state));
        }
        if let Err(e) = self.write(requests, &mut responses).await {
            return Ok(self.broke(e, responses, state));
        }
        while self.replies.waiting() {
            let frame = match self.next_frame().await {
                Ok(frame) => frame,
                // After QUIT the server closes the connection: requests pipelined behind it
                // are not answered, as with Redis itself.
                Err(ChainError::UpstreamClosed { .. }) if self.replies.quit() => {
                    self.replies.forget_pending();
                    break;
                }
                Err(e) => return Ok(self.broke(e, responses, state)),
            };
            self.replies.classify(frame, &mut responses);
        }
        if !self.replies.quit()
            && let Err(e) = self.drain_queued(&mut responses)
        {
            return Ok(self.broke(e, responses, state));
        }
        if self.replies.quit() {
            state.close_client = true;
            self.conn = Conn::Closed;
        } else if self.replies.unsolicited_possible() {
            self.start_streaming();
        }
        Ok(responses)
    }
}

impl RedisSinkSingle {
    fn closed(&self) -> ChainError {
        ChainError::UpstreamClosed {
            addr: self.shared.upstream.address.clone(),
        }
    }

    fn io_error(&self, source: std::io::Error) -> ChainError {
        ChainError::UpstreamIo {
            addr: self.shared.upstream.address.clone(),
            source,
        }
    }

    /// Writes the batch in as few syscalls as it can. Requests the server will not answer
    /// (CLIENT REPLY OFF/SKIP) get an empty response in `responses` at once: nothing is
    /// written to the client for them.
    async fn write(
        &mut self,
        requests: Messages,
        responses: &mut Messages,
    ) -> Result<(), ChainError> {
        for mut request in requests {
            if !self.replies.expect(&mut request) {
                responses.push(Message::response(Some(request.id), Bytes::new()));
            }
            self.outbox.push(request.into_bytes());
        }
        let result = match &mut self.conn {
            Conn::Direct { stream, .. } => self.outbox.write_to(stream).await,
            Conn::Streaming { writer, .. } => self.outbox.write_to(writer).await,
            Conn::NotConnected | Conn::Closed => Ok(()),
        };
        result.map_err(|e| self.io_error(e))
    }

    /// The upstream connection broke: the replies already received go to the client, every
    /// request still waiting gets an error reply, and the client connection is closed (a new
    /// upstream connection would not have the client's AUTH, SELECT, subscriptions or
    /// transaction).
    fn broke(
        &mut self,
        error: ChainError,
        mut responses: Messages,
        state: &mut ChainState<'_>,
    ) -> Messages {
        let text = format!("ERR shotover: {error}");
        let failed = self.replies.fail_pending(&text, &mut responses);
        tracing::warn!(
            upstream = %self.shared.upstream.address,
            error = %error,
            failed,
            "upstream connection broke: replies already received were passed on, pending requests got an error reply, and the client connection is closed"
        );
        state.close_client = true;
        self.conn = Conn::Closed;
        responses
    }

    async fn next_frame(&mut self) -> Result<Bytes, ChainError> {
        let addr = &self.shared.upstream.address;
        match &mut self.conn {
            Conn::Direct {
                stream,
                read_buf,
                decoder,
            } => loop {
                if let Some(frame) = decoder
                    .decode(read_buf)
                    .map_err(|e| protocol_error(addr, e))?
                {
                    return Ok(frame);
                }
                if read_buf.capacity() - read_buf.len() < 1024 {
                    read_buf.reserve(16 * 1024);
                }
                match stream.read_buf(read_buf).await {
                    Ok(0) => return Err(self.closed()),
                    Ok(_) => {}
                    Err(e) => return Err(self.io_error(e)),
                }
            },
            Conn::Streaming { frames, .. } => match frames.recv().await {
                Some(frame) => frame,
                None => Err(self.closed()),
            },
            Conn::NotConnected | Conn::Closed => Err(self.closed()),
        }
    }

    /// Takes every frame already received without waiting.
    fn drain_queued(&mut self, responses: &mut Messages) -> Result<(), ChainError> {
        loop {
            let frame = match &mut self.conn {
                Conn::Direct {
                    read_buf, decoder, ..
                } => match decoder.decode(read_buf) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => {
                        if read_buf.is_empty() && read_buf.capacity() > 1024 * 1024 {
                            *read_buf = BytesMut::with_capacity(8 * 1024);
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(protocol_error(&self.shared.upstream.address, e)),
                },
                Conn::Streaming { frames, .. } => match frames.try_recv() {
                    Ok(frame) => frame?,
                    Err(mpsc::error::TryRecvError::Empty) => return Ok(()),
                    Err(mpsc::error::TryRecvError::Disconnected) => return Err(self.closed()),
                },
                Conn::NotConnected | Conn::Closed => return Ok(()),
            };
            self.replies.classify(frame, responses);
        }
    }

    /// Hands the read half to a task, so frames nobody asked for reach the client.
    fn start_streaming(&mut self) {
        if !matches!(self.conn, Conn::Direct { .. }) {
            return;
        }
        let Conn::Direct {
            stream,
            read_buf,
            decoder,
        } = std::mem::replace(&mut self.conn, Conn::NotConnected)
        else {
            return;
        };
        let (reader, writer) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let addr = self.shared.upstream.address.clone();
        tokio::spawn(read_frames(
            reader,
            read_buf,
            decoder,
            tx,
            self.force_run.clone(),
            addr,
        ));
        self.conn = Conn::Streaming { writer, frames: rx };
    }
}

fn protocol_error(addr: &str, e: DecodeError) -> ChainError {
    ChainError::UpstreamProtocol {
        addr: addr.to_string(),
        reason: e.to_string(),
    }
}

/// The reader task of streaming mode: frames off the socket, into the queue, waking the
/// chain. Ends when the upstream closes or the sink goes away.
async fn read_frames(
    mut reader: ReadHalf<UpstreamStream>,
    mut buf: BytesMut,
    mut decoder: ResponseDecoder,
    tx: mpsc::Sender<Result<Bytes, ChainError>>,
    force_run: Arc<Notify>,
    addr: String,
) {
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                    force_run.notify_one();
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(protocol_error(&addr, e))).await;
                    force_run.notify_one();
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        let result = tokio::select! {
            r = reader.read_buf(&mut buf) => r,
            _ = tx.closed() => return,
        };
        match result {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                let _ = tx.send(Err(ChainError::UpstreamClosed { addr })).await;
                force_run.notify_one();
                return;
            }
            Err(source) => {
                let _ = tx.send(Err(ChainError::UpstreamIo { addr, source })).await;
                force_run.notify_one();
                return;
            }
        }
    }
}
