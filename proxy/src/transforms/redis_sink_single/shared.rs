//! Shared upstream connections: a pool per configured sink, of *lanes* keyed by what a
//! connection's session is (user, password, protocol, database), each with up to
//! `connection_count` connections opened on demand.
//!
//! A connection is driven by two tasks over the split stream, so a long write never stops
//! replies from being read. The writer takes batches (the stateless run of one client's
//! batch) from a bounded queue, and everything queued while it wrote the previous ones goes
//! out in one write: Redis sees a pipeline. Each batch's slot enters the reader's FIFO
//! before its bytes are written; the reader gives each slot as many replies as it has
//! requests, in order, and hands them to the waiting client. Only requests answered by
//! exactly one reply travel here (everything else pins its client, see `session.rs`); a
//! RESP3 push that still arrives answers nobody and is counted and dropped.
//!
//! A client has at most one batch in flight, so batches of one client may use different
//! connections without reordering. A client that goes away leaves its slot behind: the
//! reader reads and drops its replies, and the writer skips its batch if it was not written
//! yet. When a connection fails, the requests written on it get an error (they may have
//! run), those not written yet get an error saying so, and the next batch opens a new
//! connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::dedicated::{self, OpenError, Opened};
use crate::budget::{self, Held};
use crate::codec::redis::ResponseDecoder;
use crate::codec::redis::frame::RedisFrame;
use crate::metrics::{self, Counter, Gauge};
use crate::outbox::Outbox;
use crate::upstream::UpstreamStream;

/// Batches waiting for a connection's writer.
const QUEUE: usize = 4096;
/// Requests in flight on a shared connection before the next batch goes to another one.
/// A write carries batches up to about this many bytes.
const WRITE_CHUNK: usize = 256 * 1024;
/// Most lanes (distinct credentials, protocols and databases) a pool keeps; a client that
/// would need another one gets a dedicated connection instead.
pub const MAX_LANES: usize = 64;

/// What a connection's session is: everything a command could change that later replies
/// depend on, and that the proxy can restore on a new connection with a handshake.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct LaneKey {
    pub user: Option<Bytes>,
    pub password: Option<Bytes>,
    pub resp3: bool,
    pub db: u32,
}

impl std::fmt::Debug for LaneKey {
    // The password stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneKey")
            .field(
                "user",
                &self.user.as_ref().map(|u| String::from_utf8_lossy(u)),
            )
            .field("authenticated", &self.password.is_some())
            .field("resp3", &self.resp3)
            .field("db", &self.db)
            .finish()
    }
}

impl LaneKey {
    /// The commands that put a fresh connection in this lane's state, and name it.
    pub fn handshake(&self, name: Option<&Bytes>) -> Vec<Bytes> {
        let mut out = Vec::new();
        let name = name.filter(|n| !n.is_empty());
        if self.resp3 {
            let mut args: Vec<Bytes> = vec!["HELLO".into(), "3".into()];
            if let Some(password) = &self.password {
                args.push("AUTH".into());
                args.push(self.user.clone().unwrap_or_else(|| "default".into()));
                args.push(password.clone());
            }
            if let Some(name) = name {
                args.push("SETNAME".into());
                args.push(name.clone());
            }
            out.push(RedisFrame::command(args).to_bytes());
        } else {
            if let Some(password) = &self.password {
                let mut args: Vec<Bytes> = vec!["AUTH".into()];
                args.extend(self.user.clone());
                args.push(password.clone());
                out.push(RedisFrame::command(args).to_bytes());
            }
            if let Some(name) = name {
                out.push(
                    RedisFrame::command([Bytes::from("CLIENT"), "SETNAME".into(), name.clone()])
                        .to_bytes(),
                );
            }
        }
        if self.db != 0 {
            out.push(
                RedisFrame::command([Bytes::from("SELECT"), self.db.to_string().into()]).to_bytes(),
            );
        }
        out
    }
}

