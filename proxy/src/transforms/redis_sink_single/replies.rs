//! Which reply answers which request on one upstream Redis connection.
//!
//! Redis answers each request once, in order, except where the connection's state says
//! otherwise: subscribe commands get one confirmation per channel, pub/sub messages and RESP3
//! pushes answer nobody, MONITOR streams lines, `CLIENT REPLY OFF|SKIP` silences replies, and
//! inside MULTI every command is only queued. [`ReplyTracker`] follows that state from the
//! requests written and the replies read.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use crate::codec::redis::command::{CommandKind, ReplyMode, aggregate_head};
use crate::codec::redis::frame::RedisFrame;
use crate::message::{Message, MessageId, Messages};

/// The requests waiting for replies, and the RESP state that decides what answers them.
#[derive(Default)]
pub(super) struct ReplyTracker {
    pending: VecDeque<Pending>,
    resp: RespState,
    written: Written,
}

/// What the requests written so far make of the connection once Redis has run them: its
/// protocol and its subscriptions. Redis refuses most commands on a RESP2 connection with
/// subscriptions (with an error), so what they would do to the reply mode or a transaction
/// never happens; this is known when they are written, before the replies say so.
#[derive(Default)]
struct Written {
    resp3: bool,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard_channels: HashSet<Bytes>,
}

impl Written {
    fn pubsub_context(&self) -> bool {
        let subscribed = !self.channels.is_empty()
            || !self.patterns.is_empty()
            || !self.shard_channels.is_empty();
        !self.resp3 && subscribed
    }

    /// Follows a request that Redis will run (not queue).
    fn follow(&mut self, kind: CommandKind, hello: Option<u8>, request: &mut Message) {
        let set = match kind {
            CommandKind::Hello => {
                if let Some(version) = hello {
                    self.resp3 = version == 3;
                }
                return;
            }
            CommandKind::Reset => {
                *self = Written::default();
                return;
            }
            CommandKind::Subscribe | CommandKind::Unsubscribe => &mut self.channels,
            CommandKind::PSubscribe | CommandKind::PUnsubscribe => &mut self.patterns,
            CommandKind::SSubscribe | CommandKind::SUnsubscribe => &mut self.shard_channels,
            _ => return,
        };
        let args: Vec<Bytes> = match request.frame() {
            Ok(RedisFrame::Array(items)) => items
                .iter()
                .skip(1)
                .filter_map(|a| a.as_bytes().map(|b| Bytes::copy_from_slice(b)))
                .collect(),
            _ => Vec::new(),
        };
        match kind {
            CommandKind::Subscribe | CommandKind::PSubscribe | CommandKind::SSubscribe => {
                set.extend(args)
            }
            _ if args.is_empty() => set.clear(),
            _ => {
                for arg in &args {
                    set.remove(arg);
                }
            }
        }
    }
}

impl ReplyTracker {
    /// A tracker for a connection whose handshake already chose the protocol.
    pub fn with_resp3(resp3: bool) -> Self {
        ReplyTracker {
            pending: VecDeque::new(),
            resp: RespState {
                resp3,
                ..RespState::default()
            },
            written: Written {
                resp3,
                ..Written::default()
            },
        }
    }

    /// Whether nothing is waiting and the connection holds no state that decides how
    /// replies are framed or that a shared connection lacks: no transaction, subscription,
    /// MONITOR, tracking, or silenced replies.
    pub fn clean(&self) -> bool {
        self.pending.is_empty()
            && !self.resp.in_multi
            && !self.resp.subscribed()
            && !self.resp.monitoring
            && !self.resp.tracking
            && !self.resp.redirect_target
            && !self.resp.quit
            && !self.resp.silent_pushes
            && self.resp.replies == Replies::On
    }

