//! A client connection's sink in shared mode: which of its requests may travel over a shared
//! connection, and the session state the proxy keeps for it instead of the upstream.
//!
//! Everything a shared connection can carry goes there: commands answered by exactly one
//! reply that change no connection state. Session commands are handled so that the client
//! sees what Redis would show it on a connection of its own:
//!
//! - `AUTH`, `HELLO 2|3 [AUTH ..]` and `SELECT` move the client to another *lane* (a set of
//!   shared connections opened with those credentials, protocol and database). The command
//!   is sent on the target lane, so Redis checks the credentials every time; the client
//!   moves only when it succeeds. `HELLO ... SETNAME` is sent without `SETNAME`.
//! - `CLIENT SETNAME`, `GETNAME` and `SETINFO` are answered by the proxy (the name is given
//!   to any dedicated connection the client gets); `QUIT` and `RESET` too.
//! - A transaction (`MULTI`, `WATCH`), a subscription, a blocking command (`BLPOP` and
//!   friends, `XREAD ... BLOCK`), `CLIENT REPLY OFF|SKIP` and `CLIENT TRACKING ON` pin the
//!   client to a dedicated connection, opened with its lane's handshake and name, until
//!   the state is gone (after `EXEC`/`DISCARD`/`UNWATCH`, the last unsubscribe, the blocking
//!   reply, `CLIENT REPLY ON`, `TRACKING OFF`). `MONITOR`, `READONLY`, `CLIENT NO-EVICT`,
//!   replication commands and a session change inside a transaction pin it until `RESET`;
//!   `CLIENT ID` and `CLIENT GETREDIR` for good (another client may redirect tracking to
//!   that id).
//! - `WAIT`/`WAITAOF` go to the shared connection that carried the client's last requests
//!   (its replication offset covers them); a timeout of 0 or above
//!   [`MAX_SHARED_WAIT_MS`] is refused unless the client is pinned, since it would hold a
//!   connection that other clients share.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::dedicated::{self, Dedicated, OpenError};
use super::shared::{Chunk, ConnHandle, Lane, LaneKey, Mailbox, Pool};
use crate::budget;
use crate::chain::{ChainError, ChainState, Transform};
use crate::codec::redis::command::{CommandKind, ReplyMode};
use crate::codec::redis::frame::RedisFrame;
use crate::message::{Message, MessageId, Messages};

/// Longest `WAIT`/`WAITAOF` timeout sent over a shared connection.
pub const MAX_SHARED_WAIT_MS: u64 = 1000;

/// What a request means for the session.
#[derive(Debug)]
enum Kind {
    /// One reply, no connection state: shareable.
    Shared,
    /// Needs a dedicated connection while the state it creates lasts.
    Pin,
    /// Needs a dedicated connection until `RESET`.
    PinUntilReset,
    /// Needs a dedicated connection for good (`CLIENT ID`, `CLIENT GETREDIR`).
    PinForGood,
    Multi,
    /// `EXEC` or `DISCARD`.
    EndMulti,
    Watch,
    Unwatch,
    Auth {
        user: Option<Bytes>,
        password: Bytes,
    },
    Hello {
        resp3: bool,
        auth: Option<(Bytes, Bytes)>,
        name: Option<Bytes>,
        /// The request without `SETNAME`, when it had one.
        without_name: Option<Bytes>,
    },
    Select(u32),
    SetName(Bytes),
    /// A `CLIENT SETNAME` Redis would refuse.
    BadName,
    GetName,
    SetInfo,
    Quit,
    Reset,
    /// `WAIT`/`WAITAOF` with its timeout in ms.
    Wait(u64),
}

/// [`classify`], for a sink of a cluster (`cluster`): there `ASKING` is sent by the cluster
/// sink itself, in the same batch as the request it is for, so it travels with it.
fn classify_for(cluster: bool, request: &mut Message) -> Kind {
    match classify(request) {
        Kind::PinUntilReset
            if cluster && request.command().name.eq_ignore_ascii_case(b"ASKING") =>
        {
            Kind::Shared
        }
        kind => kind,
    }
}