#[derive(Clone)]
pub struct PoolMetrics {
    /// Shared connections open.
    pub connections: Gauge,
    /// Clients pinned to a dedicated connection.
    pub pinned: Gauge,
    /// Times a client was pinned.
    pub pins: Counter,
    /// Pushes that arrived on a shared connection (answer nobody; dropped).
    pub stray: Counter,
    /// Clients disconnected for holding their cap of replies too long.
    pub cut_off: Counter,
}

/// The shared connections of one configured sink.
pub struct Pool {
    pub shared: Arc<Shared>,
    per_lane: usize,
    /// Shared connections are named this (`CLIENT SETNAME`), so they can be told apart in
    /// `CLIENT LIST`.
    conn_name: Bytes,
    /// Sent after a lane's handshake on each new shared connection (`READONLY` for a
    /// cluster replica).
    suffix: Vec<Bytes>,
    /// By worker thread ([`crate::runtime::worker`]; all 0 without `--thread-per-core`)
    /// and session: with `--thread-per-core`, each thread has its own connections, so a
    /// request and its reply never cross threads.
    lanes: Mutex<HashMap<(usize, LaneKey), Arc<Lane>>>,
    pub metrics: PoolMetrics,
}

impl Pool {
    pub fn new(shared: Arc<Shared>, per_lane: usize, chain: &str, transform: &str) -> Pool {
        let labels = [("chain", chain), ("transform", transform)];
        let clean: String = transform
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect();
        Pool {
            shared,
            per_lane,
            conn_name: format!("shotover-shared-{clean}").into(),
            suffix: Vec::new(),
            lanes: Mutex::new(HashMap::new()),
            metrics: PoolMetrics {
                connections: metrics::gauge(
                    "shotover_redis_shared_connections",
                    "Shared upstream connections open (RedisSinkSingle with connection_count).",
                    &labels,
                ),
                pinned: metrics::gauge(
                    "shotover_redis_pinned_connections",
                    "Client connections pinned to a dedicated upstream connection by their session state.",
                    &labels,
                ),
                pins: metrics::counter(
                    "shotover_redis_pins_count",
                    "Times a client connection was pinned to a dedicated upstream connection by its session state.",
                    &labels,
                ),
                stray: metrics::counter(
                    "shotover_redis_shared_stray_pushes_count",
                    "RESP3 pushes that arrived on a shared upstream connection and were dropped.",
                    &labels,
                ),
                cut_off: metrics::counter(
                    "shotover_redis_shared_cut_off_count",
                    "Clients disconnected because they held max_buffered_reply_bytes of replies from a shared connection for too long.",
                    &labels,
                ),
            },
        }
    }

    /// Commands every new shared connection runs after its lane's handshake.
    pub fn with_handshake_suffix(mut self, suffix: Vec<Bytes>) -> Pool {
        self.suffix = suffix;
        self
    }

    /// The lane of `key` on this worker thread, created if `may_create`; `None` when it does
    /// not exist and may not be created, or the thread already has [`MAX_LANES`] lanes.
    pub fn lane(&self, key: &LaneKey, may_create: bool) -> Option<Arc<Lane>> {
        let worker = crate::runtime::worker();
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let id = (worker, key.clone());
        if let Some(lane) = lanes.get(&id) {
            return Some(lane.clone());
        }
        if !may_create || lanes.keys().filter(|(w, _)| *w == worker).count() >= MAX_LANES {
            return None;
        }
        let lane = Arc::new(Lane {
            key: key.clone(),
            slots: (0..self.per_lane).map(|_| Slot::default()).collect(),
        });
        lanes.insert(id, lane.clone());
        Some(lane)
    }

    /// Drops `key`'s lane if it has no connection (its handshake was refused).
    pub fn forget_if_unused(&self, key: &LaneKey) {
        let id = (crate::runtime::worker(), key.clone());
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.get(&id).is_some_and(|lane| lane.unused()) {
            lanes.remove(&id);
        }
    }
}

/// The shared connections of one session kind.
pub struct Lane {
    key: LaneKey,
    slots: Box<[Slot]>,
}

