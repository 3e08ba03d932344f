//! How an open client connection follows a reload of its source: it moves to the new chain
//! at a request boundary when its session allows, else it stays on its old chain until the
//! drain deadline and is then closed.
//!
//! A connection moves when nothing it sent is still waiting for an answer and it holds no
//! state that a new upstream connection could not be given. The session commands that set
//! up a connection are kept as they pass (Redis: `AUTH`, `HELLO`, `SELECT`, `CLIENT
//! SETNAME|SETINFO|NO-EVICT|NO-TOUCH`, `READONLY`/`READWRITE`; CQL: `STARTUP`,
//! `AUTH_RESPONSE`, `REGISTER` and the last `USE`) and replayed through the new chain before
//! it takes over; if any of them fails there, the connection stays where it was. What cannot
//! be replayed keeps the connection on its chain: a Redis transaction or `WATCH`, a
//! subscription or `MONITOR` (until `RESET`), `CLIENT REPLY OFF|SKIP`, `CLIENT TRACKING ON`,
//! `SCRIPT DEBUG`, and for good `CLIENT ID`/`GETREDIR` (another client may have redirected
//! its invalidations to this connection's id).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::chain::{TransformChain, TransformChainBuilder, TransformContext};
use crate::codec::cassandra::{Opcode, body};
use crate::codec::redis::command::{CommandKind, ReplyMode};
use crate::message::{Message, MessageId, Messages};
use crate::server::SourceSettings;

/// Most session commands kept for a replay; a connection that sends more stays put.
const MAX_REPLAY: usize = 32;
/// How long the replay of a session through a new chain may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// A CQL `QUERY` body longer than this is not read for `USE` (a keyspace name has at most
/// 48 characters).
const MAX_USE_BODY: usize = 4096;

/// What the connection handler should do at a request boundary.
pub enum Step {
    /// Nothing to do (no reload, or the session cannot move yet).
    Stay,
    /// The source was removed: close the connection.
    Close,
    /// Move to this chain (the session replayed through it).
    Moved(TransformChain),
}

/// A connection's view of its source's reloads.
pub struct Follow {
    rx: watch::Receiver<Arc<SourceSettings>>,
    current: Arc<TransformChainBuilder>,
    ctx: TransformContext,
    drain: Duration,
    /// A reload gave the source another chain (or removed it) and this connection is still
    /// on its old one.
    target: Option<Target>,
    /// The sender is gone (the source stopped): nothing more to wait for.
    closed: bool,
    /// The last value after the sender went was read.
    closed_seen: bool,
    /// `event` saw a change (and marked it seen): `note_reload` reads it.
    woken: bool,
    pub(crate) session: Session,
}

struct Target {
    chain: Option<Arc<TransformChainBuilder>>,
    deadline: Instant,
    /// A replay through this chain failed: wait for the deadline (or another reload).
    failed: bool,
}

/// What woke the handler.
pub enum Event {
    Changed,
    Deadline,
}

impl Follow {
    pub fn new(
        rx: watch::Receiver<Arc<SourceSettings>>,
        current: Arc<TransformChainBuilder>,
        ctx: TransformContext,
        drain: Duration,
    ) -> Follow {
        Follow {
            rx,
            current,
            ctx,
            drain,
            target: None,
            closed: false,
            closed_seen: false,
            woken: false,
            session: Session::default(),
        }
    }

    /// Notes a reload (cheap when there was none). The deadline runs from the first reload
    /// this connection did not follow.
    fn note_reload(&mut self) {
        let changed = match self.rx.has_changed() {
            Ok(changed) => changed,
            // The reloader dropped the sender (the source was removed): read its last value
            // once.
            Err(_) => !std::mem::replace(&mut self.closed_seen, true),
        };
        if !(std::mem::take(&mut self.woken) || changed) {
            return;
        }
        let settings = self.rx.borrow_and_update().clone();
        let chain = settings.chain.clone();
        if let Some(chain) = &chain
            && Arc::ptr_eq(chain, &self.current)
        {
            // The chain was kept (only listener settings changed), or changed back.
            if self.target.take().is_some() {
                settings.metrics().draining.dec();
            }
            return;
        }
        match &mut self.target {
            Some(target) => {
                target.chain = chain;
                target.failed = false;
            }
            None => {
                settings.metrics().draining.inc();
                self.target = Some(Target {
                    chain,
                    deadline: Instant::now() + self.drain,
                    failed: false,
                });
            }
        }
    }

