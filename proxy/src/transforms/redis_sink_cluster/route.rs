//! Where a request goes in a cluster: the slot of its keys, every master, or the proxy
//! itself; and how the replies of a request split over several nodes are merged.
//!
//! Key positions come from the cluster's own `COMMAND` reply (first key, last key, step),
//! learnt once, so every command Redis knows is routed by its keys; commands whose keys
//! move (`EVAL`, `ZUNIONSTORE`, `XREAD`, ...) and the commands the proxy splits, fans out
//! or answers are handled here by name.

use std::collections::HashMap;

use bytes::Bytes;

use super::slots::slot;
use crate::codec::redis::frame::RedisFrame;
use crate::message::Message;

/// Key positions of a command, as `COMMAND` gives them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeySpec {
    pub first: i64,
    pub last: i64,
    pub step: i64,
}

/// What the cluster's `COMMAND` said, by upper-case name (`NAME` or `NAME|SUB`).
#[derive(Default)]
pub struct CommandTable {
    specs: HashMap<Vec<u8>, KeySpec>,
}

impl CommandTable {
    /// Reads a `COMMAND` reply.
    pub fn parse(reply: &Bytes) -> Option<CommandTable> {
        let RedisFrame::Array(commands) = RedisFrame::parse(reply).ok()? else {
            return None;
        };
        let mut table = CommandTable::default();
        for command in &commands {
            table.add(command, None);
        }
        (!table.specs.is_empty()).then_some(table)
    }

    fn add(&mut self, command: &RedisFrame, _parent: Option<&[u8]>) {
        let RedisFrame::Array(items) = command else {
            return;
        };
        let int = |i: usize| match items.get(i) {
            Some(RedisFrame::Integer(n)) => Some(*n),
            _ => None,
        };
        let name = match items.first() {
            Some(RedisFrame::Bulk(n) | RedisFrame::Simple(n)) => n.to_ascii_uppercase(),
            _ => return,
        };
        if let (Some(first), Some(last), Some(step)) = (int(3), int(4), int(5)) {
            self.specs.insert(name, KeySpec { first, last, step });
        }
        // Redis 7: subcommands (`CONFIG|GET`) in the 10th element.
        if let Some(RedisFrame::Array(subs)) = items.get(9) {
            for sub in subs {
                self.add(sub, None);
            }
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<KeySpec> {
        self.specs.get(name).copied()
    }
}

/// How replies from several nodes become one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Merge {
    /// `MGET`: the values, in the order of the keys.
    Values,
    /// `DEL`, `EXISTS`, ...: the sum of the integers.
    Sum,
    /// `MSET`, `FLUSHALL`, `AUTH`: the first error, else the first reply.
    First,
    /// `KEYS`: every array, one after another.
    Concat,
}

/// Where a request goes.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// The master of this slot.
    Slot(u16),
    /// No key: one node (the direct destination, or the client's home master).
    Any,
    /// Every master; the replies merged.
    All(Merge),
    /// Keys over several slots: one request per slot, with the arguments `args[0..head]`
    /// followed by the key groups (of `group` arguments each) of that slot; replies merged.
    Split {
        head: usize,
        group: usize,
        merge: Merge,
    },
    /// Keys of several slots in a command that cannot be split.
    CrossSlot,
    Scan,
    Multi,
    Exec,
    Discard,
    Watch(u16),
    Unwatch,
    /// A subscription command (not sharded): to the client's pub/sub node.
    PubSub,
    /// `PUBLISH`: to the node every client of the proxy subscribes on, so that its count
    /// of receivers counts them.
    Publish,
    /// Answered by the proxy with this reply.
    Local(&'static [u8]),
    /// Session commands, sent to every master the client uses (and replayed on new ones).
    Session,
    Quit,
    Reset,
}

pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// The arguments of a request, the name first; `None` when it is not an array of strings.
pub fn args(request: &mut Message) -> Option<Vec<Bytes>> {
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

/// The one slot of `keys`, or `Err` when they span several. `Ok(None)`: no keys.
fn one_slot<'a>(keys: impl IntoIterator<Item = &'a Bytes>) -> Result<Option<u16>, ()> {
    let mut found = None;
    for key in keys {
        let s = slot(key);
        match found {
            None => found = Some(s),
            Some(f) if f != s => return Err(()),
            _ => {}
        }
    }
    Ok(found)
}

fn by_keys<'a>(keys: impl IntoIterator<Item = &'a Bytes>) -> Route {
    match one_slot(keys) {
        Ok(Some(s)) => Route::Slot(s),
        Ok(None) => Route::Any,
        Err(()) => Route::CrossSlot,
    }
}