#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Arc<ConnHandle>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn live(&self) -> Option<Arc<ConnHandle>> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.as_ref().filter(|c| c.is_live()).cloned()
    }
}

impl Lane {
    fn unused(&self) -> bool {
        self.slots.iter().all(|s| s.live().is_none())
    }

    /// The connection to send on: the first idle one; else a new one while the lane has
    /// fewer than `connection_count`; else the least loaded. (Filling one connection before
    /// using the next gives Redis longer pipelines but measured slower: with two, each has
    /// a reader task, and both worker threads read replies.)
    pub async fn pick(&self, pool: &Pool) -> Result<Arc<ConnHandle>, OpenError> {
        let mut best: Option<(usize, Arc<ConnHandle>)> = None;
        let mut empty = None;
        for (i, slot) in self.slots.iter().enumerate() {
            match slot.live() {
                Some(conn) => {
                    let load = conn.in_flight.load(Ordering::Relaxed);
                    if load == 0 {
                        return Ok(conn);
                    }
                    if best.as_ref().is_none_or(|(l, _)| load < *l) {
                        best = Some((load, conn));
                    }
                }
                None if empty.is_none() => empty = Some(i),
                None => {}
            }
        }
        let slot = match (&best, empty) {
            (Some((_, conn)), None) => return Ok(conn.clone()),
            (_, Some(i)) => &self.slots[i],
            (None, None) => unreachable!("a lane has at least one slot"),
        };
        let _connecting = slot.connecting.lock().await;
        if let Some(conn) = slot.live() {
            return Ok(conn);
        }
        let mut handshake = self.key.handshake(Some(&pool.conn_name));
        handshake.extend(pool.suffix.iter().cloned());
        match dedicated::open(&pool.shared, &handshake).await {
            Ok(opened) => {
                let conn = spawn(opened, pool);
                *slot.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                Ok(conn)
            }
            Err(e) => match best {
                Some((_, conn)) => Ok(conn),
                None => Err(e),
            },
        }
    }
}

/// How long a shared connection's reader waits for a client to take replies when the
/// client already holds its cap of them; then the client is cut off, so that it cannot
/// stall the clients it shares the connection with.
pub const STALL: Duration = Duration::from_secs(1);
/// Reply bytes a batch may hand to its client without taking room in its cap.
const SLACK: usize = 64 * 1024;
/// Added to `read_timeout` on shared connections: the longest `WAIT` they carry.
const SHARED_WAIT_ALLOWANCE: Duration = Duration::from_millis(super::session::MAX_SHARED_WAIT_MS);

/// What a client receives from shared connections: replies in order, in chunks.
pub enum Chunk {
    /// The next replies. The permit is the client's room they take; the bytes count
    /// against the process budget until dropped.
    Frames {
        frames: Vec<Bytes>,
        _room: Option<OwnedSemaphorePermit>,
        _held: Held,
    },
    /// The batch in flight failed: its replies not received yet will not come. `cut_off`:
    /// the client held its cap of replies too long and must be disconnected.
    Failed { text: String, cut_off: bool },
}

/// Where a client's replies go: one per client connection, for all its batches (it has one
/// in flight at a time).
pub struct Mailbox {
    tx: mpsc::UnboundedSender<Chunk>,
    /// Room for the client's replies: `max_buffered_reply_bytes` permits.
    room: Arc<Semaphore>,
    cap: usize,
}

impl Mailbox {
    pub fn new(cap: usize) -> (Mailbox, mpsc::UnboundedReceiver<Chunk>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mailbox = Mailbox {
            tx,
            room: Arc::new(Semaphore::new(cap)),
            cap,
        };
        (mailbox, rx)
    }

    fn clone_for_batch(&self) -> Mailbox {
        Mailbox {
            tx: self.tx.clone(),
            room: self.room.clone(),
            cap: self.cap,
        }
    }
}

