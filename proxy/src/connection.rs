//! One client connection: read every complete request in the buffer, run them through the
//! chain as one batch, write the responses back, repeat. Redis responses go back in request
//! order; CQL responses go back as they come (the client matches them by stream id), so a
//! slow query does not hold up the others on its connection.
//!
//! The handler is one task per connection that owns the socket, so a batch goes from the
//! client's socket to the upstream's and back without crossing a channel. It also runs the
//! chain when a transform asks (`force_run`: pushes from upstream, a Coalesce timer), closes
//! idle connections, answers malformed or oversized frames with a protocol error before
//! closing, and on shutdown finishes what it has read, flushes the chain and closes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use shotover_crds::Protocol;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::budget::{self, Held};
use crate::chain::{ChainError, TransformChain};
use crate::codec::DecodeError;
use crate::codec::{cassandra, redis};
use crate::message::{ErrorKind, Message, MessageId, Messages, ReplyTo};
use crate::metrics::Counter;
use crate::outbox::Outbox;
use crate::reload::follow::{Event, Follow, Step};

/// A reload or the drain deadline of the connection's source; never without one.
async fn follow_event(follow: &mut Option<Follow>) -> Event {
    match follow {
        Some(follow) => follow.event().await,
        None => std::future::pending().await,
    }
}

/// Most bytes read ahead from a client while its previous batch is in the chain.
const READ_AHEAD: usize = 64 * 1024;
/// A read buffer grown past this for one large frame is given back once it is empty.
const SHRINK_ABOVE: usize = 1024 * 1024;

/// Settings and shared handles a connection needs.
pub struct ConnectionSettings {
    pub protocol: Protocol,
    pub max_frame: usize,
    pub idle_timeout: Option<Duration>,
    pub shutdown: CancellationToken,
    pub force_run: Arc<Notify>,
    pub protocol_errors: Counter,
}

/// Why the connection ended, for the log.
#[derive(Debug)]
pub enum Ended {
    ClientClosed,
    /// The client closed its connection while its requests were in flight.
    ClientGone,
    IdleTimeout,
    Shutdown,
    ProtocolError(DecodeError),
    ChainFailed(ChainError),
    ClosedByTransform,
    /// A reload replaced the chain and the connection could not move to the new one before
    /// the drain deadline.
    Retired,
    /// A reload removed the connection's source.
    SourceRemoved,
    Io(std::io::Error),
}

/// The client side of a protocol: how requests are framed.
enum Decoder {
    Redis(redis::RequestDecoder),
    Cql(cassandra::RequestDecoder),
}

/// Requests sent into the chain and not answered yet.
enum Pending {
    /// Redis: answers go back in request order. `held` has the responses that came back
    /// before an earlier request's (rare).
    InOrder {
        queue: VecDeque<MessageId>,
        held: HashMap<MessageId, Message>,
    },
    /// CQL: answers go back as they come.
    ById(HashMap<MessageId, ReplyTo>),
}

struct Handler<S> {
    stream: S,
    chain: TransformChain,
    decoder: Decoder,
    read_buf: BytesMut,
    outbox: Outbox,
    /// CQL answers waiting to be put in v5 segments (packed together) before the outbox.
    to_segment: Vec<bytes::Bytes>,
    /// How long a write to the client may wait for it to read (the idle timeout): a client
    /// that stops reading its replies must not hold its connection slot forever.
    write_timeout: Option<Duration>,
    next_id: MessageId,
    pending: Pending,
    /// The sink holds answers to requests already sent (it caps the replies held for one
    /// connection): the chain runs with empty batches until it has given them all, and no
    /// new requests go in meanwhile, so the client feels the back-pressure.
    backlog: bool,
    /// Follows reloads of the source (none in unit tests).
    follow: Option<Follow>,
    /// This connection's incomplete request bytes, counted against the process budget.
    requests: budget::requests::Buffered,
}

