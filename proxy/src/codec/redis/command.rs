//! What a request asks for, read cheaply from its raw bytes: the command name, its
//! argument count and its first argument. Used to keep RESP state (HELLO, pub/sub, MONITOR)
//! and to classify queries, without parsing the whole frame.

use bytes::Bytes;
use shotover_crds::transform::QueryType;

/// The commands the proxy has to know about; everything else passes through as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Hello,
    Subscribe,
    PSubscribe,
    SSubscribe,
    Unsubscribe,
    PUnsubscribe,
    SUnsubscribe,
    Monitor,
    Reset,
    Quit,
    Multi,
    /// `EXEC` or `DISCARD`: the end of a transaction.
    EndMulti,
    /// `CLIENT TRACKING ON|OFF ...` (`true` for ON): invalidation pushes may follow at any
    /// time while tracking is on.
    ClientTracking(bool),
    /// `CLIENT REPLY ON|OFF|SKIP`: the server stops (or resumes) replying.
    ClientReply(ReplyMode),
    /// `CLIENT ID`: the client learns its id, and may give it to another client as the
    /// target of its tracking (`CLIENT TRACKING on REDIRECT <id>`).
    ClientId,
    Other,
}

/// What `CLIENT REPLY` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    Skip,
}

/// A request's command, as far as the proxy needs it.
#[derive(Debug, Clone)]
pub struct Command {
    /// The command name as sent (any case).
    pub name: Bytes,
    pub kind: CommandKind,
    /// Number of arguments after the name.
    pub argc: usize,
    /// The first argument, if any.
    pub arg1: Option<Bytes>,
}

impl Command {
    /// Reads the command of a complete request frame (multibulk or inline).
    pub fn of(frame: &Bytes) -> Command {
        let (name, argc, arg1, arg2) = if frame.first() == Some(&b'*') {
            head(frame).unwrap_or_default()
        } else {
            match split_inline(frame) {
                Ok(args) => {
                    let argc = args.len().saturating_sub(1);
                    let mut it = args.into_iter();
                    (it.next().unwrap_or_default(), argc, it.next(), it.next())
                }
                Err(_) => Default::default(),
            }
        };
        let kind = kind_of(&name, arg1.as_deref(), arg2.as_deref());
        Command {
            name,
            kind,
            argc,
            arg1,
        }
    }

    /// The command name upper-cased, for labels and logs.
    pub fn upper_name(&self) -> String {
        String::from_utf8_lossy(&self.name).to_ascii_uppercase()
    }

    /// The RESP version a HELLO asks for (`HELLO` alone keeps the current one).
    pub fn hello_version(&self) -> Option<u8> {
        if self.kind != CommandKind::Hello {
            return None;
        }
        match self.arg1.as_deref() {
            Some(b"2") => Some(2),
            Some(b"3") => Some(3),
            _ => None,
        }
    }

    pub fn query_type(&self) -> QueryType {
        query_type(&self.name)
    }
}

fn kind_of(name: &[u8], arg1: Option<&[u8]>, arg2: Option<&[u8]>) -> CommandKind {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    if name.len() > 12 {
        CommandKind::Other
    } else if is("HELLO") {
        CommandKind::Hello
    } else if is("SUBSCRIBE") {
        CommandKind::Subscribe
    } else if is("PSUBSCRIBE") {
        CommandKind::PSubscribe
    } else if is("SSUBSCRIBE") {
        CommandKind::SSubscribe
    } else if is("UNSUBSCRIBE") {
        CommandKind::Unsubscribe
    } else if is("PUNSUBSCRIBE") {
        CommandKind::PUnsubscribe
    } else if is("SUNSUBSCRIBE") {
        CommandKind::SUnsubscribe
    } else if is("MONITOR") {
        CommandKind::Monitor
    } else if is("RESET") {
        CommandKind::Reset
    } else if is("QUIT") {
        CommandKind::Quit
    } else if is("MULTI") {
        CommandKind::Multi
    } else if is("EXEC") || is("DISCARD") {
        CommandKind::EndMulti
    } else if is("CLIENT") && arg1.is_some_and(|a| a.eq_ignore_ascii_case(b"TRACKING")) {
        CommandKind::ClientTracking(!arg2.is_some_and(|a| a.eq_ignore_ascii_case(b"OFF")))
    } else if is("CLIENT") && arg1.is_some_and(|a| a.eq_ignore_ascii_case(b"ID")) {
        CommandKind::ClientId
    } else if is("CLIENT") && arg1.is_some_and(|a| a.eq_ignore_ascii_case(b"REPLY")) {
        match arg2 {
            Some(m) if m.eq_ignore_ascii_case(b"OFF") => CommandKind::ClientReply(ReplyMode::Off),
            Some(m) if m.eq_ignore_ascii_case(b"SKIP") => CommandKind::ClientReply(ReplyMode::Skip),
            Some(m) if m.eq_ignore_ascii_case(b"ON") => CommandKind::ClientReply(ReplyMode::On),
            _ => CommandKind::Other,
        }
    } else {
        CommandKind::Other
    }
}