/// One client batch for a shared connection; answered with one reply per frame, or with
/// an error, through the client's mailbox.
struct Batch {
    frames: Vec<Bytes>,
    to: Mailbox,
}

/// A batch written and waiting for its replies.
struct Waiting {
    count: usize,
    got: usize,
    to: Mailbox,
    /// Replies read and not handed over yet, with the room they take.
    chunk: Vec<Bytes>,
    chunk_bytes: usize,
    permit: Option<OwnedSemaphorePermit>,
    /// Bytes of this batch's replies taken so far, and how many of them took room: up to
    /// [`SLACK`] per batch may go without.
    received: usize,
    permitted: usize,
    /// The client went away or was cut off: the rest of its replies are dropped.
    dropped: bool,
}

impl Waiting {
    fn new(count: usize, to: Mailbox) -> Self {
        Waiting {
            count,
            got: 0,
            to,
            chunk: Vec::with_capacity(count),
            chunk_bytes: 0,
            permit: None,
            received: 0,
            permitted: 0,
            dropped: false,
        }
    }

    /// Hands the replies read so far to the client.
    fn hand_over(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let chunk = Chunk::Frames {
            frames: std::mem::take(&mut self.chunk),
            _room: self.permit.take(),
            _held: Held::new(std::mem::take(&mut self.chunk_bytes)),
        };
        if self.to.tx.send(chunk).is_err() {
            self.dropped = true;
        }
    }

    fn fail(&mut self, text: String, cut_off: bool) {
        self.chunk.clear();
        self.permit = None;
        self.dropped = true;
        let _ = self.to.tx.send(Chunk::Failed { text, cut_off });
    }

    /// Takes one reply, waiting (at most [`STALL`]) for room in the client's cap. Replies
    /// take room only once those not covered reach [`SLACK`], so small batches never touch
    /// the client's semaphore.
    async fn take(&mut self, frame: Bytes, metrics: &PoolMetrics) {
        self.got += 1;
        if self.dropped || self.to.tx.is_closed() {
            self.dropped = true;
            return;
        }
        // Over the process budget, every reply takes room: no slack.
        let over = budget::over();
        let uncovered = (self.received + frame.len()).saturating_sub(self.permitted);
        if uncovered < SLACK && !over {
            self.push(frame);
            return;
        }
        let max = self.to.cap.min(u32::MAX as usize);
        let want = uncovered.clamp(1, max);
        let permit = match self.to.room.clone().try_acquire_many_owned(want as u32) {
            Ok(permit) => (permit, want),
            Err(_) => {
                // Hand over what is read, then wait for room for this reply alone.
                self.hand_over();
                let want = frame.len().clamp(1, max);
                let room = self.to.room.clone();
                let acquired = tokio::select! {
                    permit = room.acquire_many_owned(want as u32) => permit.ok(),
                    _ = self.to.tx.closed() => None,
                    _ = tokio::time::sleep(STALL) => None,
                };
                match acquired {
                    Some(permit) => (permit, want),
                    None if self.to.tx.is_closed() => {
                        self.dropped = true;
                        return;
                    }
                    None => {
                        metrics.cut_off.inc();
                        self.fail(
                            format!(
                                "the client did not read its replies: it held {} bytes of them for {} s, and a shared connection cannot wait for it (use a connection of its own: leave connection_count out)",
                                self.to.cap,
                                STALL.as_secs()
                            ),
                            true,
                        );
                        return;
                    }
                }
            }
        };
        let (permit, covered) = permit;
        self.permitted += covered;
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.push(frame);
    }

    fn push(&mut self, frame: Bytes) {
        self.received += frame.len();
        self.chunk_bytes += frame.len();
        self.chunk.push(frame);
    }
}

impl Drop for Waiting {
    /// A batch dropped before it was answered (its connection's task ended without failing
    /// it, say by a panic) still gets an answer: its client must not wait forever.
    fn drop(&mut self) {
        if self.got < self.count && !self.dropped {
            self.hand_over();
            let _ = self.to.tx.send(Chunk::Failed {
                text: "the shared connection stopped (the requests may have run)".into(),
                cut_off: false,
            });
        }
    }
}