fn number(arg: Option<&Bytes>) -> Option<usize> {
    std::str::from_utf8(arg?).ok()?.parse().ok()
}

/// Keys of a command with a key count: `numkeys` at `at`, the keys after it.
fn numkeys(args: &[Bytes], at: usize) -> Route {
    match number(args.get(at)) {
        Some(n) if at + 1 + n <= args.len() => by_keys(&args[at + 1..at + 1 + n]),
        // Malformed: the node says what is wrong.
        _ => Route::Any,
    }
}

/// Where `request` goes. `table` is the cluster's `COMMAND` (if learnt).
pub fn route(request: &mut Message, table: Option<&CommandTable>) -> Route {
    let command = request.command();
    let (name, argc) = (command.name.clone(), command.argc);
    if name.len() > 24 {
        return Route::Any;
    }
    let mut buf = [0u8; 24];
    let upper = &mut buf[..name.len()];
    upper.copy_from_slice(&name);
    upper.make_ascii_uppercase();
    let upper: &[u8] = upper;
    // The commonest case first, without parsing the request: one key, first argument.
    if let Some(spec) = table.and_then(|t| t.get(upper))
        && spec.first == 1
        && spec.last == 1
        && !special(upper)
    {
        return match request.command().arg1.as_ref() {
            Some(key) => Route::Slot(slot(key)),
            None => Route::Any,
        };
    }
    let Some(args) = args(request) else {
        return Route::Any;
    };
    let sub = args.get(1).map(|s| s.to_ascii_uppercase());
    match upper {
        b"MGET" => split(&args, 1, 1, Merge::Values),
        b"MSET" => split(&args, 1, 2, Merge::First),
        b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" => split(&args, 1, 1, Merge::Sum),
        b"DBSIZE" => Route::All(Merge::Sum),
        b"KEYS" => Route::All(Merge::Concat),
        b"FLUSHALL" | b"FLUSHDB" => Route::All(Merge::First),
        b"SCRIPT" => match sub.as_deref() {
            Some(b"LOAD" | b"FLUSH") => Route::All(Merge::First),
            _ => Route::Any,
        },
        b"FUNCTION" => match sub.as_deref() {
            Some(b"LOAD" | b"DELETE" | b"FLUSH" | b"RESTORE") => Route::All(Merge::First),
            _ => Route::Any,
        },
        b"SCAN" => Route::Scan,
        b"MULTI" => Route::Multi,
        b"EXEC" => Route::Exec,
        b"DISCARD" => Route::Discard,
        b"WATCH" => match by_keys(&args[1..]) {
            Route::Slot(s) => Route::Watch(s),
            other => other,
        },
        b"UNWATCH" => Route::Unwatch,
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" => Route::PubSub,
        b"PUBLISH" => Route::Publish,
        b"SSUBSCRIBE" | b"SUNSUBSCRIBE" => match by_keys(&args[1..]) {
            // SUNSUBSCRIBE without channels: the pub/sub node's.
            Route::Any => Route::PubSub,
            other => other,
        },
        b"AUTH" | b"HELLO" | b"SELECT" => Route::Session,
        b"CLIENT" => match sub.as_deref() {
            Some(b"SETNAME" | b"SETINFO") => Route::Session,
            _ => Route::Any,
        },
        // The sink follows redirects itself; reads from replicas are not offered.
        b"ASKING" | b"READWRITE" => Route::Local(b"+OK\r\n"),
        b"READONLY" => Route::Local(b"+OK\r\n"),
        b"QUIT" => Route::Quit,
        b"RESET" => Route::Reset,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            numkeys(&args, 2)
        }
        b"ZUNIONSTORE" | b"ZINTERSTORE" | b"ZDIFFSTORE" => match numkeys(&args, 2) {
            Route::Slot(s) if slot(&args[1]) == s => Route::Slot(s),
            Route::Slot(_) => Route::CrossSlot,
            other => other,
        },
        b"ZUNION" | b"ZINTER" | b"ZDIFF" | b"ZINTERCARD" | b"SINTERCARD" | b"LMPOP" | b"ZMPOP" => {
            numkeys(&args, 1)
        }
        b"BLMPOP" | b"BZMPOP" => numkeys(&args, 2),
        b"XREAD" | b"XREADGROUP" => {
            match args.iter().position(|a| a.eq_ignore_ascii_case(b"STREAMS")) {
                Some(at) => {
                    let rest = &args[at + 1..];
                    by_keys(&rest[..rest.len() / 2])
                }
                None => Route::Any,
            }
        }
        b"SORT" | b"SORT_RO" | b"GEORADIUS" | b"GEORADIUSBYMEMBER" => {
            let mut keys: Vec<&Bytes> = args.get(1).into_iter().collect();
            for (i, a) in args.iter().enumerate() {
                if a.eq_ignore_ascii_case(b"STORE") || a.eq_ignore_ascii_case(b"STOREDIST") {
                    keys.extend(args.get(i + 1));
                }
            }
            by_keys(keys)
        }
        b"MIGRATE" => {
            Route::Local(b"-ERR shotover: MIGRATE is not supported through RedisSinkCluster\r\n")
        }
        _ => {
            let spec = table.and_then(|t| {
                let full = sub.as_ref().map(|s| {
                    let mut f = upper.to_vec();
                    f.push(b'|');
                    f.extend_from_slice(s);
                    f
                });
                full.and_then(|f| t.get(&f)).or_else(|| t.get(upper))
            });
            match spec {
                Some(spec) if spec.first > 0 => by_keys(keys_of(&args, spec, argc)),
                Some(_) => Route::Any,
                // Not known to the cluster (or COMMAND not learnt): its first argument is the
                // key, as for most commands; a redirect corrects the rare miss.
                None => match args.get(1) {
                    Some(key) => Route::Slot(slot(key)),
                    None => Route::Any,
                },
            }
        }
    }
}