/// Reads what `request` means for the session.
fn classify(request: &mut Message) -> Kind {
    let command = request.command();
    let kind = command.kind;
    let argc = command.argc;
    let name = command.name.clone();
    if name.len() > 16 {
        return Kind::Shared;
    }
    let mut upper = [0u8; 16];
    let upper = &mut upper[..name.len()];
    upper.copy_from_slice(&name);
    upper.make_ascii_uppercase();
    match &*upper {
        b"MULTI" => Kind::Multi,
        b"EXEC" | b"DISCARD" => Kind::EndMulti,
        b"WATCH" => Kind::Watch,
        b"UNWATCH" => Kind::Unwatch,
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
        | b"SUNSUBSCRIBE" => Kind::Pin,
        b"MONITOR" | b"SYNC" | b"PSYNC" | b"REPLCONF" | b"READONLY" | b"READWRITE" | b"ASKING" => {
            Kind::PinUntilReset
        }
        b"WAIT" | b"WAITAOF" => {
            let at = if &*upper == b"WAIT" { 2 } else { 3 };
            match args(request).and_then(|a| a.get(at).and_then(|t| number(t))) {
                Some(timeout) => Kind::Wait(timeout),
                // Malformed: Redis answers with an error and changes nothing.
                None => Kind::Shared,
            }
        }
        b"QUIT" => Kind::Quit,
        b"RESET" => Kind::Reset,
        b"SELECT" => match args(request) {
            Some(a) if a.len() == 2 => match number(&a[1]).and_then(|n| u32::try_from(n).ok()) {
                Some(db) => Kind::Select(db),
                None => Kind::Shared,
            },
            _ => Kind::Shared,
        },
        b"AUTH" => match args(request) {
            Some(mut a) if a.len() == 2 => Kind::Auth {
                user: None,
                password: a.swap_remove(1),
            },
            Some(mut a) if a.len() == 3 => {
                let password = a.swap_remove(2);
                Kind::Auth {
                    user: Some(a.swap_remove(1)),
                    password,
                }
            }
            _ => Kind::Shared,
        },
        b"HELLO" => hello(request, argc),
        b"SCRIPT" => match command_arg1(request) {
            Some(a) if a.eq_ignore_ascii_case(b"DEBUG") => Kind::PinUntilReset,
            _ => Kind::Shared,
        },
        b"CLIENT" => client(request, kind, argc),
        blocking_command if super::blocking(blocking_command, request) => Kind::Pin,
        _ => Kind::Shared,
    }
}

fn client(request: &mut Message, kind: CommandKind, argc: usize) -> Kind {
    match kind {
        CommandKind::ClientReply(ReplyMode::Off | ReplyMode::Skip) => return Kind::Pin,
        CommandKind::ClientTracking(true) => return Kind::Pin,
        CommandKind::ClientReply(ReplyMode::On) | CommandKind::ClientTracking(false) => {
            return Kind::Shared;
        }
        _ => {}
    }
    let Some(sub) = command_arg1(request) else {
        return Kind::Shared;
    };
    let is = |s: &str| sub.eq_ignore_ascii_case(s.as_bytes());
    if is("ID") || is("GETREDIR") {
        Kind::PinForGood
    } else if is("NO-EVICT") || is("NO-TOUCH") {
        Kind::PinUntilReset
    } else if is("GETNAME") && argc == 1 {
        Kind::GetName
    } else if is("SETNAME") && argc == 2 {
        match args(request) {
            Some(mut a) if a.len() == 3 => {
                let name = a.swap_remove(2);
                if name.iter().all(|c| (b'!'..=b'~').contains(c)) {
                    Kind::SetName(name)
                } else {
                    Kind::BadName
                }
            }
            _ => Kind::Shared,
        }
    } else if is("SETINFO") && argc == 3 {
        match args(request) {
            Some(a)
                if a.len() == 4
                    && (a[2].eq_ignore_ascii_case(b"LIB-NAME")
                        || a[2].eq_ignore_ascii_case(b"LIB-VER"))
                    && a[3].iter().all(|c| (b'!'..=b'~').contains(c)) =>
            {
                Kind::SetInfo
            }
            _ => Kind::Shared,
        }
    } else {
        Kind::Shared
    }
}