/// A shared connection, as the clients see it.
pub struct ConnHandle {
    tx: mpsc::Sender<Batch>,
    /// Requests queued or written and not answered yet.
    in_flight: Arc<AtomicUsize>,
    /// Cancelled as soon as the connection fails, before its requests get their errors: a
    /// client that sends again on reading them finds the connection gone, not dying.
    failed: CancellationToken,
}

impl ConnHandle {
    pub fn is_live(&self) -> bool {
        !self.tx.is_closed() && !self.failed.is_cancelled()
    }

    /// Queues `frames`; their replies arrive in `to`, in order. `Err` when the connection
    /// closed before they could be queued.
    pub async fn send(&self, frames: Vec<Bytes>, to: &Mailbox) -> Result<(), String> {
        let n = frames.len();
        self.in_flight.fetch_add(n, Ordering::Relaxed);
        let batch = Batch {
            frames,
            to: to.clone_for_batch(),
        };
        if self.tx.send(batch).await.is_err() {
            self.in_flight.fetch_sub(n, Ordering::Relaxed);
            return Err("closed the shared connection before the requests were sent".into());
        }
        Ok(())
    }
}

fn spawn(opened: Opened, pool: &Pool) -> Arc<ConnHandle> {
    let Opened {
        stream,
        read_buf,
        decoder,
    } = opened;
    match stream {
        // Owned halves: no lock between the reader and the writer.
        UpstreamStream::Tcp(tcp) => {
            let (reader, writer) = tcp.into_split();
            spawn_halves(reader, writer, read_buf, decoder, pool)
        }
        tls @ UpstreamStream::Tls(_) => {
            let (reader, writer) = tokio::io::split(tls);
            spawn_halves(reader, writer, read_buf, decoder, pool)
        }
    }
}

