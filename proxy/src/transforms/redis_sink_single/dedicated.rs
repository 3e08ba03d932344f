//! One upstream connection that belongs to one client connection: the whole of
//! `RedisSinkSingle` without `connection_count`, and the connection a client is pinned to in
//! shared mode while its session state needs one (see `shared.rs`).
//!
//! The batch is written in one go and the replies are read straight off the socket in the
//! same task: no channel hop on the request path. [`ReplyTracker`] follows the RESP state
//! that decides which frames answer which request. Once the connection can receive frames
//! nobody asked for (it subscribed, ran MONITOR or turned on CLIENT TRACKING), a reader task
//! takes over the socket's read half and wakes the chain for each frame, so pushes reach the
//! client while it sends nothing.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use super::replies::ReplyTracker;
use super::{MAX_RESPONSE, Shared, protocol_error};
use crate::budget::{self, Held};
use crate::chain::ChainError;
use crate::codec::redis::ResponseDecoder;
use crate::message::{Message, MessageId, Messages};
use crate::outbox::Outbox;
use crate::upstream::UpstreamStream;

/// Frames the reader task may queue ahead of the chain in streaming mode.
const STREAM_QUEUE: usize = 1024;

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
        frames: mpsc::Receiver<Queued>,
    },
    /// The upstream went away (after QUIT, or broken).
    Closed,
}

/// A freshly opened connection whose handshake was answered.
pub(crate) struct Opened {
    pub stream: UpstreamStream,
    pub read_buf: BytesMut,
    pub decoder: ResponseDecoder,
}

/// Why a connection could not be opened.
pub(crate) enum OpenError {
    /// TCP or TLS failed, or the server went away during the handshake.
    Unreachable(String),
    /// The server answered a handshake command with this error reply.
    Refused(Bytes),
}

/// Connects and runs `handshake` (AUTH, HELLO, SELECT, CLIENT SETNAME), each command's
/// reply read before the connection is used. The handshake is part of connecting: it has
/// the connect timeout too.
pub(crate) async fn open(shared: &Shared, handshake: &[Bytes]) -> Result<Opened, OpenError> {
    let limit = shared.upstream.connect_timeout;
    match tokio::time::timeout(limit, open_within(shared, handshake)).await {
        Ok(result) => result,
        Err(_) => Err(OpenError::Unreachable(format!(
            "did not answer the connection handshake within {} ms",
            limit.as_millis()
        ))),
    }
}