/// `HELLO [protover [AUTH username password] [SETNAME clientname]]`. Anything the proxy does
/// not understand fully pins the client: a HELLO that changed a shared connection's
/// protocol would break it for everyone.
fn hello(request: &mut Message, argc: usize) -> Kind {
    if argc == 0 {
        return Kind::Shared;
    }
    let Some(args) = args(request) else {
        return Kind::Pin;
    };
    let resp3 = match &args[1][..] {
        b"2" => false,
        b"3" => true,
        // Redis answers NOPROTO and changes nothing.
        _ if number(&args[1]).is_some() => return Kind::Shared,
        _ => return Kind::Pin,
    };
    let (mut auth, mut name) = (None, None);
    let mut i = 2;
    while i < args.len() {
        let option = &args[i];
        if option.eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
            auth = Some((args[i + 1].clone(), args[i + 2].clone()));
            i += 3;
        } else if option.eq_ignore_ascii_case(b"SETNAME") && i + 1 < args.len() {
            name = Some(args[i + 1].clone());
            i += 2;
        } else {
            return Kind::Pin;
        }
    }
    let without_name = name.as_ref().map(|_| {
        let mut kept: Vec<Bytes> = vec![args[0].clone(), args[1].clone()];
        if let Some((user, password)) = &auth {
            kept.extend(["AUTH".into(), user.clone(), password.clone()]);
        }
        RedisFrame::command(kept).to_bytes()
    });
    if name
        .as_ref()
        .is_some_and(|n| !n.iter().all(|c| (b'!'..=b'~').contains(c)))
    {
        // Redis refuses the name and the whole HELLO; let it say so on a connection of the
        // client's own.
        return Kind::Pin;
    }
    Kind::Hello {
        resp3,
        auth,
        name,
        without_name,
    }
}