/// Commands handled by name even though `COMMAND` gives them one key at position 1.
fn special(upper: &[u8]) -> bool {
    matches!(
        upper,
        b"WATCH"
            | b"SSUBSCRIBE"
            | b"SUNSUBSCRIBE"
            | b"DEL"
            | b"UNLINK"
            | b"EXISTS"
            | b"TOUCH"
            | b"MGET"
            | b"SORT"
            | b"SORT_RO"
            | b"GEORADIUS"
            | b"GEORADIUSBYMEMBER"
    )
}

fn keys_of(args: &[Bytes], spec: KeySpec, argc: usize) -> Vec<&Bytes> {
    let last = if spec.last < 0 {
        argc as i64 + 1 + spec.last
    } else {
        spec.last
    };
    let step = spec.step.max(1);
    let mut keys = Vec::new();
    let mut i = spec.first;
    while i <= last && (i as usize) < args.len() {
        keys.push(&args[i as usize]);
        i += step;
    }
    keys
}

fn split(args: &[Bytes], head: usize, group: usize, merge: Merge) -> Route {
    let keys = args[head..].iter().step_by(group);
    if args.len() <= head || !(args.len() - head).is_multiple_of(group) {
        // Malformed (no keys, or a key without its value): the node says so.
        return match args.get(head) {
            Some(key) => Route::Slot(slot(key)),
            None => Route::Any,
        };
    }
    match one_slot(keys) {
        Ok(Some(s)) => Route::Slot(s),
        Ok(None) => Route::Any,
        Err(()) => Route::Split { head, group, merge },
    }
}

