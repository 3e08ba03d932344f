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

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use shotover_crds::transform::RedisSinkSingleConfig;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::DecodeError;
use crate::codec::redis::ResponseDecoder;
use crate::codec::redis::command::{CommandKind, ReplyMode, aggregate_head};
use crate::codec::redis::frame::RedisFrame;
use crate::message::{Message, MessageId, Messages};
use crate::metrics::{self, Counter};
use crate::outbox::Outbox;
use crate::upstream::{Upstream, UpstreamStream, UpstreamTls};

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
        let tls = match &config.tls {
            Some(tls) => {
                let (connector, server_name) = crate::tls::connector(tls, &config.remote_address)
                    .context("building the upstream TLS connector")?;
                Some(UpstreamTls {
                    connector,
                    server_name,
                })
            }
            None => None,
        };
        let name = config.name.as_deref().unwrap_or("RedisSinkSingle");
        Ok(RedisSinkSingleBuilder {
            shared: Arc::new(Shared {
                upstream: Upstream {
                    address: config.remote_address.clone(),
                    connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                    tls,
                },
                failed_requests: metrics::counter(
                    "shotover_failed_requests_count",
                    "Requests a sink answered with an error because its upstream could not be reached.",
                    &[("chain", chain), ("transform", name)],
                ),
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
            pending: VecDeque::new(),
            resp: RespState::default(),
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

/// A request written upstream and not fully answered yet.
struct Pending {
    /// `Some` until the first reply is assigned to it.
    id: Option<MessageId>,
    kind: CommandKind,
    argc: usize,
    /// Subscribe confirmations still expected (computed when the request reaches the front).
    left: Option<usize>,
    /// For HELLO: the protocol version it asks for.
    hello: Option<u8>,
}

impl Pending {
    /// A request answered by exactly one reply.
    fn one(id: MessageId) -> Pending {
        Pending {
            id: Some(id),
            kind: CommandKind::Other,
            argc: 0,
            left: None,
            hello: None,
        }
    }
}

/// The RESP state of the upstream connection, as far as framing replies depends on it.
#[derive(Default)]
struct RespState {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard_channels: HashSet<Bytes>,
    monitoring: bool,
    tracking: bool,
    quit: bool,
    /// `CLIENT REPLY OFF`/`SKIP`: the server sends no reply to the next request(s).
    replies: Replies,
    /// The connection speaks RESP3 (a HELLO 3 succeeded): pub/sub messages are pushes.
    resp3: bool,
    /// Between MULTI and EXEC/DISCARD every command is answered once (`+QUEUED` or an
    /// error), whatever it is. Followed as requests are written.
    in_multi: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Replies {
    #[default]
    On,
    Off,
    SkipNext,
}

impl RespState {
    /// Whether the server will reply to a request of `kind`, moving the reply mode on.
    fn will_reply(&mut self, kind: CommandKind) -> bool {
        match (kind, self.replies) {
            (CommandKind::Reset, _) => {
                self.replies = Replies::On;
                true
            }
            (CommandKind::ClientReply(ReplyMode::On), _) => {
                self.replies = Replies::On;
                true
            }
            (CommandKind::ClientReply(ReplyMode::Off), _) => {
                self.replies = Replies::Off;
                false
            }
            (CommandKind::ClientReply(ReplyMode::Skip), Replies::On) => {
                self.replies = Replies::SkipNext;
                false
            }
            (CommandKind::ClientReply(ReplyMode::Skip), _) => false,
            (_, Replies::On) => true,
            (_, Replies::Off) => false,
            (_, Replies::SkipNext) => {
                self.replies = Replies::On;
                false
            }
        }
    }
}

impl RespState {
    fn subscribed(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard_channels.is_empty())
    }

    /// Whether frames may arrive that no request asked for.
    fn unsolicited_possible(&self) -> bool {
        self.subscribed() || self.monitoring || self.tracking
    }
}

struct RedisSinkSingle {
    shared: Arc<Shared>,
    force_run: Arc<Notify>,
    conn: Conn,
    pending: VecDeque<Pending>,
    resp: RespState,
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
                self.pending.push_back(Pending::one(request.id));
            }
            return Ok(self.broke(self.closed(), responses, state));
        }
        if let Err(e) = self.write(requests, &mut responses).await {
            return Ok(self.broke(e, responses, state));
        }
        while !self.pending.is_empty() {
            let frame = match self.next_frame().await {
                Ok(frame) => frame,
                // After QUIT the server closes the connection: requests pipelined behind it
                // are not answered, as with Redis itself.
                Err(ChainError::UpstreamClosed { .. }) if self.resp.quit => {
                    self.pending.clear();
                    break;
                }
                Err(e) => return Ok(self.broke(e, responses, state)),
            };
            self.classify(frame, &mut responses);
        }
        if !self.resp.quit
            && let Err(e) = self.drain_queued(&mut responses)
        {
            return Ok(self.broke(e, responses, state));
        }
        if self.resp.quit {
            state.close_client = true;
            self.conn = Conn::Closed;
        } else if self.resp.unsolicited_possible() {
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
            let id = request.id;
            let command = request.command();
            let (mut kind, argc, hello) = (command.kind, command.argc, command.hello_version());
            // Inside a transaction a command is only queued: one reply, whatever it is.
            match kind {
                CommandKind::Multi => self.resp.in_multi = true,
                CommandKind::EndMulti | CommandKind::Reset => self.resp.in_multi = false,
                _ if self.resp.in_multi => kind = CommandKind::Other,
                _ => {}
            }
            if self.resp.will_reply(kind) {
                self.pending.push_back(Pending {
                    id: Some(id),
                    kind,
                    argc,
                    left: None,
                    hello,
                });
            } else {
                responses.push(Message::response(Some(id), Bytes::new()));
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
        let failed = self.pending.len();
        for pending in self.pending.drain(..) {
            if let Some(id) = pending.id {
                responses.push(Message::error_reply(id, &text));
            }
        }
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
            self.classify(frame, responses);
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

    /// Decides whom a frame answers, and keeps the RESP state.
    fn classify(&mut self, frame: Bytes, out: &mut Messages) {
        let head_kind = self.pending.front().map(|p| p.kind);
        let head_subscribing = head_kind.is_some_and(is_subscribe_family);
        let kind_byte = frame.first().copied();
        let aggregate_name = match kind_byte {
            Some(b'>') => aggregate_head(&frame).map(|(name, _, _)| name),
            // RESP2 has no pushes: while subscribed, messages are arrays.
            Some(b'*') if !self.resp.resp3 && (self.resp.subscribed() || head_subscribing) => {
                aggregate_head(&frame).map(|(name, _, _)| name)
            }
            _ => None,
        };
        let confirmation = aggregate_name.as_deref().is_some_and(is_confirmation_name);
        let unsolicited = match kind_byte {
            Some(b'>') => !(confirmation && head_subscribing),
            Some(b'*') if aggregate_name.is_some() => {
                !confirmation && matches!(aggregate_name.as_deref(), Some(n) if is_message_name(n))
            }
            _ => self.pending.is_empty(),
        };
        if unsolicited || self.pending.is_empty() {
            out.push(Message::response(None, frame));
            return;
        }
        let is_error = matches!(kind_byte, Some(b'-' | b'!'));
        let Some(head) = self.pending.front_mut() else {
            return;
        };
        let done = if is_subscribe_family(head.kind) && !is_error {
            // Counted when the request reaches the front, before this confirmation changes
            // the channel sets: `UNSUBSCRIBE` alone gets one per channel (at least one).
            let left = head.left.get_or_insert_with(|| match head.kind {
                CommandKind::Unsubscribe if head.argc == 0 => self.resp.channels.len().max(1),
                CommandKind::PUnsubscribe if head.argc == 0 => self.resp.patterns.len().max(1),
                CommandKind::SUnsubscribe if head.argc == 0 => {
                    self.resp.shard_channels.len().max(1)
                }
                _ => head.argc.max(1),
            });
            *left = left.saturating_sub(1);
            *left == 0
        } else {
            true
        };
        let id = head.id.take();
        let kind = head.kind;
        let hello = head.hello;
        if done {
            self.pending.pop_front();
        }
        if confirmation && head_subscribing {
            self.track_confirmation(&frame);
        }
        if !is_error {
            match kind {
                CommandKind::Monitor => self.resp.monitoring = true,
                // RESET clears the connection's state, except what requests written after
                // it already set (their reply mode and transaction state).
                CommandKind::Reset => {
                    self.resp = RespState {
                        replies: self.resp.replies,
                        in_multi: self.resp.in_multi,
                        ..RespState::default()
                    }
                }
                CommandKind::Hello => {
                    if let Some(version) = hello {
                        self.resp.resp3 = version == 3;
                    }
                }
                CommandKind::Quit => self.resp.quit = true,
                CommandKind::ClientTracking => self.resp.tracking = true,
                _ => {}
            }
        }
        out.push(Message::response(id, frame));
    }

    /// Follows the channel sets from `subscribe`/`unsubscribe` confirmations.
    fn track_confirmation(&mut self, frame: &Bytes) {
        let Ok(parsed) = RedisFrame::parse(frame) else {
            return;
        };
        let items = match parsed {
            RedisFrame::Array(items) | RedisFrame::Push(items) => items,
            _ => return,
        };
        let (Some(kind), Some(channel)) =
            (items.first().and_then(RedisFrame::as_bytes), items.get(1))
        else {
            return;
        };
        // Copied: a slice would keep the whole read buffer it came from alive.
        let Some(channel) = channel.as_bytes().map(|c| Bytes::copy_from_slice(c)) else {
            return;
        };
        let kind = kind.to_ascii_lowercase();
        match kind.as_slice() {
            b"subscribe" => {
                self.resp.channels.insert(channel);
            }
            b"psubscribe" => {
                self.resp.patterns.insert(channel);
            }
            b"ssubscribe" => {
                self.resp.shard_channels.insert(channel);
            }
            b"unsubscribe" => {
                self.resp.channels.remove(&channel);
            }
            b"punsubscribe" => {
                self.resp.patterns.remove(&channel);
            }
            b"sunsubscribe" => {
                self.resp.shard_channels.remove(&channel);
            }
            _ => {}
        }
    }
}

fn is_subscribe_family(kind: CommandKind) -> bool {
    matches!(
        kind,
        CommandKind::Subscribe
            | CommandKind::PSubscribe
            | CommandKind::SSubscribe
            | CommandKind::Unsubscribe
            | CommandKind::PUnsubscribe
            | CommandKind::SUnsubscribe
    )
}

fn is_confirmation_name(name: &[u8]) -> bool {
    [
        "subscribe",
        "psubscribe",
        "ssubscribe",
        "unsubscribe",
        "punsubscribe",
        "sunsubscribe",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

fn is_message_name(name: &[u8]) -> bool {
    ["message", "pmessage", "smessage"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
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