    /// At a request boundary with nothing in flight (`quiet`): moves the connection if a
    /// reload asks for it and its session allows.
    pub async fn step(&mut self, quiet: bool, next_id: &mut MessageId) -> Step {
        self.note_reload();
        let Some(target) = &mut self.target else {
            return Step::Stay;
        };
        if !quiet || target.failed {
            return Step::Stay;
        }
        let Some(builder) = target.chain.clone() else {
            self.done(|m| &m.retired);
            return Step::Close;
        };
        if !self.session.movable() {
            return Step::Stay;
        }
        let mut chain = builder.build(&self.ctx);
        let replays = self.session.replays(next_id);
        match tokio::time::timeout(REPLAY_TIMEOUT, replay(&mut chain, replays, &self.ctx)).await {
            Ok(Ok(())) => {
                self.current = builder;
                self.done(|m| &m.moved);
                Step::Moved(chain)
            }
            Ok(Err(why)) => {
                tracing::info!(reason = %why, "this connection stays on its previous chain until the drain deadline: replaying its session through the reloaded chain failed");
                target.failed = true;
                Step::Stay
            }
            Err(_) => {
                tracing::info!(
                    "this connection stays on its previous chain until the drain deadline: replaying its session through the reloaded chain took over 5 s"
                );
                target.failed = true;
                Step::Stay
            }
        }
    }

    /// The drain deadline passed on the old chain: the handler closes the connection.
    pub fn retire(&mut self) {
        self.done(|m| &m.retired);
    }

    fn done(
        &mut self,
        counter: impl Fn(&crate::server::ReloadMetrics) -> &crate::metrics::Counter,
    ) {
        if self.target.take().is_some() {
            let settings = self.rx.borrow();
            let metrics = settings.metrics();
            metrics.draining.dec();
            counter(metrics).inc();
        }
    }