async fn open_within(shared: &Shared, handshake: &[Bytes]) -> Result<Opened, OpenError> {
    let mut stream = shared
        .upstream
        .connect()
        .await
        .map_err(|e| OpenError::Unreachable(format!("is unreachable: {e}")))?;
    let mut read_buf = BytesMut::with_capacity(8 * 1024);
    let mut decoder = ResponseDecoder::new(MAX_RESPONSE);
    if handshake.is_empty() {
        return Ok(Opened {
            stream,
            read_buf,
            decoder,
        });
    }
    let gone = |e: std::io::Error| OpenError::Unreachable(format!("failed: {e}"));
    let mut outbox = Outbox::default();
    for frame in handshake {
        outbox.push(frame.clone());
    }
    outbox.write_to(&mut stream).await.map_err(gone)?;
    let mut answered = 0;
    let mut refused = None;
    while answered < handshake.len() {
        match decoder.decode(&mut read_buf) {
            Ok(Some(reply)) => {
                answered += 1;
                if refused.is_none() && matches!(reply.first(), Some(b'-' | b'!')) {
                    refused = Some(reply);
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                return Err(OpenError::Unreachable(format!(
                    "sent a malformed reply: {e}"
                )));
            }
        }
        read_buf.reserve(4 * 1024);
        match stream.read_buf(&mut read_buf).await {
            Ok(0) => {
                return Err(OpenError::Unreachable(
                    "closed the connection during the handshake".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(gone(e)),
        }
    }
    if let Some(reply) = refused {
        let _ = stream.shutdown().await;
        return Err(OpenError::Refused(reply));
    }
    Ok(Opened {
        stream,
        read_buf,
        decoder,
    })
}

/// Opens a connection with `handshake`, sends `requests` and returns their replies (one
/// each), then closes it: for the cluster sink's `CLUSTER SLOTS` and `COMMAND`.
pub(crate) async fn exchange(
    shared: &Shared,
    handshake: &[Bytes],
    requests: &[Bytes],
) -> Result<Vec<Bytes>, String> {
    let limit = shared
        .upstream
        .connect_timeout
        .max(std::time::Duration::from_secs(5));
    let work = async {
        let Opened {
            mut stream,
            mut read_buf,
            mut decoder,
        } = open(shared, handshake).await.map_err(|e| match e {
            OpenError::Unreachable(what) => what,
            OpenError::Refused(reply) => {
                String::from_utf8_lossy(reply.strip_suffix(b"\r\n").unwrap_or(&reply)).into_owned()
            }
        })?;
        let mut outbox = Outbox::default();
        for r in requests {
            outbox.push(r.clone());
        }
        outbox
            .write_to(&mut stream)
            .await
            .map_err(|e| format!("failed: {e}"))?;
        let mut replies = Vec::with_capacity(requests.len());
        while replies.len() < requests.len() {
            match decoder.decode(&mut read_buf) {
                Ok(Some(reply)) => {
                    replies.push(reply);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("sent a malformed reply: {e}")),
            }
            read_buf.reserve(16 * 1024);
            match stream.read_buf(&mut read_buf).await {
                Ok(0) => return Err("closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("failed: {e}")),
            }
        }
        let _ = stream.shutdown().await;
        Ok(replies)
    };
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("did not answer within {} ms", limit.as_millis())),
    }
}

/// A frame the reader task queued, holding its share of the connection's reply cap and of
/// the process's budget until the sink takes it.
struct Queued {
    frame: Result<Bytes, ChainError>,
    _permit: Option<OwnedSemaphorePermit>,
    _held: Held,
}

pub(super) struct Dedicated {
    shared: Arc<Shared>,
    force_run: Arc<Notify>,
    conn: Conn,
    replies: ReplyTracker,
    outbox: Outbox,
    /// The last blocking request written (`BLPOP` ...), until its reply arrives: while it
    /// waits, `read_timeout` does not apply.
    blocking: Option<MessageId>,
}

impl Dedicated {
    /// Connects on the first request.
    pub fn lazy(shared: Arc<Shared>, force_run: Arc<Notify>) -> Self {
        Dedicated {
            shared,
            force_run,
            conn: Conn::NotConnected,
            replies: ReplyTracker::default(),
            outbox: Outbox::default(),
            blocking: None,
        }
    }

    /// Over a connection already opened (and handshaken: `resp3` says whether it speaks RESP3).
    pub fn over(shared: Arc<Shared>, force_run: Arc<Notify>, opened: Opened, resp3: bool) -> Self {
        Dedicated {
            shared,
            force_run,
            conn: Conn::Direct {
                stream: opened.stream,
                read_buf: opened.read_buf,
                decoder: opened.decoder,
            },
            replies: ReplyTracker::with_resp3(resp3),
            outbox: Outbox::default(),
            blocking: None,
        }
    }

    /// Whether the connection carries no session state a shared connection lacks: no
    /// transaction, subscription, MONITOR, tracking or silenced replies.
    pub fn clean(&self) -> bool {
        self.replies.clean()
    }

    /// Whether replies to requests already written are still to come (a `partial` run
    /// stopped at the reply cap).
    pub fn backlog(&self) -> bool {
        self.replies.waiting() && !matches!(self.conn, Conn::Closed | Conn::NotConnected)
    }

    /// Sends `requests` and returns their responses, in the order the frames arrived. With
    /// `partial`, it stops once the replies it read reach the reply cap (or the process is
    /// over its budget): [`Self::backlog`] then says that more are to come, and the next
    /// runs (with or without requests) read them. Sets `close_client` when the client
    /// connection must close (QUIT, or a broken upstream).
    pub async fn run(
        &mut self,
        requests: Messages,
        close_client: &mut bool,
        partial: bool,
    ) -> Messages {
        let mut responses = Vec::with_capacity(requests.len());
        if requests.is_empty() && !self.backlog() {
            if let Err(e) = self.drain_queued(&mut responses) {
                return self.broke(e, responses, close_client);
            }
            return responses;
        }
        if requests.is_empty() {
            return self.read_replies(responses, close_client, partial).await;
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
                    return self
                        .shared
                        .unreachable(&requests, &format!("is unreachable: {e}"));
                }
            }
        }
        if matches!(self.conn, Conn::Closed) {
            for request in &requests {
                self.replies.expect_one(request.id);
            }
            return self.broke(self.closed(), responses, close_client);
        }
        if let Err(e) = self.write(requests, &mut responses).await {
            return self.broke(e, responses, close_client);
        }
        self.read_replies(responses, close_client, partial).await
    }

    /// Reads the replies of the requests written, up to the reply cap when `partial`.
    async fn read_replies(
        &mut self,
        mut responses: Messages,
        close_client: &mut bool,
        partial: bool,
    ) -> Messages {
        let cap = self.shared.reply_cap;
        let mut read = 0;
        let mut tally = budget::Tally::default();
        while self.replies.waiting() {
            if partial && read > 0 && (read >= cap || budget::over()) {
                return responses;
            }
            let frame = match self.next_frame().await {
                Ok(frame) => frame,
                // After QUIT the server closes the connection: requests pipelined behind it
                // are not answered, as with Redis itself.
                Err(ChainError::UpstreamClosed { .. }) if self.replies.quit() => {
                    self.replies.forget_pending();
                    break;
                }
                Err(e) => return self.broke(e, responses, close_client),
            };
            read += frame.len();
            tally.add(frame.len());
            self.replies.classify(frame, &mut responses);
            if let Some(blocking) = self.blocking
                && responses.last().and_then(|r| r.request_id) >= Some(blocking)
            {
                self.blocking = None;
            }
        }
        if !self.replies.quit()
            && let Err(e) = self.drain_queued(&mut responses)
        {
            return self.broke(e, responses, close_client);
        }
        if self.replies.quit() {
            *close_client = true;
            self.conn = Conn::Closed;
        } else if self.replies.unsolicited_possible() {
            self.start_streaming();
        }
        responses
    }

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
        let watch_blocking = self.shared.read_timeout.is_some();
        for mut request in requests {
            if !self.replies.expect(&mut request) {
                responses.push(Message::response(Some(request.id), Bytes::new()));
            } else if watch_blocking && super::blocks(&mut request) {
                self.blocking = Some(request.id);
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
        close_client: &mut bool,
    ) -> Messages {
        let text = format!("ERR shotover: {error}");
        let failed = self.replies.fail_pending(&text, &mut responses);
        tracing::warn!(
            upstream = %self.shared.upstream.address,
            error = %error,
            failed,
            "upstream connection broke: replies already received were passed on, pending requests got an error reply, and the client connection is closed"
        );
        *close_client = true;
        self.conn = Conn::Closed;
        responses
    }

    /// The next frame; with `read_timeout`, an error when nothing at all arrives within it
    /// (unless a blocking command waits).
    async fn next_frame(&mut self) -> Result<Bytes, ChainError> {
        match self.shared.read_timeout {
            Some(limit) if self.blocking.is_none() => {
                let addr = self.shared.upstream.address.clone();
                tokio::time::timeout(limit, self.next_frame_now())
                    .await
                    .unwrap_or_else(|_| {
                        Err(ChainError::UpstreamIo {
                            addr,
                            source: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "no reply within the read_timeout of {} s",
                                    limit.as_secs()
                                ),
                            ),
                        })
                    })
            }
            _ => self.next_frame_now().await,
        }
    }

    async fn next_frame_now(&mut self) -> Result<Bytes, ChainError> {
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
                Some(queued) => queued.frame,
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
                    Ok(queued) => queued.frame?,
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
            self.shared.reply_cap,
        ));
        self.conn = Conn::Streaming { writer, frames: rx };
    }
}