    /// Registers a request about to be written. `false` when the server will not reply to it
    /// (`CLIENT REPLY OFF`/`SKIP`).
    pub fn expect(&mut self, request: &mut Message) -> bool {
        let id = request.id;
        let command = request.command();
        let (mut kind, argc, hello) = (command.kind, command.argc, command.hello_version());
        // A RESP2 connection with subscriptions runs only the subscribe family, PING, QUIT
        // and RESET; anything else gets one error, and changes nothing.
        if self.written.pubsub_context()
            && !is_subscribe_family(kind)
            && !matches!(kind, CommandKind::Reset | CommandKind::Quit)
        {
            kind = CommandKind::Other;
        }
        // Inside a transaction a command is only queued: one reply, whatever it is.
        match kind {
            CommandKind::Multi => self.resp.in_multi = true,
            CommandKind::EndMulti | CommandKind::Reset => self.resp.in_multi = false,
            _ if self.resp.in_multi => kind = CommandKind::Other,
            _ => {}
        }
        self.written.follow(kind, hello, request);
        if !self.resp.will_reply(kind) {
            // No reply will say that a silenced HELLO switched the protocol: the requests
            // after it know (`Pending::resp3`), and so does the connection once nothing is
            // waiting.
            if let (CommandKind::Hello, Some(version)) = (kind, hello)
                && self.pending.is_empty()
            {
                self.resp.resp3 = version == 3;
            }
            // Redis still sends subscribe confirmations and messages while replies are off
            // (it pushes them, in RESP2 too): they answer nobody, but take their turn. (A
            // subscribe without a channel is refused, silently: nothing comes.)
            let subscribing = matches!(
                kind,
                CommandKind::Subscribe | CommandKind::PSubscribe | CommandKind::SSubscribe
            );
            if is_subscribe_family(kind) && (argc > 0 || !subscribing) {
                self.resp.silent_pushes = true;
                self.pending.push_back(Pending {
                    id: None,
                    kind,
                    argc,
                    left: None,
                    hello: None,
                    resp3: self.written.resp3,
                });
            }
            return false;
        }
        self.pending.push_back(Pending {
            id: Some(id),
            kind,
            argc,
            left: None,
            hello,
            resp3: self.written.resp3,
        });
        true
    }

    /// Registers a request answered by exactly one reply.
    pub fn expect_one(&mut self, id: MessageId) {
        self.pending.push_back(Pending {
            id: Some(id),
            kind: CommandKind::Other,
            argc: 0,
            left: None,
            hello: None,
            resp3: self.written.resp3,
        });
    }

    /// Whether some request still waits for a reply.
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Answers every waiting request with the error `text`; returns how many there were.
    pub fn fail_pending(&mut self, text: &str, out: &mut Messages) -> usize {
        let failed = self.pending.len();
        for pending in self.pending.drain(..) {
            if let Some(id) = pending.id {
                out.push(Message::error_reply(id, text));
            }
        }
        failed
    }

    /// Drops the waiting requests without an answer (after QUIT, Redis answers nothing more).
    pub fn forget_pending(&mut self) {
        self.pending.clear();
    }

    /// Whether QUIT was answered: the server closes the connection next.
    pub fn quit(&self) -> bool {
        self.resp.quit
    }

    /// Whether frames may arrive that no request asked for.
    pub fn unsolicited_possible(&self) -> bool {
        self.resp.subscribed()
            || self.resp.monitoring
            || self.resp.tracking
            || (self.resp.redirect_target && self.resp.resp3)
            || self.resp.silent_pushes
    }