fn spawn_halves<R, W>(
    reader: R,
    writer: W,
    read_buf: BytesMut,
    decoder: ResponseDecoder,
    pool: &Pool,
) -> Arc<ConnHandle>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(QUEUE);
    let (slots_tx, slots_rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let addr = pool.shared.upstream.address.clone();
    pool.metrics.connections.inc();
    tokio::spawn(write_loop(
        writer,
        rx,
        slots_tx,
        in_flight.clone(),
        cancel.clone(),
    ));
    tokio::spawn(read_loop(
        reader,
        read_buf,
        decoder,
        slots_rx,
        in_flight.clone(),
        cancel.clone(),
        pool.metrics.clone(),
        addr,
        pool.shared.read_timeout,
    ));
    Arc::new(ConnHandle {
        tx,
        in_flight,
        failed: cancel,
    })
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Batch>,
    slots: mpsc::UnboundedSender<Waiting>,
    in_flight: Arc<AtomicUsize>,
    cancel: CancellationToken,
) {
    let mut outbox = Outbox::default();
    'run: loop {
        let first = tokio::select! {
            batch = rx.recv() => batch,
            _ = cancel.cancelled() => None,
        };
        let Some(first) = first else { break };
        // Let the other clients whose requests are ready run first (a task woken by a
        // client would otherwise run right after it, in the waker's LIFO slot), so their
        // batches join this write: Redis reads one pipeline instead of many small ones.
        tokio::task::yield_now().await;
        let mut next = Some(first);
        let mut bytes = 0;
        while let Some(batch) = next.take() {
            let count = batch.frames.len();
            if batch.to.tx.is_closed() {
                // Its client went away before it was written.
                in_flight.fetch_sub(count, Ordering::Relaxed);
            } else {
                for frame in batch.frames {
                    bytes += frame.len();
                    outbox.push(frame);
                }
                if let Err(mpsc::error::SendError(mut w)) =
                    slots.send(Waiting::new(count, batch.to))
                {
                    // The reader stopped: nothing more goes out on this connection.
                    in_flight.fetch_sub(count, Ordering::Relaxed);
                    w.fail(
                        "closed the shared connection before the requests were sent".into(),
                        false,
                    );
                    break 'run;
                }
            }
            if bytes >= WRITE_CHUNK {
                break;
            }
            next = rx.try_recv().ok();
        }
        if outbox.is_empty() {
            continue;
        }
        tokio::select! {
            written = outbox.write_to(&mut writer) => if written.is_err() { break },
            _ = cancel.cancelled() => break,
        }
    }
    cancel.cancel();
    rx.close();
    while let Ok(batch) = rx.try_recv() {
        in_flight.fetch_sub(batch.frames.len(), Ordering::Relaxed);
        let _ = batch.to.tx.send(Chunk::Failed {
            text: "closed the shared connection before the requests were sent".into(),
            cut_off: false,
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut buf: BytesMut,
    mut decoder: ResponseDecoder,
    mut slots: mpsc::UnboundedReceiver<Waiting>,
    in_flight: Arc<AtomicUsize>,
    cancel: CancellationToken,
    metrics: PoolMetrics,
    addr: String,
    read_timeout: Option<Duration>,
) {
    let mut current: Option<Waiting> = None;
    let error = 'run: loop {
        loop {
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => break 'run format!("sent a malformed response: {e}"),
            };
            if frame.first() == Some(&b'>') {
                metrics.stray.inc();
                continue;
            }
            let waiting = match current.as_mut() {
                Some(w) => w,
                None => match slots.try_recv() {
                    Ok(w) => current.insert(w),
                    Err(_) => {
                        break 'run "sent a reply to no request on a shared connection".to_string();
                    }
                },
            };
            waiting.take(frame, &metrics).await;
            if waiting.got == waiting.count
                && let Some(mut done) = current.take()
            {
                in_flight.fetch_sub(done.count, Ordering::Relaxed);
                done.hand_over();
            }
        }
        // Replies of a batch whose rest has not arrived yet go to their client now.
        if let Some(waiting) = current.as_mut() {
            waiting.hand_over();
        }
        if buf.is_empty() && buf.capacity() > 1024 * 1024 {
            buf = BytesMut::with_capacity(16 * 1024);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let waiting = current.is_some() || !slots.is_empty();
        // A WAIT on a shared connection may be silent for up to its longest allowed
        // timeout: the limit is read_timeout plus that.
        let timeout = async {
            match read_timeout {
                Some(limit) if waiting => tokio::time::sleep(limit + SHARED_WAIT_ALLOWANCE).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => break "closed the connection".to_string(),
                Ok(_) => {}
                Err(e) => break format!("failed: {e}"),
            },
            _ = cancel.cancelled() => break "the shared connection failed".to_string(),
            // A batch written while nothing was waiting: take it now, so that the read
            // timeout covers it. (Only then: it costs a wake-up per batch.)
            next = slots.recv(), if read_timeout.is_some() && current.is_none() && !slots.is_closed() => {
                if let Some(next) = next {
                    current = Some(next);
                }
            }
            _ = timeout => break format!(
                "sent no reply within the read_timeout of {} s",
                read_timeout.map_or(0, |t| t.as_secs())
            ),
        }
    };
    cancel.cancel();
    metrics.connections.dec();
    if current.is_some() || !slots.is_empty() {
        tracing::warn!(upstream = %addr, error = %error, "a shared upstream connection failed: the requests in flight on it got an error reply");
    } else {
        tracing::debug!(upstream = %addr, error = %error, "a shared upstream connection closed");
    }
    slots.close();
    // Each client's error reply names the upstream before this text.
    let text = format!("{error} (the requests may have run)");
    for mut waiting in current
        .into_iter()
        .chain(std::iter::from_fn(|| slots.try_recv().ok()))
    {
        in_flight.fetch_sub(waiting.count, Ordering::Relaxed);
        // What arrived still reaches the client; the rest fails.
        waiting.hand_over();
        waiting.fail(text.clone(), false);
    }
}