/// The reader task of streaming mode: frames off the socket, into the queue, waking the
/// chain. The queue holds at most `cap` bytes (and one frame larger than that): past it the
/// task stops reading, and Redis applies its output buffer limits (for pub/sub clients,
/// `client-output-buffer-limit pubsub`). Ends when the upstream closes or the sink goes away.
async fn read_frames(
    mut reader: ReadHalf<UpstreamStream>,
    mut buf: BytesMut,
    mut decoder: ResponseDecoder,
    tx: mpsc::Sender<Queued>,
    force_run: Arc<Notify>,
    addr: String,
    cap: usize,
) {
    let room = Arc::new(Semaphore::new(cap));
    let send = |frame: Result<Bytes, ChainError>, permit| Queued {
        _held: Held::new(frame.as_ref().map_or(0, |f| f.len())),
        frame,
        _permit: permit,
    };
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let want = frame.len().clamp(1, cap.min(u32::MAX as usize)) as u32;
                    let permit = tokio::select! {
                        permit = room.clone().acquire_many_owned(want) => permit.ok(),
                        _ = tx.closed() => return,
                    };
                    if tx.send(send(Ok(frame), permit)).await.is_err() {
                        return;
                    }
                    force_run.notify_one();
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(send(Err(protocol_error(&addr, e)), None)).await;
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
                let _ = tx
                    .send(send(Err(ChainError::UpstreamClosed { addr }), None))
                    .await;
                force_run.notify_one();
                return;
            }
            Err(source) => {
                let _ = tx
                    .send(send(Err(ChainError::UpstreamIo { addr, source }), None))
                    .await;
                force_run.notify_one();
                return;
            }
        }
    }
}