    /// Decides whom a frame answers, and keeps the RESP state.
    pub fn classify(&mut self, frame: Bytes, out: &mut Messages) {
        let head_kind = self.pending.front().map(|p| p.kind);
        let head_subscribing = head_kind.is_some_and(is_subscribe_family);
        let resp3 = self.pending.front().map_or(self.resp.resp3, |p| p.resp3);
        let kind_byte = frame.first().copied();
        let aggregate_name = match kind_byte {
            Some(b'>') => aggregate_head(&frame).map(|(name, _, _)| name),
            // RESP2 has no pushes: while subscribed, messages are arrays.
            Some(b'*')
                if !resp3
                    && (self.resp.subscribed() || head_subscribing || self.resp.silent_pushes) =>
            {
                aggregate_head(&frame).map(|(name, _, _)| name)
            }
            _ => None,
        };
        let confirmation = aggregate_name.as_deref().is_some_and(is_confirmation_name);
        let unsolicited = match kind_byte {
            Some(b'>') => !(confirmation && head_subscribing),
            // A confirmation of a subscribe whose replies were silenced answers nobody.
            Some(b'*') if confirmation => !head_subscribing,
            Some(b'*') if aggregate_name.is_some() => {
                matches!(aggregate_name.as_deref(), Some(n) if is_message_name(n))
            }
            _ => self.pending.is_empty(),
        };
        if unsolicited || self.pending.is_empty() {
            // A confirmation nobody waits for (its SUBSCRIBE was silenced by CLIENT REPLY)
            // still changes the channel sets.
            if confirmation {
                self.track_confirmation(&frame);
            }
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
            let head_resp3 = head.resp3;
            self.pending.pop_front();
            if is_error && kind == CommandKind::Hello {
                // A refused HELLO leaves the protocol as it was, for the requests written
                // after it too (up to the next HELLO).
                let actual = self.resp.resp3;
                let mut later_hello = false;
                for p in self.pending.iter_mut() {
                    if p.kind == CommandKind::Hello {
                        later_hello = true;
                        break;
                    }
                    p.resp3 = actual;
                }
                if !later_hello {
                    self.written.resp3 = actual;
                }
            } else {
                self.resp.resp3 = head_resp3;
            }
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
                        // The id stays: other clients may still redirect to it.
                        redirect_target: self.resp.redirect_target,
                        ..RespState::default()
                    }
                }
                CommandKind::Hello => {
                    if let Some(version) = hello {
                        self.resp.resp3 = version == 3;
                    }
                }
                CommandKind::Quit => self.resp.quit = true,
                CommandKind::ClientTracking(on) => self.resp.tracking = on,
                CommandKind::ClientId => self.resp.redirect_target = true,
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
    /// Whether the connection speaks RESP3 when Redis has run this request (as the requests
    /// written up to it say: a HELLO whose reply was silenced switches it all the same).
    resp3: bool,
}