    /// Resolves when a reload happened or the drain deadline passed. Cancel-safe.
    pub async fn event(&mut self) -> Event {
        if self.closed {
            return std::future::pending().await;
        }
        let deadline = self.target.as_ref().map(|t| t.deadline);
        tokio::select! {
            changed = self.rx.changed() => {
                if changed.is_err() {
                    self.closed = true;
                }
                self.woken = true;
                Event::Changed
            }
            _ = sleep_until(deadline) => Event::Deadline,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the kept session commands through `chain` one at a time, as a client does (a node
/// reads a frame sent right after `STARTUP` before it switches to the negotiated
/// compression), and waits for each answer; an error answer fails the replay.
async fn replay(
    chain: &mut TransformChain,
    requests: Messages,
    ctx: &TransformContext,
) -> Result<(), String> {
    for request in requests {
        let id = request.id;
        let mut batch = vec![request];
        loop {
            let processed = chain
                .process(std::mem::take(&mut batch), false, false)
                .await
                .map_err(|e| e.to_string())?;
            let answer = processed
                .responses
                .into_iter()
                .find(|r| r.request_id == Some(id));
            if let Some(answer) = answer {
                if answer.is_error() {
                    return Err(format!(
                        "a session command was refused: {}",
                        String::from_utf8_lossy(&answer.into_bytes()).trim_end()
                    ));
                }
                break;
            }
            tokio::select! {
                _ = chain.ready() => {}
                _ = ctx.force_run.notified() => {}
            }
        }
    }
    Ok(())
}

/// The session state of a connection, as far as a move needs it.
#[derive(Default)]
pub struct Session {
    replay: Vec<Message>,
    /// Session commands sent and not answered yet: kept for a replay once Redis or Cassandra
    /// accepts them (a command the upstream refused changed nothing).
    candidates: Vec<(Message, bool)>,
    /// The index in `replay` of the last `SELECT` or `USE` (only the last one counts).
    selected: Option<usize>,
    in_multi: bool,
    watching: bool,
    /// Subscribed, `MONITOR`, `SCRIPT DEBUG`, or too many session commands: until `RESET`.
    until_reset: bool,
    reply_off: bool,
    skip_next: bool,
    tracking: bool,
    /// `CLIENT ID` / `GETREDIR`: the connection keeps its upstream for good.
    for_good: bool,
}

impl Session {
    fn movable(&self) -> bool {
        !(!self.candidates.is_empty()
            || self.in_multi
            || self.watching
            || self.until_reset
            || self.reply_off
            || self.skip_next
            || self.tracking
            || self.for_good)
    }

    fn keep(&mut self, request: &Message, replaces_selected: bool) {
        if self.replay.len() + self.candidates.len() >= MAX_REPLAY {
            self.until_reset = true;
            return;
        }
        self.candidates.push((request.clone(), replaces_selected));
    }

    /// Whether session commands wait for their answer (cheap: checked for every response).
    pub fn awaits_answers(&self) -> bool {
        !self.candidates.is_empty()
    }

    /// The answer to request `id` arrived: a session command that succeeded is kept.
    pub fn answered(&mut self, id: MessageId, is_error: bool) {
        let Some(at) = self.candidates.iter().position(|(m, _)| m.id == id) else {
            return;
        };
        let (request, replaces_selected) = self.candidates.remove(at);
        if !is_error {
            self.accept(request, replaces_selected);
        }
    }

    fn accept(&mut self, request: Message, replaces_selected: bool) {
        if replaces_selected && let Some(at) = self.selected {
            self.replay[at] = request;
            return;
        }
        if replaces_selected {
            self.selected = Some(self.replay.len());
        }
        self.replay.push(request);
    }

    /// Copies of the kept commands with fresh ids.
    fn replays(&self, next_id: &mut MessageId) -> Messages {
        self.replay
            .iter()
            .map(|m| {
                let mut m = m.clone();
                m.id = *next_id;
                *next_id += 1;
                m
            })
            .collect()
    }

    /// Notes what a Redis request does to the session.
    pub fn observe_redis(&mut self, request: &mut Message) {
        // The command after `CLIENT REPLY SKIP` uses the skip up.
        self.skip_next = false;
        let command = request.command();
        let (kind, name_len) = (command.kind, command.name.len());
        match kind {
            CommandKind::Hello => self.keep(request, false),
            CommandKind::Subscribe
            | CommandKind::PSubscribe
            | CommandKind::SSubscribe
            | CommandKind::Monitor => self.until_reset = true,
            CommandKind::Reset => {
                let for_good = self.for_good;
                *self = Session {
                    for_good,
                    ..Session::default()
                };
            }
            CommandKind::Multi => self.in_multi = true,
            CommandKind::EndMulti => {
                self.in_multi = false;
                self.watching = false;
            }
            CommandKind::ClientTracking(on) => self.tracking = on,
            CommandKind::ClientReply(ReplyMode::Off) => self.reply_off = true,
            CommandKind::ClientReply(ReplyMode::Skip) => self.skip_next = !self.reply_off,
            CommandKind::ClientReply(ReplyMode::On) => self.reply_off = false,
            CommandKind::ClientId => self.for_good = true,
            CommandKind::Quit
            | CommandKind::Unsubscribe
            | CommandKind::PUnsubscribe
            | CommandKind::SUnsubscribe => {}
            CommandKind::Other if name_len <= 9 => self.observe_other_redis(request),
            CommandKind::Other => {}
        }
    }

    fn observe_other_redis(&mut self, request: &mut Message) {
        let command = request.command();
        let mut upper = [0u8; 9];
        let upper = &mut upper[..command.name.len()];
        upper.copy_from_slice(&command.name);
        upper.make_ascii_uppercase();
        let sub = command.arg1.clone();
        let sub_is = |s: &[u8]| sub.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(s));
        match &*upper {
            b"AUTH" | b"READONLY" | b"READWRITE" => self.keep(request, false),
            b"SELECT" => self.keep(request, true),
            b"WATCH" => self.watching = true,
            b"UNWATCH" => self.watching = false,
            b"SCRIPT" if sub_is(b"DEBUG") => self.until_reset = true,
            b"CLIENT"
                if sub_is(b"SETNAME")
                    || sub_is(b"SETINFO")
                    || sub_is(b"NO-EVICT")
                    || sub_is(b"NO-TOUCH") =>
            {
                self.keep(request, false)
            }
            b"CLIENT" if sub_is(b"GETREDIR") => self.for_good = true,
            _ => {}
        }
    }

    /// Notes what a CQL request does to the session.
    pub fn observe_cql(&mut self, request: &Message) {
        let Some(meta) = request.cql() else {
            return;
        };
        match meta.header.opcode {
            Opcode::Startup | Opcode::AuthResponse | Opcode::Register => self.keep(request, false),
            Opcode::Query if meta.header.body_len <= MAX_USE_BODY => {
                let is_use = match request.cql_body() {
                    Some(Ok(b)) => body::query_text(&b).is_ok_and(is_use),
                    _ => false,
                };
                if is_use {
                    self.keep(request, true);
                }
            }
            _ => {}
        }
    }
}

/// Whether a statement is a `USE`, without allocating for the others.
fn is_use(query: &str) -> bool {
    let rest = query.trim_start();
    if rest.starts_with("--") || rest.starts_with("//") || rest.starts_with("/*") {
        return body::statement_keyword(rest) == "USE";
    }
    let bytes = rest.as_bytes();
    bytes.len() > 3
        && bytes[..3].eq_ignore_ascii_case(b"use")
        && (bytes[3].is_ascii_whitespace() || bytes[3] == b'"')
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn redis(text: &str) -> Message {
        let args: Vec<&str> = text.split(' ').collect();
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        Message::request(1, Bytes::from(out))
    }

    /// The session after `commands`, each answered OK.
    fn session(commands: &[&str]) -> Session {
        let mut s = Session::default();
        for (i, c) in commands.iter().enumerate() {
            let mut m = redis(c);
            m.id = i as MessageId;
            s.observe_redis(&mut m);
            s.answered(m.id, false);
        }
        s
    }

    #[test]
    fn use_statements_are_told_from_the_others() {
        assert!(is_use("USE ks"));
        assert!(is_use("  use \"Ks\""));
        assert!(is_use("/* c */ USE ks"));
        assert!(!is_use("USER"));
        assert!(!is_use("SELECT * FROM use_me"));
        assert!(!is_use("use"));
    }

    #[test]
    fn only_session_commands_the_upstream_accepted_are_replayed() {
        let mut s = Session::default();
        let mut setinfo = redis("CLIENT SETINFO LIB-NAME x");
        setinfo.id = 1;
        let mut select = redis("SELECT 1");
        select.id = 2;
        s.observe_redis(&mut setinfo);
        s.observe_redis(&mut select);
        assert!(!s.movable(), "answers still awaited");
        s.answered(1, true);
        s.answered(2, false);
        assert!(s.movable());
        assert_eq!(s.replays(&mut 10).len(), 1);
    }

    #[test]
    fn plain_commands_and_session_setup_can_move() {
        let s = session(&[
            "AUTH pw",
            "HELLO 3",
            "SELECT 2",
            "GET a",
            "SELECT 3",
            "client setname x",
        ]);
        assert!(s.movable());
        let mut id = 100;
        let replays = s.replays(&mut id);
        let names: Vec<String> = replays
            .iter()
            .map(|m| String::from_utf8_lossy(m.raw_bytes().expect("raw")).into_owned())
            .collect();
        assert_eq!(replays.len(), 4, "{names:?}");
        assert!(
            names[2].contains("SELECT\r\n$1\r\n3"),
            "the last SELECT replaces the first: {names:?}"
        );
        assert_eq!(id, 104);
    }

    #[test]
    fn transactions_and_subscriptions_keep_a_connection_until_they_end() {
        assert!(!session(&["MULTI", "SET a 1"]).movable());
        assert!(session(&["MULTI", "SET a 1", "EXEC"]).movable());
        assert!(!session(&["WATCH a"]).movable());
        assert!(session(&["WATCH a", "UNWATCH"]).movable());
        assert!(session(&["WATCH a", "DISCARD"]).movable());
        assert!(!session(&["SUBSCRIBE c", "UNSUBSCRIBE c"]).movable());
        assert!(session(&["SUBSCRIBE c", "RESET"]).movable());
        assert!(!session(&["CLIENT REPLY OFF"]).movable());
        assert!(session(&["CLIENT REPLY OFF", "CLIENT REPLY ON"]).movable());
        assert!(!session(&["CLIENT REPLY SKIP"]).movable());
        assert!(session(&["CLIENT REPLY SKIP", "SET a 1"]).movable());
        assert!(!session(&["CLIENT TRACKING on"]).movable());
        assert!(!session(&["CLIENT ID", "RESET"]).movable());
        assert!(!session(&["MONITOR"]).movable());
    }

    #[test]
    fn reset_forgets_the_session_and_too_many_commands_stay_put() {
        let s = session(&["AUTH pw", "RESET"]);
        assert!(s.movable());
        assert!(s.replays(&mut 1).is_empty());
        let many: Vec<String> = (0..=MAX_REPLAY)
            .map(|i| format!("CLIENT SETNAME n{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(!session(&many).movable());
    }
}
