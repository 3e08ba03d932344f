//! A model of what Redis (7.0) sends back on one connection, and the tracker checked
//! against it: random command sequences over transactions, subscriptions (channels and
//! patterns, RESP2 and RESP3), `CLIENT REPLY`, `RESET`, `HELLO` and published messages
//! arriving at any point. For each, the model says which frames Redis writes and whom each
//! answers; the tracker, fed the same requests and frames, must give every frame to the same
//! request (the first frame of a request carries its id, the rest and every message none)
//! and must say which requests get no reply at all.

use std::collections::BTreeSet;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Get,
    Ping,
    Subscribe(Vec<&'static str>),
    Unsubscribe(Vec<&'static str>),
    PSubscribe(Vec<&'static str>),
    PUnsubscribe(Vec<&'static str>),
    Multi,
    Exec,
    Discard,
    Reply(&'static str),
    Reset,
    Hello(u8),
    /// Not a request: another client publishes to this channel now.
    Publish(&'static str),
    /// Not a request: the batch ends here (its replies are read before the next is written).
    Flush,
}

fn channels() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..3)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Get),
        2 => Just(Op::Ping),
        3 => channels().prop_map(|c| Op::Subscribe(if c.is_empty() { vec!["a"] } else { c })),
        2 => channels().prop_map(Op::Unsubscribe),
        2 => channels().prop_map(|c| Op::PSubscribe(if c.is_empty() { vec!["b"] } else { c })),
        1 => channels().prop_map(Op::PUnsubscribe),
        2 => Just(Op::Multi),
        2 => Just(Op::Exec),
        1 => Just(Op::Discard),
        2 => prop::sample::select(vec!["ON", "OFF", "SKIP"]).prop_map(Op::Reply),
        1 => Just(Op::Reset),
        1 => prop::sample::select(vec![2u8, 3]).prop_map(Op::Hello),
        3 => prop::sample::select(vec!["a", "b", "c"]).prop_map(Op::Publish),
        2 => Just(Op::Flush),
    ]
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

/// Whom a frame answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// The first frame of request `id`.
    First(MessageId),
    /// A later frame of a request, or a frame nobody asked for.
    Nobody,
}

#[derive(Default)]
struct Redis {
    resp3: bool,
    channels: BTreeSet<&'static str>,
    patterns: BTreeSet<&'static str>,
    /// Replies of the commands queued by MULTI, when in a transaction.
    multi: Option<Vec<String>>,
    /// `CLIENT REPLY OFF`.
    off: bool,
    /// `CLIENT REPLY SKIP` applies to the command running now...
    skip: bool,
    /// ...or was just sent, for the next one.
    skip_next: bool,
}

impl Redis {
    fn subscriptions(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }

    fn push_header(&self, n: usize) -> String {
        format!("{}{n}\r\n", if self.resp3 { '>' } else { '*' })
    }

    fn null(&self) -> &'static str {
        if self.resp3 { "_\r\n" } else { "$-1\r\n" }
    }

    fn confirmation(&self, kind: &str, channel: Option<&str>) -> String {
        let channel = channel.map_or_else(|| self.null().to_string(), bulk);
        format!(
            "{}{}{channel}:{}\r\n",
            self.push_header(3),
            bulk(kind),
            self.subscriptions()
        )
    }

    /// The frames a publish to `channel` brings this connection (pushes: sent whatever the
    /// reply mode).
    fn publish(&self, channel: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.channels.contains(channel) {
            out.push(format!(
                "{}{}{}{}",
                self.push_header(3),
                bulk("message"),
                bulk(channel),
                bulk("hi")
            ));
        }
        if self.patterns.contains(channel) {
            out.push(format!(
                "{}{}{}{}{}",
                self.push_header(4),
                bulk("pmessage"),
                bulk(channel),
                bulk(channel),
                bulk("hi")
            ));
        }
        out
    }

    /// Runs one command: its request line, the frames Redis writes for it, and whether they
    /// answer it (false when the reply mode drops its replies: then only pushes are written,
    /// answering nobody). Commands whose effect inside a
    /// transaction would depend on EXEC (reply mode, protocol, subscriptions) are sent as
    /// GET there, and so is a switch to RESP2 with subscriptions.
    fn run(&mut self, op: &Op) -> (String, Vec<String>, bool) {
        let silenced_before = self.off || self.skip;
        let op = match op {
            Op::Subscribe(_)
            | Op::Unsubscribe(_)
            | Op::PSubscribe(_)
            | Op::PUnsubscribe(_)
            | Op::Reply(_)
            | Op::Hello(_)
                if self.multi.is_some() =>
            {
                &Op::Get
            }
            Op::Hello(2) if self.resp3 && self.subscriptions() > 0 => &Op::Get,
            op => op,
        };
        let (line, frames, pushes) = self.execute(op);
        // ON and RESET clear the reply mode before they answer.
        let cleared = !self.off && !self.skip && matches!(op, Op::Reply("ON") | Op::Reset);
        let silenced = silenced_before && !cleared;
        // After every command: a SKIP just sent applies to the next one.
        self.skip = std::mem::take(&mut self.skip_next);
        match (silenced, pushes) {
            (false, _) => {
                let replied = !frames.is_empty();
                (line, frames, replied)
            }
            (true, true) => (line, frames, false),
            (true, false) => (line, Vec::new(), false),
        }
    }

    fn execute(&mut self, op: &Op) -> (String, Vec<String>, bool) {
        // A RESP2 connection with subscriptions accepts only these.
        let pubsub_context = !self.resp3 && self.subscriptions() > 0;
        let line = match op {
            Op::Get => "GET k".to_string(),
            Op::Ping => "PING".to_string(),
            Op::Subscribe(c) => format!("SUBSCRIBE {}", c.join(" ")),
            Op::Unsubscribe(c) => format!("UNSUBSCRIBE {}", c.join(" ")),
            Op::PSubscribe(c) => format!("PSUBSCRIBE {}", c.join(" ")),
            Op::PUnsubscribe(c) => format!("PUNSUBSCRIBE {}", c.join(" ")),
            Op::Multi => "MULTI".to_string(),
            Op::Exec => "EXEC".to_string(),
            Op::Discard => "DISCARD".to_string(),
            Op::Reply(mode) => format!("CLIENT REPLY {mode}"),
            Op::Reset => "RESET".to_string(),
            Op::Hello(v) => format!("HELLO {v}"),
            Op::Publish(_) | Op::Flush => unreachable!("not a request"),
        };
        let name = line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let allowed_in_pubsub = matches!(
            op,
            Op::Ping
                | Op::Subscribe(_)
                | Op::Unsubscribe(_)
                | Op::PSubscribe(_)
                | Op::PUnsubscribe(_)
                | Op::Reset
        );
        if pubsub_context && !allowed_in_pubsub {
            return (
                line,
                vec![format!(
                    "-ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
                )],
                false,
            );
        }
        if let Some(queued) = &mut self.multi
            && !matches!(op, Op::Multi | Op::Exec | Op::Discard | Op::Reset)
        {
            // Queued: run at EXEC (what they answer there: the model queues only commands
            // whose answer does not depend on when they run).
            queued.push(match op {
                Op::Get => "$-1\r\n".to_string(),
                Op::Ping => "+PONG\r\n".to_string(),
                _ => "+OK\r\n".to_string(),
            });
            return (line, vec!["+QUEUED\r\n".to_string()], false);
        }
        let frames = match op {
            Op::Get => vec!["$-1\r\n".to_string()],
            Op::Ping if pubsub_context => {
                vec![format!("*2\r\n{}{}", bulk("pong"), bulk(""))]
            }
            Op::Ping => vec!["+PONG\r\n".to_string()],
            Op::Subscribe(c) | Op::PSubscribe(c) => {
                let pattern = matches!(op, Op::PSubscribe(_));
                let out = c
                    .iter()
                    .map(|ch| {
                        if pattern {
                            self.patterns.insert(ch);
                        } else {
                            self.channels.insert(ch);
                        }
                        self.confirmation(
                            if pattern { "psubscribe" } else { "subscribe" },
                            Some(ch),
                        )
                    })
                    .collect();
                return (line, out, true);
            }
            Op::Unsubscribe(c) | Op::PUnsubscribe(c) => {
                let pattern = matches!(op, Op::PUnsubscribe(_));
                let kind = if pattern {
                    "punsubscribe"
                } else {
                    "unsubscribe"
                };
                let set = if pattern {
                    &self.patterns
                } else {
                    &self.channels
                };
                let targets: Vec<&'static str> = if c.is_empty() {
                    set.iter().copied().collect()
                } else {
                    c.clone()
                };
                let mut out = Vec::new();
                for ch in &targets {
                    if pattern {
                        self.patterns.remove(ch);
                    } else {
                        self.channels.remove(ch);
                    }
                    out.push(self.confirmation(kind, Some(ch)));
                }
                if targets.is_empty() {
                    out.push(self.confirmation(kind, None));
                }
                return (line, out, true);
            }
            Op::Multi if self.multi.is_some() => {
                vec!["-ERR MULTI calls can not be nested\r\n".to_string()]
            }
            Op::Multi => {
                self.multi = Some(Vec::new());
                vec!["+OK\r\n".to_string()]
            }
            Op::Exec | Op::Discard if self.multi.is_none() => {
                vec![format!(
                    "-ERR {} without MULTI\r\n",
                    name.to_ascii_uppercase()
                )]
            }
            Op::Exec => {
                let queued = self.multi.take().unwrap_or_default();
                vec![format!("*{}\r\n{}", queued.len(), queued.concat())]
            }
            Op::Discard => {
                self.multi = None;
                vec!["+OK\r\n".to_string()]
            }
            Op::Reply(mode) => {
                match *mode {
                    "ON" => {
                        self.off = false;
                        self.skip = false;
                        return (line, vec!["+OK\r\n".to_string()], false);
                    }
                    "OFF" => self.off = true,
                    _ if !self.off => self.skip_next = true,
                    _ => {}
                }
                return (line, Vec::new(), false);
            }
            Op::Reset => {
                *self = Redis::default();
                return (line, vec!["+RESET\r\n".to_string()], false);
            }
            Op::Hello(v) => {
                self.resp3 = *v == 3;
                vec![if self.resp3 {
                    format!("%1\r\n{}:3\r\n", bulk("proto"))
                } else {
                    format!("*2\r\n{}:2\r\n", bulk("proto"))
                }]
            }
            Op::Publish(_) | Op::Flush => unreachable!("not a request"),
        };
        (line, frames, false)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_tracker_gives_every_frame_to_the_request_redis_answers(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let mut redis = Redis::default();
        let mut tracker = ReplyTracker::default();
        let mut want: Vec<(To, String)> = Vec::new();
        let mut got: Vec<(To, String)> = Vec::new();
        let mut batch: Vec<String> = Vec::new();
        let mut id: MessageId = 0;
        let mut log = Vec::new();
        let flush = |tracker: &mut ReplyTracker, batch: &mut Vec<String>, got: &mut Vec<(To, String)>| {
            let mut out = Vec::new();
            for frame in batch.drain(..) {
                tracker.classify(Bytes::from(frame), &mut out);
            }
            for m in out {
                let to = match m.request_id {
                    Some(id) => To::First(id),
                    None => To::Nobody,
                };
                got.push((to, String::from_utf8_lossy(&m.into_bytes()).into_owned()));
            }
        };
        for op in &ops {
            match op {
                Op::Publish(channel) => {
                    for frame in redis.publish(channel) {
                        log.push(format!("  <- {frame:?} (published)"));
                        want.push((To::Nobody, frame.clone()));
                        batch.push(frame);
                    }
                    continue;
                }
                Op::Flush => {
                    flush(&mut tracker, &mut batch, &mut got);
                    continue;
                }
                _ => {}
            }
            id += 1;
            let (line, frames, replied) = redis.run(op);
            log.push(format!("{id}: {line}"));
            let mut request = Message::request(id, Bytes::from(format!("{line}\r\n")));
            let expects = tracker.expect(&mut request);
            prop_assert_eq!(
                expects, replied,
                "whether {} ({}) gets a reply\n{}", line, id, log.join("\n")
            );
            for (i, frame) in frames.into_iter().enumerate() {
                log.push(format!("  <- {frame:?}"));
                let to = if i == 0 && replied { To::First(id) } else { To::Nobody };
                want.push((to, frame.clone()));
                batch.push(frame);
            }
        }
        flush(&mut tracker, &mut batch, &mut got);
        prop_assert_eq!(&got, &want, "\n{}", log.join("\n"));
        prop_assert!(!tracker.waiting(), "every request answered\n{}", log.join("\n"));
    }
}