/// The RESP state of the upstream connection, as far as framing replies depends on it.
#[derive(Default)]
struct RespState {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard_channels: HashSet<Bytes>,
    monitoring: bool,
    tracking: bool,
    /// The client asked for its id: another client may redirect its tracking here, and a
    /// RESP3 connection then receives invalidation pushes at any time.
    redirect_target: bool,
    quit: bool,
    /// `CLIENT REPLY OFF`/`SKIP`: the server sends no reply to the next request(s).
    replies: Replies,
    /// The connection speaks RESP3 (a HELLO 3 succeeded): pub/sub messages are pushes.
    resp3: bool,
    /// A subscribe command was sent while replies were off on a RESP3 connection: its
    /// confirmations and messages arrive as pushes, answering nobody.
    silent_pushes: bool,
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

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: MessageId, line: &str) -> Message {
        Message::request(id, Bytes::from(format!("{line}\r\n")))
    }

    /// Registers the requests, feeds the replies, and returns (request_id, reply) pairs.
    fn run(requests: &[&str], replies: &[&str]) -> Vec<(Option<MessageId>, String)> {
        let mut tracker = ReplyTracker::default();
        let mut out = Vec::new();
        for (i, line) in requests.iter().enumerate() {
            if !tracker.expect(&mut request(i as MessageId + 1, line)) {
                out.push(Message::response(Some(i as MessageId + 1), Bytes::new()));
            }
        }
        for reply in replies {
            tracker.classify(Bytes::from(reply.to_string()), &mut out);
        }
        assert!(!tracker.waiting(), "every request answered");
        out.into_iter()
            .map(|m| {
                (
                    m.request_id,
                    String::from_utf8_lossy(&m.into_bytes()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn each_subscribe_confirmation_after_the_first_answers_nobody() {
        let sub = |ch: &str, n: u8| format!("*3\r\n$9\r\nsubscribe\r\n$2\r\n{ch}\r\n:{n}\r\n");
        let got = run(
            &["SUBSCRIBE c1 c2", "PING"],
            &[
                &sub("c1", 1),
                &sub("c2", 2),
                "*2\r\n$4\r\npong\r\n$0\r\n\r\n",
            ],
        );
        let ids: Vec<Option<MessageId>> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![Some(1), None, Some(2)]);
    }

    #[test]
    fn resp2_messages_of_a_subscribed_connection_answer_nobody() {
        let got = run(
            &["SUBSCRIBE c", "PING"],
            &[
                "*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
                "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n",
                "*2\r\n$4\r\npong\r\n$0\r\n\r\n",
            ],
        );
        let ids: Vec<Option<MessageId>> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![Some(1), None, Some(2)]);
    }

    #[test]
    fn resp3_arrays_are_replies_even_when_they_start_with_message() {
        let got = run(
            &["HELLO 3", "SUBSCRIBE c", "LRANGE l 0 -1"],
            &[
                "%1\r\n+proto\r\n:3\r\n",
                ">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
                "*1\r\n$7\r\nmessage\r\n",
            ],
        );
        let ids: Vec<Option<MessageId>> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn client_reply_off_and_skip_silence_the_right_requests() {
        let got = run(
            &[
                "CLIENT REPLY OFF",
                "SET a 1",
                "CLIENT REPLY ON",
                "CLIENT REPLY SKIP",
                "GET a",
                "GET a",
            ],
            &["+OK\r\n", "$1\r\n1\r\n"],
        );
        let answered: Vec<(Option<MessageId>, &str)> =
            got.iter().map(|(id, r)| (*id, r.as_str())).collect();
        assert_eq!(
            answered,
            vec![
                (Some(1), ""),
                (Some(2), ""),
                (Some(4), ""),
                (Some(5), ""),
                (Some(3), "+OK\r\n"),
                (Some(6), "$1\r\n1\r\n")
            ]
        );
    }

    #[test]
    fn a_silenced_resp3_subscribe_still_follows_its_pushes() {
        let mut tracker = ReplyTracker::with_resp3(true);
        assert!(!tracker.expect(&mut request(1, "CLIENT REPLY OFF")));
        assert!(!tracker.expect(&mut request(2, "SUBSCRIBE c")));
        assert!(tracker.waiting(), "its confirmation takes its turn");
        assert!(tracker.unsolicited_possible(), "pushes will come");
        let mut out = Vec::new();
        tracker.classify(
            Bytes::from_static(b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"),
            &mut out,
        );
        assert_eq!(out[0].request_id, None);
        assert!(!tracker.waiting());
        assert!(
            tracker.resp.subscribed(),
            "the channel set follows the push"
        );
        assert!(!tracker.clean());
    }

    #[test]
    fn inside_multi_a_subscribe_is_only_queued() {
        let got = run(
            &["MULTI", "SUBSCRIBE a b", "EXEC"],
            &[
                "+OK\r\n",
                "+QUEUED\r\n",
                "*1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
            ],
        );
        let ids: Vec<Option<MessageId>> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn a_refused_hello_leaves_the_protocol_of_the_requests_after_it() {
        // HELLO 3 refused (say, a wrong password): a RESP2 connection, whose subscribed
        // messages are arrays.
        let got = run(
            &["HELLO 3 AUTH u wrong", "SUBSCRIBE c", "PING"],
            &[
                "-WRONGPASS invalid username-password pair\r\n",
                "*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
                "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n",
                "*2\r\n$4\r\npong\r\n$0\r\n\r\n",
            ],
        );
        let ids: Vec<Option<MessageId>> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![Some(1), Some(2), None, Some(3)]);
    }

    #[test]
    fn fail_pending_answers_every_waiting_request_once() {
        let mut tracker = ReplyTracker::default();
        for id in 1..=3 {
            assert!(tracker.expect(&mut request(id, "GET k")));
        }
        let mut out = Vec::new();
        tracker.classify(Bytes::from_static(b"$1\r\nv\r\n"), &mut out);
        assert_eq!(tracker.fail_pending("ERR gone", &mut out), 2);
        let ids: Vec<Option<MessageId>> = out.iter().map(|m| m.request_id).collect();
        assert_eq!(ids, vec![Some(1), Some(2), Some(3)]);
        assert!(out[1].is_error() && out[2].is_error() && !out[0].is_error());
    }
}