/// Serves one client connection until it ends.
pub async fn serve<S>(
    stream: S,
    chain: TransformChain,
    settings: &ConnectionSettings,
    follow: Option<Follow>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (decoder, pending) = match settings.protocol {
        Protocol::Redis => (
            Decoder::Redis(redis::RequestDecoder::new(settings.max_frame)),
            Pending::InOrder {
                queue: VecDeque::new(),
                held: HashMap::new(),
            },
        ),
        Protocol::Cassandra => (
            Decoder::Cql(cassandra::RequestDecoder::new(settings.max_frame)),
            Pending::ById(HashMap::new()),
        ),
    };
    let mut handler = Handler {
        stream,
        chain,
        decoder,
        read_buf: BytesMut::new(),
        outbox: Outbox::default(),
        to_segment: Vec::new(),
        write_timeout: settings.idle_timeout,
        next_id: 1,
        pending,
        backlog: false,
        follow,
        requests: budget::requests::Buffered::default(),
    };
    let ended = handler.run(settings).await;
    if let Ended::ProtocolError(_) = &ended {
        settings.protocol_errors.inc();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), handler.stream.shutdown()).await;
    ended
}

impl<S> Handler<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn run(&mut self, settings: &ConnectionSettings) -> Ended {
        let idle = tokio::time::sleep(settings.idle_timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(idle);
        loop {
            // A request boundary: follow a reload if there was one.
            if let Some(follow) = &mut self.follow {
                let quiet = !self.backlog
                    && match &self.pending {
                        Pending::InOrder { queue, .. } => queue.is_empty(),
                        Pending::ById(map) => map.is_empty(),
                    };
                match follow.step(quiet, &mut self.next_id).await {
                    Step::Stay => {}
                    Step::Close => return Ended::SourceRemoved,
                    Step::Moved(chain) => {
                        tracing::debug!("moved to the reloaded chain");
                        self.chain = chain;
                    }
                }
            }
            if self.backlog {
                if let Some(ended) = self.run_batch(Vec::new(), false).await {
                    return ended;
                }
                if let Some(timeout) = settings.idle_timeout {
                    idle.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                continue;
            }
            // Everything complete in the buffer is one batch.
            let (batch, decode_error) = self.decode_batch();
            if !batch.is_empty() {
                if let Some(ended) = self.run_batch(batch, false).await {
                    return ended;
                }
                if let Some(timeout) = settings.idle_timeout {
                    idle.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                // Requests may have been read ahead while the batch ran: decode again (the
                // decoder repeats an error, so a bad frame after the batch is answered next).
                continue;
            }
            // What is left in the buffer is an incomplete request: it counts against the
            // process budget, and over it this connection is refused.
            let decode_error = decode_error.or_else(|| {
                let total = self.requests.set(self.read_buf.len())?;
                budget::requests::refusals().inc();
                Some(DecodeError::Malformed(format!(
                    "Protocol error: the proxy holds {total} bytes of incomplete requests, over its max_buffered_request_bytes of {}: this request is refused and the connection closed",
                    budget::requests::budget()
                )))
            });
            if let Some(error) = decode_error {
                let reply = match &self.decoder {
                    Decoder::Redis(_) => {
                        let text = match &error {
                            DecodeError::FrameTooLarge { size, max } => format!(
                                "ERR Protocol error: request of at least {size} bytes exceeds the proxy's max_frame_size_bytes of {max}"
                            ),
                            DecodeError::Malformed(msg) => format!("ERR {msg}"),
                        };
                        Message::error_reply(0, &text).into_bytes()
                    }
                    Decoder::Cql(decoder) => decoder.error_reply(&self.read_buf, &error),
                };
                tracing::debug!(error = %error, "closing the connection after a protocol error");
                let _ = self.write_all_now(reply).await;
                return Ended::ProtocolError(error);
            }
            if self.read_buf.is_empty() && self.read_buf.capacity() > SHRINK_ABOVE {
                self.read_buf = BytesMut::new();
            }
            if self.read_buf.capacity() - self.read_buf.len() < 1024 {
                self.read_buf.reserve(8 * 1024);
            }
            tokio::select! {
                biased;
                _ = settings.shutdown.cancelled() => {
                    // What was read is answered by the batch above; let held requests go.
                    if let Some(ended) = self.run_batch(Vec::new(), true).await {
                        return ended;
                    }
                    // CQL answers arrive on their own: wait for those still in flight. The
                    // process's grace period bounds this wait.
                    while self.answers_awaited() {
                        if !self.backlog {
                            tokio::select! {
                                _ = settings.force_run.notified() => {}
                                _ = self.chain.ready() => {}
                            }
                        }
                        if let Some(ended) = self.run_batch(Vec::new(), true).await {
                            return ended;
                        }
                    }
                    return Ended::Shutdown;
                }
                read = self.stream.read_buf(&mut self.read_buf) => match read {
                    Ok(0) => {
                        // Every complete request was answered above; let held ones go. (A
                        // client that only shut down its sending side loses answers still
                        // held back by the reply cap, as Redis frees a client at EOF.)
                        let _ = self.run_batch(Vec::new(), true).await;
                        return Ended::ClientClosed;
                    }
                    Ok(_) => {}
                    Err(e) => return Ended::Io(e),
                },
                _ = settings.force_run.notified() => {
                    if let Some(ended) = self.run_batch(Vec::new(), false).await {
                        return ended;
                    }
                    // Pushes delivered to a subscriber count as activity.
                    if let Some(timeout) = settings.idle_timeout {
                        idle.as_mut().reset(tokio::time::Instant::now() + timeout);
                    }
                }
                _ = self.chain.ready() => {
                    if let Some(ended) = self.run_batch(Vec::new(), false).await {
                        return ended;
                    }
                    // Pushes delivered to a subscriber count as activity.
                    if let Some(timeout) = settings.idle_timeout {
                        idle.as_mut().reset(tokio::time::Instant::now() + timeout);
                    }
                }
                _ = &mut idle, if settings.idle_timeout.is_some() => return Ended::IdleTimeout,
                event = follow_event(&mut self.follow) => match event {
                    // Handled at the top of the loop.
                    Event::Changed => {}
                    Event::Deadline => {
                        if let Some(follow) = &mut self.follow {
                            follow.retire();
                        }
                        self.fail_pending("shotover: the topology was reloaded and this connection could not move to the new chain within the drain deadline");
                        let _ = self.flush_writes().await;
                        return Ended::Retired;
                    }
                },
            }
        }
    }

    /// Splits every complete request off the read buffer; stops at the first bad frame.
    fn decode_batch(&mut self) -> (Messages, Option<DecodeError>) {
        let mut batch = Vec::new();
        loop {
            let id = self.next_id;
            let decoded = match &mut self.decoder {
                Decoder::Redis(decoder) => match decoder.decode(&mut self.read_buf) {
                    Ok(Some(redis::Request::Frame(bytes))) => Ok(Some(Message::request(id, bytes))),
                    Ok(Some(redis::Request::Ignored)) => continue,
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                },
                Decoder::Cql(decoder) => decoder
                    .decode(&mut self.read_buf)
                    .map(|r| r.map(|request| Message::cql_request(id, request))),
            };
            match decoded {
                Ok(Some(mut message)) => {
                    if let Some(follow) = &mut self.follow {
                        match self.decoder {
                            Decoder::Redis(_) => follow.session.observe_redis(&mut message),
                            Decoder::Cql(_) => follow.session.observe_cql(&message),
                        }
                    }
                    self.next_id += 1;
                    batch.push(message);
                }
                Ok(None) => return (batch, None),
                Err(e) => return (batch, Some(e)),
            }
        }
    }

    /// Whether requests sent into the chain still wait for their answer: CQL answers come
    /// on their own; a Redis batch is answered within its run unless the sink holds part of
    /// its answers back.
    fn answers_awaited(&self) -> bool {
        match &self.pending {
            Pending::InOrder { .. } => self.backlog,
            Pending::ById(map) => !map.is_empty(),
        }
    }

    /// Runs one batch and writes what comes back. `Some` when the connection must end.
    async fn run_batch(&mut self, batch: Messages, flush: bool) -> Option<Ended> {
        match &mut self.pending {
            Pending::InOrder { queue, .. } => queue.extend(batch.iter().map(|m| m.id)),
            Pending::ById(map) => map.extend(batch.iter().map(|m| (m.id, m.reply_to()))),
        }
        // While the chain works, keep reading the client: requests read ahead make the next
        // batch, and a client that goes away is noticed at once. Its in-flight requests are
        // then abandoned with their upstream connection, as Redis frees a client that
        // disconnects (a blocked BLPOP must not pop an element nobody will receive).
        let Handler {
            stream,
            chain,
            read_buf,
            ..
        } = self;
        let result = {
            let process = chain.process(batch, flush, true);
            tokio::pin!(process);
            loop {
                if read_buf.capacity() - read_buf.len() < 1024 {
                    read_buf.reserve(8 * 1024);
                }
                tokio::select! {
                    biased;
                    result = &mut process => break result,
                    read = stream.read_buf(read_buf), if read_buf.len() < READ_AHEAD => match read {
                        Ok(0) => return Some(Ended::ClientGone),
                        Ok(_) => {}
                        Err(e) => return Some(Ended::Io(e)),
                    },
                }
            }
        };
        match result {
            Ok(processed) => {
                self.backlog = processed.more;
                self.emit(processed.responses);
                if let Err(e) = self.flush_writes().await {
                    return Some(Ended::Io(e));
                }
                processed.close_client.then_some(Ended::ClosedByTransform)
            }
            Err(error) => {
                // Every request still waiting gets an error reply, then the connection closes.
                self.fail_pending(&format!("shotover: {error}"));
                let _ = self.flush_writes().await;
                Some(Ended::ChainFailed(error))
            }
        }
    }

    /// Queues an error reply with `text` for every request still waiting for its answer.
    fn fail_pending(&mut self, text: &str) {
        let mut pending: Vec<(MessageId, ReplyTo)> = match &self.pending {
            Pending::InOrder { queue, .. } => {
                queue.iter().map(|id| (*id, ReplyTo::Redis)).collect()
            }
            Pending::ById(map) => map.iter().map(|(id, to)| (*id, *to)).collect(),
        };
        pending.sort_unstable_by_key(|(id, _)| *id);
        let replies = pending
            .into_iter()
            .map(|(id, to)| Message::error(id, to, ErrorKind::Server, text))
            .collect();
        self.emit(replies);
    }

    /// Queues responses for writing: in request order for Redis, as they come for CQL (in
    /// v5 segments once the client's handshake is answered).
    fn emit(&mut self, responses: Messages) {
        let Handler {
            outbox,
            decoder,
            to_segment,
            follow,
            pending,
            ..
        } = self;
        let mut push = |response: Message| match decoder {
            Decoder::Redis(_) => outbox.push(response.into_bytes()),
            Decoder::Cql(cql) => {
                if cql.segments().is_some() {
                    to_segment.push(response.into_bytes());
                    return;
                }
                let header = response.cql().map(|meta| meta.header);
                outbox.push(response.into_bytes());
                if let Some(header) = header {
                    cql.answered(&header);
                }
            }
        };
        for response in responses {
            if let Some(follow) = follow
                && follow.session.awaits_answers()
                && let Some(id) = response.request_id
            {
                follow.session.answered(id, response.is_error());
            }
            match (&mut *pending, response.request_id) {
                (_, None) => push(response),
                (Pending::ById(map), Some(id)) => {
                    if map.remove(&id).is_some() {
                        push(response);
                    } else {
                        tracing::debug!(
                            request_id = id,
                            "dropping a response to no pending request"
                        )
                    }
                }
                (Pending::InOrder { queue, held }, Some(id)) if queue.front() == Some(&id) => {
                    queue.pop_front();
                    push(response);
                    while !held.is_empty()
                        && let Some(next) = queue.front()
                    {
                        let Some(next) = held.remove(next) else {
                            break;
                        };
                        queue.pop_front();
                        push(next);
                    }
                }
                // `queue` is in id order.
                (Pending::InOrder { queue, held }, Some(id))
                    if queue.binary_search(&id).is_ok() =>
                {
                    held.insert(id, response);
                }
                (Pending::InOrder { .. }, Some(id)) => {
                    tracing::debug!(request_id = id, "dropping a response to no pending request")
                }
            }
        }
        if !to_segment.is_empty()
            && let Decoder::Cql(cql) = decoder
            && let Some(codec) = cql.segments()
        {
            outbox.push(codec.encode_all(to_segment));
            to_segment.clear();
        }
    }

    async fn flush_writes(&mut self) -> std::io::Result<()> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        // Replies waiting for the client count against the process's budget.
        let _held = Held::new(self.outbox.len());
        let write = self.outbox.write_to(&mut self.stream);
        match self.write_timeout {
            None => write.await,
            Some(limit) => tokio::time::timeout(limit, write)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client did not read its replies within the idle timeout",
                    ))
                }),
        }
    }

    async fn write_all_now(&mut self, bytes: bytes::Bytes) -> std::io::Result<()> {
        self.outbox.push(bytes);
        self.flush_writes().await
    }
}