/// The parts of a split request: for each slot (in the order first seen), the request for
/// its keys and the positions of its key groups in the original.
pub fn split_parts(args: &[Bytes], head: usize, group: usize) -> Vec<(u16, Bytes, Vec<usize>)> {
    let mut parts: Vec<(u16, Vec<Bytes>, Vec<usize>)> = Vec::new();
    for (i, chunk) in args[head..].chunks(group).enumerate() {
        let s = slot(&chunk[0]);
        let part = match parts.iter_mut().position(|p| p.0 == s) {
            Some(at) => &mut parts[at],
            None => {
                parts.push((s, args[..head].to_vec(), Vec::new()));
                parts.last_mut().expect("pushed")
            }
        };
        part.1.extend(chunk.iter().cloned());
        part.2.push(i);
    }
    parts
        .into_iter()
        .map(|(s, args, positions)| (s, RedisFrame::command(args).to_bytes(), positions))
        .collect()
}

/// Merges the replies of a split or fanned-out request. `positions[i]` are the key
/// positions of part `i` (for [`Merge::Values`]); `total` the number of keys.
pub fn merge(merge: Merge, replies: Vec<Bytes>, positions: &[Vec<usize>], total: usize) -> Bytes {
    if let Some(error) = replies
        .iter()
        .find(|r| matches!(r.first(), Some(b'-' | b'!')))
    {
        return error.clone();
    }
    match merge {
        Merge::First => replies
            .into_iter()
            .next()
            .unwrap_or_else(|| Bytes::from_static(b"+OK\r\n")),
        Merge::Sum => {
            let mut sum = 0i64;
            for r in &replies {
                match RedisFrame::parse(r) {
                    Ok(RedisFrame::Integer(n)) => sum += n,
                    _ => return r.clone(),
                }
            }
            RedisFrame::Integer(sum).to_bytes()
        }
        Merge::Values => {
            let mut values: Vec<Option<RedisFrame>> = vec![None; total];
            for (reply, positions) in replies.iter().zip(positions) {
                match RedisFrame::parse(reply) {
                    Ok(RedisFrame::Array(items)) if items.len() == positions.len() => {
                        for (item, &at) in items.into_iter().zip(positions) {
                            values[at] = Some(item);
                        }
                    }
                    _ => return reply.clone(),
                }
            }
            RedisFrame::Array(
                values
                    .into_iter()
                    .map(|v| v.unwrap_or(RedisFrame::NullBulk))
                    .collect(),
            )
            .to_bytes()
        }
        Merge::Concat => {
            let mut all = Vec::new();
            let mut set = false;
            for r in &replies {
                match RedisFrame::parse(r) {
                    Ok(RedisFrame::Array(items)) => all.extend(items),
                    Ok(RedisFrame::Set(items)) => {
                        set = true;
                        all.extend(items)
                    }
                    _ => return r.clone(),
                }
            }
            if set {
                RedisFrame::Set(all).to_bytes()
            } else {
                RedisFrame::Array(all).to_bytes()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(args: &[&str]) -> Message {
        let frame = RedisFrame::command(args.iter().map(|a| Bytes::from(a.to_string())));
        Message::request(1, frame.to_bytes())
    }

    fn table() -> CommandTable {
        let mut t = CommandTable::default();
        for (name, first, last, step) in [
            ("GET", 1, 1, 1),
            ("SET", 1, 1, 1),
            ("MSETNX", 1, -1, 2),
            ("RENAME", 1, 2, 1),
            ("PING", 0, 0, 0),
            ("OBJECT|ENCODING", 2, 2, 1),
            ("OBJECT", 0, 0, 0),
            ("DEL", 1, -1, 1),
        ] {
            t.specs
                .insert(name.as_bytes().to_vec(), KeySpec { first, last, step });
        }
        t
    }

    #[test]
    fn requests_go_where_their_keys_are() {
        let t = table();
        let r = |a: &[&str]| route(&mut request(a), Some(&t));
        assert_eq!(r(&["get", "foo"]), Route::Slot(12182));
        assert_eq!(r(&["SET", "bar", "1"]), Route::Slot(5061));
        assert_eq!(r(&["PING"]), Route::Any);
        assert_eq!(r(&["RENAME", "{a}1", "{a}2"]), Route::Slot(slot(b"a")));
        assert_eq!(r(&["RENAME", "foo", "bar"]), Route::CrossSlot);
        assert_eq!(r(&["MSETNX", "foo", "1", "bar", "2"]), Route::CrossSlot);
        assert_eq!(r(&["OBJECT", "ENCODING", "foo"]), Route::Slot(12182));
        assert_eq!(r(&["EVAL", "return 1", "0"]), Route::Any);
        assert_eq!(
            r(&["EVAL", "s", "2", "{x}a", "{x}b", "arg"]),
            Route::Slot(slot(b"x"))
        );
        assert_eq!(r(&["EVAL", "s", "2", "foo", "bar"]), Route::CrossSlot);
        assert_eq!(
            r(&["XREAD", "COUNT", "1", "STREAMS", "foo", "0"]),
            Route::Slot(12182)
        );
        assert_eq!(
            r(&["MGET", "foo", "bar"]),
            Route::Split {
                head: 1,
                group: 1,
                merge: Merge::Values
            }
        );
        assert_eq!(r(&["MGET", "{t}1", "{t}2"]), Route::Slot(slot(b"t")));
        assert_eq!(r(&["MSET", "foo", "1", "bar"]), Route::Slot(12182));
        assert_eq!(r(&["DBSIZE"]), Route::All(Merge::Sum));
        assert_eq!(r(&["WATCH", "foo", "bar"]), Route::CrossSlot);
        assert_eq!(r(&["UNKNOWNCMD", "foo"]), Route::Slot(12182));
        // Without the learnt table, the first argument is the key.
        assert_eq!(
            route(&mut request(&["GET", "foo"]), None),
            Route::Slot(12182)
        );
    }

    #[test]
    fn split_requests_are_merged_in_key_order() {
        let args: Vec<Bytes> = ["MGET", "foo", "bar", "{foo}x"]
            .iter()
            .map(|a| Bytes::from(a.to_string()))
            .collect();
        let parts = split_parts(&args, 1, 1);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, 12182);
        assert_eq!(parts[0].2, vec![0, 2]);
        assert_eq!(parts[1].2, vec![1]);
        assert_eq!(
            parts[0].1,
            RedisFrame::command(["MGET", "foo", "{foo}x"]).to_bytes()
        );
        let replies = vec![
            Bytes::from_static(b"*2\r\n$1\r\na\r\n$-1\r\n"),
            Bytes::from_static(b"*1\r\n$1\r\nb\r\n"),
        ];
        let positions: Vec<Vec<usize>> = parts.iter().map(|p| p.2.clone()).collect();
        assert_eq!(
            merge(Merge::Values, replies, &positions, 3),
            Bytes::from_static(b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n")
        );
        assert_eq!(
            merge(
                Merge::Sum,
                vec![Bytes::from_static(b":2\r\n"), Bytes::from_static(b":1\r\n")],
                &[],
                0
            ),
            Bytes::from_static(b":3\r\n")
        );
        assert_eq!(
            merge(
                Merge::First,
                vec![
                    Bytes::from_static(b"+OK\r\n"),
                    Bytes::from_static(b"-ERR no\r\n")
                ],
                &[],
                0
            ),
            Bytes::from_static(b"-ERR no\r\n")
        );
    }
}