/// First element, element count after it, and second element of an aggregate (`*`, `>`,
/// ...) whose first two elements are bulk strings: a command's name, argc and first
/// argument, or a pub/sub message's kind.
pub fn aggregate_head(frame: &Bytes) -> Option<(Bytes, usize, Option<Bytes>)> {
    head(frame).map(|(name, argc, arg1, _)| (name, argc, arg1))
}

/// First three elements (when they are bulk strings) and the count after the first.
fn head(frame: &Bytes) -> Option<(Bytes, usize, Option<Bytes>, Option<Bytes>)> {
    let (count, next) = int_line(frame, 1)?;
    if count < 1 {
        return None;
    }
    let (name, next) = bulk_at(frame, next)?;
    let (arg1, next) = match count > 1 {
        true => bulk_at(frame, next).map_or((None, next), |(b, n)| (Some(b), n)),
        false => (None, next),
    };
    let arg2 = if count > 2 && arg1.is_some() {
        bulk_at(frame, next).map(|(b, _)| b)
    } else {
        None
    };
    Some((name, count as usize - 1, arg1, arg2))
}

fn int_line(frame: &[u8], from: usize) -> Option<(i64, usize)> {
    let rest = frame.get(from..)?;
    let cr = memchr::memchr(b'\r', rest)?;
    let digits = &rest[..cr];
    let (negative, digits) = match digits.split_first() {
        Some((b'-', tail)) => (true, tail),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some((if negative { -n } else { n }, from + cr + 2))
}

fn bulk_at(frame: &Bytes, pos: usize) -> Option<(Bytes, usize)> {
    if frame.get(pos) != Some(&b'$') {
        return None;
    }
    let (len, data) = int_line(frame, pos + 1)?;
    let end = data + usize::try_from(len).ok()?;
    if end > frame.len() {
        return None;
    }
    Some((frame.slice(data..end), end + 2))
}

/// Splits an inline command line the way Redis does (`sdssplitargs`): whitespace separates
/// arguments; "double quotes" take `\n`, `\xHH` and friends; 'single quotes' take `\'`.
pub fn split_inline(line: &Bytes) -> Result<Vec<Bytes>, &'static str> {
    let s: &[u8] = line;
    let mut args = Vec::new();
    let mut i = 0;
    let unbalanced = "Protocol error: unbalanced quotes in request";
    while i < s.len() {
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= s.len() {
            break;
        }
        if s[i] != b'"' && s[i] != b'\'' {
            let start = i;
            while i < s.len() && !s[i].is_ascii_whitespace() && s[i] != b'"' && s[i] != b'\'' {
                i += 1;
            }
            if i < s.len() && (s[i] == b'"' || s[i] == b'\'') {
                return Err(unbalanced);
            }
            args.push(line.slice(start..i));
            continue;
        }
        let quote = s[i];
        i += 1;
        let mut arg = Vec::new();
        loop {
            let Some(&c) = s.get(i) else {
                return Err(unbalanced);
            };
            if c == b'\\' && i + 1 < s.len() {
                let n = s[i + 1];
                if quote == b'"' {
                    if n == b'x'
                        && i + 3 < s.len()
                        && s[i + 2].is_ascii_hexdigit()
                        && s[i + 3].is_ascii_hexdigit()
                    {
                        let hex = std::str::from_utf8(&s[i + 2..i + 4]).unwrap_or("00");
                        arg.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                        i += 4;
                        continue;
                    }
                    arg.push(match n {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                    i += 2;
                    continue;
                } else if n == b'\'' {
                    arg.push(b'\'');
                    i += 2;
                    continue;
                }
            }
            if c == quote {
                // The closing quote must be followed by a space or the end.
                if s.get(i + 1).is_some_and(|n| !n.is_ascii_whitespace()) {
                    return Err(unbalanced);
                }
                i += 1;
                break;
            }
            arg.push(c);
            i += 1;
        }
        args.push(Bytes::from(arg));
    }
    Ok(args)
}

/// Read commands, as classified by Redis's command table (`readonly` flag).
const READ_COMMANDS: &[&str] = &[
    "GET",
    "MGET",
    "GETRANGE",
    "SUBSTR",
    "STRLEN",
    "EXISTS",
    "TYPE",
    "TTL",
    "PTTL",
    "EXPIRETIME",
    "PEXPIRETIME",
    "KEYS",
    "SCAN",
    "RANDOMKEY",
    "DBSIZE",
    "DUMP",
    "OBJECT",
    "TOUCH",
    "HGET",
    "HMGET",
    "HGETALL",
    "HKEYS",
    "HVALS",
    "HLEN",
    "HEXISTS",
    "HSTRLEN",
    "HSCAN",
    "HRANDFIELD",
    "LRANGE",
    "LINDEX",
    "LLEN",
    "LPOS",
    "SMEMBERS",
    "SISMEMBER",
    "SMISMEMBER",
    "SCARD",
    "SRANDMEMBER",
    "SSCAN",
    "SINTER",
    "SINTERCARD",
    "SUNION",
    "SDIFF",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZRANGEBYLEX",
    "ZREVRANGE",
    "ZREVRANGEBYSCORE",
    "ZREVRANGEBYLEX",
    "ZRANK",
    "ZREVRANK",
    "ZSCORE",
    "ZMSCORE",
    "ZCARD",
    "ZCOUNT",
    "ZLEXCOUNT",
    "ZSCAN",
    "ZRANDMEMBER",
    "ZINTER",
    "ZINTERCARD",
    "ZUNION",
    "ZDIFF",
    "XRANGE",
    "XREVRANGE",
    "XLEN",
    "XREAD",
    "XINFO",
    "XPENDING",
    "GETBIT",
    "BITCOUNT",
    "BITPOS",
    "BITFIELD_RO",
    "PFCOUNT",
    "GEOPOS",
    "GEODIST",
    "GEOHASH",
    "GEORADIUS_RO",
    "GEORADIUSBYMEMBER_RO",
    "GEOSEARCH",
    "LCS",
    "SORT_RO",
    "EVAL_RO",
    "EVALSHA_RO",
    "FCALL_RO",
    "MEMORY",
];

/// Commands that return a value and change it in one step.
const READ_WRITE_COMMANDS: &[&str] = &["GETSET", "GETDEL", "GETEX"];

const PUBSUB_COMMANDS: &[&str] = &[
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "UNSUBSCRIBE",
    "PUNSUBSCRIBE",
    "SUNSUBSCRIBE",
];

/// The query type of a command name.
pub fn query_type(name: &[u8]) -> QueryType {
    let in_list = |list: &[&str]| list.iter().any(|c| name.eq_ignore_ascii_case(c.as_bytes()));
    if in_list(READ_COMMANDS) {
        QueryType::Read
    } else if in_list(READ_WRITE_COMMANDS) {
        QueryType::ReadWrite
    } else if in_list(PUBSUB_COMMANDS) {
        QueryType::PubSubMessage
    } else {
        QueryType::Write
    }
}