/// A request's arguments, the command name first.
fn args(request: &mut Message) -> Option<Vec<Bytes>> {
    match request.frame().ok()? {
        RedisFrame::Array(items) => items
            .iter()
            .map(|i| match i {
                RedisFrame::Bulk(b) | RedisFrame::Simple(b) => Some(b.clone()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn command_arg1(request: &mut Message) -> Option<Bytes> {
    request.command().arg1.clone()
}

fn number(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// The dedicated connection of a pinned client, counted while it lives.
struct Pinned {
    conn: Dedicated,
    pool: Arc<Pool>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.pool.metrics.pinned.dec();
    }
}

pub struct SharedSink {
    pool: Arc<Pool>,
    force_run: Arc<Notify>,
    lane: LaneKey,
    name: Option<Bytes>,
    pinned: Option<Pinned>,
    /// MULTI was sent and not ended (followed as the dedicated connection answers).
    in_multi: bool,
    watching: bool,
    pinned_until_reset: bool,
    pinned_for_good: bool,
    /// The shared connection of the client's last batch, for `WAIT`.
    last: Option<Arc<ConnHandle>>,
    /// The lane last used, so that a batch does not look it up in the pool.
    lane_handle: Option<(LaneKey, Arc<Lane>)>,
    /// Where this client's replies from shared connections arrive.
    mailbox: Mailbox,
    replies: mpsc::UnboundedReceiver<Chunk>,
    /// The requests on a shared connection whose replies are still to come (a partial run
    /// stopped at the reply cap), in order.
    awaiting: VecDeque<MessageId>,
    /// Requests of a batch not sent yet: an earlier part of it is still being answered, and
    /// they go out (in order, possibly on another connection) once it is.
    deferred: Messages,
    /// Session effects of requests on the dedicated connection whose replies are still to
    /// come.
    effects: Vec<(MessageId, Kind)>,
    /// Reply bytes taken from shared connections in this run of the chain, against the cap.
    taken: usize,
    /// Part of a cluster sink (see [`classify_for`]).
    cluster: bool,
}

impl SharedSink {
    pub fn new(pool: Arc<Pool>, force_run: Arc<Notify>) -> Self {
        let (mailbox, replies) = Mailbox::new(pool.shared.reply_cap);
        SharedSink {
            pool,
            force_run,
            lane: LaneKey::default(),
            name: None,
            pinned: None,
            in_multi: false,
            watching: false,
            pinned_until_reset: false,
            pinned_for_good: false,
            last: None,
            lane_handle: None,
            mailbox,
            replies,
            awaiting: VecDeque::new(),
            deferred: Vec::new(),
            effects: Vec::new(),
            taken: 0,
            cluster: false,
        }
    }

    /// A node's sink inside a cluster sink.
    pub fn for_cluster(pool: Arc<Pool>, force_run: Arc<Notify>) -> Self {
        SharedSink {
            cluster: true,
            ..SharedSink::new(pool, force_run)
        }
    }

    /// The commands that give a new connection this client's session (credentials,
    /// protocol, database), for connections the cluster sink opens on its behalf.
    pub fn session_handshake(&self) -> Vec<Bytes> {
        self.lane.handshake(None)
    }

    /// Whether the client holds a dedicated connection (its session state needs one).
    pub fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }
}

#[async_trait]
impl Transform for SharedSink {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        let partial = state.partial;
        self.taken = 0;
        let mut requests = std::mem::take(&mut state.requests);
        if !self.deferred.is_empty() {
            let mut deferred = std::mem::take(&mut self.deferred);
            deferred.append(&mut requests);
            requests = deferred;
        }
        let mut out = Vec::with_capacity(requests.len());
        // First the replies still coming for requests sent earlier.
        if !self
            .take_replies(&mut out, partial, &mut state.close_client)
            .await
            || self.pinned_backlog()
        {
            if self.pinned_backlog() && out.is_empty() {
                self.dedicated(Vec::new(), &mut out, &mut state.close_client, partial)
                    .await;
            }
            self.deferred = requests;
            state.more = self.backlog();
            return Ok(out);
        }
        if requests.is_empty() {
            // Pushes from the dedicated connection, if any.
            if self.pinned.is_some() {
                self.dedicated(Vec::new(), &mut out, &mut state.close_client, partial)
                    .await;
            }
            state.more = self.backlog();
            return Ok(out);
        }
        let mut run: Messages = Vec::new();
        let mut on_last = false;
        let mut requests = requests.into_iter();
        // Sends the stateless run so far; when its replies are not all in (the reply cap),
        // the rest of the batch waits for a later run of the chain.
        let cap = self.pool.shared.reply_cap;
        macro_rules! send_run_or_defer {
            ($request:expr) => {
                if !self
                    .send_shared(&mut run, &mut on_last, &mut out, state, partial)
                    .await
                    || (partial && self.taken >= cap)
                {
                    self.deferred = std::iter::once($request).chain(requests).collect();
                    state.more = true;
                    return Ok(out);
                }
            };
        }
        while let Some(mut request) = requests.next() {
            if self.pinned.is_some() {
                let rest = std::iter::once(request).chain(requests).collect();
                self.dedicated(rest, &mut out, &mut state.close_client, partial)
                    .await;
                break;
            }
            match classify_for(self.cluster, &mut request) {
                Kind::Shared | Kind::EndMulti | Kind::Unwatch => run.push(request),
                Kind::Wait(timeout) if timeout == 0 || timeout > MAX_SHARED_WAIT_MS => {
                    out.push(Message::error_reply(
                        request.id,
                        &format!(
                            "ERR shotover: a WAIT/WAITAOF timeout of 0 or above {MAX_SHARED_WAIT_MS} ms would hold an upstream connection other clients share; use a shorter timeout, or leave connection_count out of the sink"
                        ),
                    ));
                }
                Kind::Wait(_) => {
                    on_last |= run.is_empty();
                    run.push(request);
                }
                Kind::Pin | Kind::PinUntilReset | Kind::PinForGood | Kind::Multi | Kind::Watch => {
                    send_run_or_defer!(request);
                    let rest = std::iter::once(request).chain(requests).collect();
                    self.dedicated(rest, &mut out, &mut state.close_client, partial)
                        .await;
                    break;
                }
                Kind::SetName(name) => {
                    self.name = Some(name).filter(|n| !n.is_empty());
                    out.push(ok(request.id));
                }
                Kind::BadName => out.push(Message::error_reply(
                    request.id,
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                )),
                Kind::GetName => {
                    let reply = match (&self.name, self.lane.resp3) {
                        (Some(name), _) => RedisFrame::Bulk(name.clone()).to_bytes(),
                        (None, true) => Bytes::from_static(b"_\r\n"),
                        (None, false) => Bytes::from_static(b"$-1\r\n"),
                    };
                    out.push(Message::response(Some(request.id), reply));
                }
                Kind::SetInfo => out.push(ok(request.id)),
                Kind::Quit => {
                    send_run_or_defer!(request);
                    // Redis answers nothing pipelined after QUIT.
                    out.push(ok(request.id));
                    state.close_client = true;
                    break;
                }
                Kind::Reset => {
                    send_run_or_defer!(request);
                    self.reset();
                    out.push(Message::response(
                        Some(request.id),
                        Bytes::from_static(b"+RESET\r\n"),
                    ));
                }
                kind @ (Kind::Auth { .. } | Kind::Hello { .. } | Kind::Select(_)) => {
                    send_run_or_defer!(request);
                    let without_name = match &kind {
                        Kind::Hello { without_name, .. } => without_name.clone(),
                        _ => None,
                    };
                    let (target, name) = self.target(kind);
                    let Some(lane) = self.pool.lane(&target, true) else {
                        // Too many lanes: this client gets a connection of its own.
                        let rest = std::iter::once(request).chain(requests).collect();
                        self.dedicated(rest, &mut out, &mut state.close_client, partial)
                            .await;
                        break;
                    };
                    let id = request.id;
                    let bytes = without_name.unwrap_or_else(|| request.into_bytes());
                    self.switch(&lane, target, name, id, bytes, &mut out).await;
                }
            }
        }
        self.send_shared(&mut run, &mut on_last, &mut out, state, partial)
            .await;
        state.more = self.backlog();
        Ok(out)
    }
}

fn ok(id: MessageId) -> Message {
    Message::response(Some(id), Bytes::from_static(b"+OK\r\n"))
}

impl SharedSink {
    fn reset(&mut self) {
        self.lane = LaneKey::default();
        self.name = None;
        self.in_multi = false;
        self.watching = false;
        self.pinned_until_reset = false;
    }

    /// The lane an `AUTH`, `HELLO` or `SELECT` moves the client to, and the name a HELLO
    /// gives it.
    fn target(&self, kind: Kind) -> (LaneKey, Option<Bytes>) {
        let mut target = self.lane.clone();
        let mut name = None;
        match kind {
            Kind::Auth { user, password } => {
                target.user = user;
                target.password = Some(password);
            }
            Kind::Hello {
                resp3,
                auth,
                name: n,
                ..
            } => {
                target.resp3 = resp3;
                if let Some((user, password)) = auth {
                    target.user = Some(user);
                    target.password = Some(password);
                }
                name = n;
            }
            Kind::Select(db) => target.db = db,
            _ => {}
        }
        (target, name)
    }

    /// Sends a session command on a connection of `target`'s lane; the client moves there if
    /// Redis accepts it.
    async fn switch(
        &mut self,
        lane: &Lane,
        target: LaneKey,
        name: Option<Bytes>,
        id: MessageId,
        bytes: Bytes,
        out: &mut Messages,
    ) {
        let conn = match lane.pick(&self.pool).await {
            Ok(conn) => conn,
            Err(OpenError::Refused(reply)) => {
                // The handshake with these credentials (or this database) failed: that
                // error is Redis's answer to the command.
                self.pool.forget_if_unused(&target);
                out.push(Message::response(Some(id), reply));
                return;
            }
            Err(OpenError::Unreachable(what)) => {
                out.push(self.unreachable(id, &what));
                return;
            }
        };
        match self.call(&conn, bytes).await {
            Ok(reply) => {
                if !matches!(reply.first(), Some(b'-' | b'!')) {
                    self.lane = target;
                    if name.is_some() {
                        self.name = name;
                    }
                }
                self.last = Some(conn);
                out.push(Message::response(Some(id), reply));
            }
            Err(what) => out.push(self.unreachable(id, &what)),
        }
    }

    /// Sends one request on `conn` and waits for its reply (nothing else is in flight).
    async fn call(&mut self, conn: &ConnHandle, request: Bytes) -> Result<Bytes, String> {
        conn.send(vec![request], &self.mailbox).await?;
        match self.replies.recv().await {
            Some(Chunk::Frames { mut frames, .. }) if frames.len() == 1 => Ok(frames.remove(0)),
            Some(Chunk::Frames { .. }) => Err("answered with the wrong number of replies".into()),
            Some(Chunk::Failed { text, .. }) => Err(text),
            None => Err("closed the shared connection".into()),
        }
    }

    /// Whether replies to requests already sent are still to come, or requests of a batch
    /// wait to be sent.
    fn backlog(&self) -> bool {
        !self.awaiting.is_empty() || !self.deferred.is_empty() || self.pinned_backlog()
    }

    fn pinned_backlog(&self) -> bool {
        self.pinned.as_ref().is_some_and(|p| p.conn.backlog())
    }

    /// Moves the replies of shared connections into `out`: all of them, or with `partial`
    /// until they reach the reply cap. `true` when none is awaited any more.
    async fn take_replies(
        &mut self,
        out: &mut Messages,
        partial: bool,
        close_client: &mut bool,
    ) -> bool {
        let cap = self.pool.shared.reply_cap;
        let mut tally = budget::Tally::default();
        while !self.awaiting.is_empty() {
            if partial && self.taken > 0 && (self.taken >= cap || budget::over()) {
                return false;
            }
            match self.replies.recv().await {
                Some(Chunk::Frames { frames, .. }) => {
                    for frame in frames {
                        let Some(id) = self.awaiting.pop_front() else {
                            break;
                        };
                        self.taken += frame.len();
                        tally.add(frame.len());
                        out.push(Message::response(Some(id), frame));
                    }
                }
                failed => {
                    let (text, cut_off) = match failed {
                        Some(Chunk::Failed { text, cut_off }) => (text, cut_off),
                        _ => ("closed the shared connection".to_string(), false),
                    };
                    if cut_off {
                        tracing::warn!(upstream = %self.pool.shared.upstream.address, "{text}: closing the client connection");
                        *close_client = true;
                    }
                    for id in std::mem::take(&mut self.awaiting) {
                        out.push(self.unreachable(id, &text));
                    }
                }
            }
        }
        true
    }

    /// The replies to `requests` when opening `what` for them failed.
    fn open_failed(&self, requests: &[Message], error: OpenError, what: &str) -> Messages {
        let what = match error {
            OpenError::Unreachable(what) => what,
            OpenError::Refused(reply) => format!(
                "refused the handshake of {what}: {}",
                String::from_utf8_lossy(reply.strip_suffix(b"\r\n").unwrap_or(&reply))
            ),
        };
        self.pool.shared.unreachable(requests, &what)
    }

    fn unreachable(&self, id: MessageId, what: &str) -> Message {
        self.pool.shared.failed_requests.inc();
        Message::error_reply(
            id,
            &format!(
                "ERR shotover: upstream {} {what}",
                self.pool.shared.upstream.address
            ),
        )
    }

    /// Sends the stateless run over a shared connection of the client's lane, and takes its
    /// replies (with `partial`, up to the reply cap). `false` when some are still to come.
    async fn send_shared(
        &mut self,
        run: &mut Messages,
        on_last: &mut bool,
        out: &mut Messages,
        state: &mut ChainState<'_>,
        partial: bool,
    ) -> bool {
        if run.is_empty() {
            return true;
        }
        let requests = std::mem::take(run);
        let prefer_last = std::mem::take(on_last);
        let lane = match &self.lane_handle {
            Some((key, lane)) if *key == self.lane => Some(lane.clone()),
            _ => self.pool.lane(&self.lane, true),
        };
        let Some(lane) = lane else {
            self.dedicated(requests, out, &mut state.close_client, partial)
                .await;
            return true;
        };
        if self
            .lane_handle
            .as_ref()
            .is_none_or(|(key, _)| *key != self.lane)
        {
            self.lane_handle = Some((self.lane.clone(), lane.clone()));
        }
        let conn = match &self.last {
            Some(last) if prefer_last && last.is_live() => last.clone(),
            _ => match lane.pick(&self.pool).await {
                Ok(conn) => conn,
                Err(error) => {
                    out.extend(self.open_failed(&requests, error, "a new shared connection"));
                    return true;
                }
            },
        };
        let mut frames = Vec::with_capacity(requests.len());
        for request in requests {
            self.awaiting.push_back(request.id);
            frames.push(request.into_bytes());
        }
        if let Err(what) = conn.send(frames, &self.mailbox).await {
            for id in std::mem::take(&mut self.awaiting) {
                out.push(self.unreachable(id, &what));
            }
            return true;
        }
        self.last = Some(conn);
        self.take_replies(out, partial, &mut state.close_client)
            .await
    }

    /// Runs `requests` on the client's dedicated connection (opened with the lane's
    /// handshake if it has none), follows the session state they change, and unpins the
    /// client when none is left.
    async fn dedicated(
        &mut self,
        requests: Messages,
        out: &mut Messages,
        close_client: &mut bool,
        partial: bool,
    ) {
        if self.pinned.is_none() {
            let handshake = self.lane.handshake(self.name.as_ref());
            match dedicated::open(&self.pool.shared, &handshake).await {
                Ok(opened) => {
                    self.pool.metrics.pinned.inc();
                    self.pool.metrics.pins.inc();
                    self.pinned = Some(Pinned {
                        conn: Dedicated::over(
                            self.pool.shared.clone(),
                            self.force_run.clone(),
                            opened,
                            self.lane.resp3,
                        ),
                        pool: self.pool.clone(),
                    });
                }
                Err(error) => {
                    out.extend(self.open_failed(&requests, error, "a dedicated connection"));
                    return;
                }
            }
        }
        let mut requests = requests;
        let cluster = self.cluster;
        let effects = requests.iter_mut().filter_map(|r| {
            let kind = classify_for(cluster, r);
            (!matches!(
                kind,
                Kind::Shared
                    | Kind::Pin
                    | Kind::GetName
                    | Kind::SetInfo
                    | Kind::Quit
                    | Kind::Wait(_)
                    | Kind::BadName
            ))
            .then_some((r.id, kind))
        });
        self.effects.extend(effects);
        let Some(pinned) = &mut self.pinned else {
            return;
        };
        let responses = pinned.conn.run(requests, close_client, partial).await;
        let backlog = pinned.conn.backlog();
        // Replies come in request order: an effect whose request has no reply yet, while a
        // later request has one, was silenced by CLIENT REPLY.
        let answered_up_to = responses.iter().filter_map(|r| r.request_id).max();
        for (id, kind) in std::mem::take(&mut self.effects) {
            // `Some(true)`: accepted; `Some(false)`: refused; `None`: not known (silenced
            // by CLIENT REPLY, or not answered because the connection broke).
            match responses.iter().find(|r| r.request_id == Some(id)) {
                Some(r) => {
                    let accepted = (!r.is_empty()).then(|| !r.is_error());
                    self.follow(kind, accepted);
                }
                None if backlog && answered_up_to.is_none_or(|up_to| id > up_to) => {
                    self.effects.push((id, kind))
                }
                None => self.follow(kind, None),
            }
        }
        out.extend(responses);
        if !self.pinned_for_good
            && !self.pinned_until_reset
            && !self.watching
            && !self.in_multi
            && !backlog
            && self.pinned.as_ref().is_some_and(|p| p.conn.clean())
        {
            self.pinned = None;
        }
    }

    /// Follows the session state a request changed on the dedicated connection.
    fn follow(&mut self, kind: Kind, accepted: Option<bool>) {
        match kind {
            Kind::Multi => self.in_multi = true,
            Kind::EndMulti => {
                self.in_multi = false;
                self.watching = false;
            }
            Kind::Watch if !self.in_multi && accepted != Some(false) => self.watching = true,
            Kind::Unwatch if !self.in_multi => self.watching = false,
            Kind::PinUntilReset => self.pinned_until_reset = true,
            Kind::PinForGood => self.pinned_for_good = true,
            Kind::SetName(name) if !self.in_multi && accepted == Some(true) => {
                self.name = Some(name).filter(|n| !n.is_empty());
            }
            kind @ (Kind::Auth { .. } | Kind::Hello { .. } | Kind::Select(_)) => {
                if self.in_multi || accepted.is_none() {
                    // Where the session ends up is not known: stay on this connection.
                    self.pinned_until_reset = true;
                } else if accepted == Some(true) {
                    let (target, name) = self.target(kind);
                    self.lane = target;
                    if name.is_some() {
                        self.name = name;
                    }
                }
            }
            Kind::Reset => self.reset(),
            _ => {}
        }
    }
}
