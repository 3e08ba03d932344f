//! A parsed RESP2/RESP3 value, with zero-copy slices of the frame it came from, and its
//! encoder. Parsing happens only when a transform asks for it.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use super::command::split_inline;

/// A RESP value. The three nulls are kept apart so a re-encoded frame says what it said.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisFrame {
    Simple(Bytes),
    Error(Bytes),
    Integer(i64),
    Bulk(Bytes),
    /// `$-1` (RESP2 null bulk string).
    NullBulk,
    /// `*-1` (RESP2 null array).
    NullArray,
    Array(Vec<RedisFrame>),
    /// `_` (RESP3 null).
    Null,
    /// `,` kept as its text, so no precision is lost.
    Double(Bytes),
    Boolean(bool),
    BlobError(Bytes),
    /// `=` with its `fmt:` prefix.
    Verbatim(Bytes),
    BigNumber(Bytes),
    Map(Vec<(RedisFrame, RedisFrame)>),
    Set(Vec<RedisFrame>),
    Push(Vec<RedisFrame>),
    Attribute(Vec<(RedisFrame, RedisFrame)>, Box<RedisFrame>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed RESP frame: {0}")]
pub struct ParseError(pub &'static str);

impl RedisFrame {
    /// Parses one complete request: a multibulk or an inline line (as an array of bulks).
    pub fn parse_request(bytes: &Bytes) -> Result<RedisFrame, ParseError> {
        if bytes.first() == Some(&b'*') {
            Self::parse(bytes)
        } else {
            let args = split_inline(bytes).map_err(ParseError)?;
            Ok(RedisFrame::Array(
                args.into_iter().map(RedisFrame::Bulk).collect(),
            ))
        }
    }

    /// Parses one complete RESP value.
    pub fn parse(bytes: &Bytes) -> Result<RedisFrame, ParseError> {
        let mut pos = 0;
        let frame = parse_at(bytes, &mut pos, 0)?;
        Ok(frame)
    }

    /// A command as an array of bulk strings.
    pub fn command<I, A>(args: I) -> RedisFrame
    where
        I: IntoIterator<Item = A>,
        A: Into<Bytes>,
    {
        RedisFrame::Array(
            args.into_iter()
                .map(|a| RedisFrame::Bulk(a.into()))
                .collect(),
        )
    }

    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            RedisFrame::Simple(s) => line(out, b'+', s),
            RedisFrame::Error(s) => line(out, b'-', s),
            RedisFrame::Integer(n) => line(out, b':', n.to_string().as_bytes()),
            RedisFrame::Bulk(b) => blob(out, b'$', b),
            RedisFrame::NullBulk => out.put_slice(b"$-1\r\n"),
            RedisFrame::NullArray => out.put_slice(b"*-1\r\n"),
            RedisFrame::Array(items) => aggregate(out, b'*', items),
            RedisFrame::Null => out.put_slice(b"_\r\n"),
            RedisFrame::Double(d) => line(out, b',', d),
            RedisFrame::Boolean(b) => out.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            RedisFrame::BlobError(b) => blob(out, b'!', b),
            RedisFrame::Verbatim(b) => blob(out, b'=', b),
            RedisFrame::BigNumber(n) => line(out, b'(', n),
            RedisFrame::Map(pairs) => pairs_out(out, b'%', pairs),
            RedisFrame::Set(items) => aggregate(out, b'~', items),
            RedisFrame::Push(items) => aggregate(out, b'>', items),
            RedisFrame::Attribute(pairs, value) => {
                pairs_out(out, b'|', pairs);
                value.encode(out);
            }
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// The bytes of a string-like value.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            RedisFrame::Simple(b) | RedisFrame::Bulk(b) | RedisFrame::Verbatim(b) => Some(b),
            _ => None,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, RedisFrame::Error(_) | RedisFrame::BlobError(_))
    }
}

fn line(out: &mut BytesMut, kind: u8, s: &[u8]) {
    out.reserve(s.len() + 3);
    out.put_u8(kind);
    out.put_slice(s);
    out.put_slice(b"\r\n");
}

fn blob(out: &mut BytesMut, kind: u8, b: &[u8]) {
    line(out, kind, b.len().to_string().as_bytes());
    out.reserve(b.len() + 2);
    out.put_slice(b);
    out.put_slice(b"\r\n");
}

fn aggregate(out: &mut BytesMut, kind: u8, items: &[RedisFrame]) {
    line(out, kind, items.len().to_string().as_bytes());
    for item in items {
        item.encode(out);
    }
}

fn pairs_out(out: &mut BytesMut, kind: u8, pairs: &[(RedisFrame, RedisFrame)]) {
    line(out, kind, pairs.len().to_string().as_bytes());
    for (k, v) in pairs {
        k.encode(out);
        v.encode(out);
    }
}

/// How deep a parsed value may nest. Parsing, encoding, printing and dropping a value recurse
/// once per level, on the stack of the worker that serves the connection: 128 levels stay far
/// inside it (1024 overflowed a debug build's 2 MiB stack). Deeper replies are still framed
/// and forwarded (the response decoder does not recurse); only a transform that parses them
/// gets this error.
pub const MAX_DEPTH: usize = 128;

fn parse_at(b: &Bytes, pos: &mut usize, depth: usize) -> Result<RedisFrame, ParseError> {
    if depth > MAX_DEPTH {
        return Err(ParseError("nested too deeply"));
    }
    let kind = *b.get(*pos).ok_or(ParseError("truncated"))?;
    let start = *pos + 1;
    let end = start
        + memchr::memchr(b'\r', b.get(start..).ok_or(ParseError("truncated"))?)
            .ok_or(ParseError("missing CRLF"))?;
    let text = b.slice(start..end);
    *pos = end + 2;
    let int = |t: &Bytes| -> Result<i64, ParseError> {
        std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(ParseError("invalid integer"))
    };
    Ok(match kind {
        b'+' => RedisFrame::Simple(text),
        b'-' => RedisFrame::Error(text),
        b':' => RedisFrame::Integer(int(&text)?),
        b'_' => RedisFrame::Null,
        b',' => RedisFrame::Double(text),
        b'#' => RedisFrame::Boolean(&text[..] == b"t"),
        b'(' => RedisFrame::BigNumber(text),
        b'$' | b'!' | b'=' => {
            let data = if &text[..] == b"?" {
                streamed_string(b, pos)?
            } else {
                let len = int(&text)?;
                if len < 0 {
                    return Ok(RedisFrame::NullBulk);
                }
                let data_end = *pos + len as usize;
                if data_end + 2 > b.len() {
                    return Err(ParseError("truncated"));
                }
                let data = b.slice(*pos..data_end);
                *pos = data_end + 2;
                data
            };
            match kind {
                b'$' => RedisFrame::Bulk(data),
                b'!' => RedisFrame::BlobError(data),
                _ => RedisFrame::Verbatim(data),
            }
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let streamed = &text[..] == b"?";
            let n = if streamed { -1 } else { int(&text)? };
            if n < 0 && !streamed {
                return Ok(if kind == b'*' {
                    RedisFrame::NullArray
                } else {
                    RedisFrame::Null
                });
            }
            let per = if kind == b'%' || kind == b'|' { 2 } else { 1 };
            let mut items = Vec::with_capacity((n.max(0) as usize * per).min(1024));
            loop {
                if streamed {
                    if b.get(*pos) == Some(&b'.') {
                        *pos += 3;
                        break;
                    }
                } else if items.len() == n as usize * per {
                    break;
                }
                items.push(parse_at(b, pos, depth + 1)?);
            }
            match kind {
                b'*' => RedisFrame::Array(items),
                b'~' => RedisFrame::Set(items),
                b'>' => RedisFrame::Push(items),
                b'%' => RedisFrame::Map(pairs(items)),
                _ => {
                    let value = parse_at(b, pos, depth + 1)?;
                    RedisFrame::Attribute(pairs(items), Box::new(value))
                }
            }
        }
        _ => return Err(ParseError("unknown type byte")),
    })
}

fn pairs(items: Vec<RedisFrame>) -> Vec<(RedisFrame, RedisFrame)> {
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

fn streamed_string(b: &Bytes, pos: &mut usize) -> Result<Bytes, ParseError> {
    let mut data = BytesMut::new();
    loop {
        if b.get(*pos) != Some(&b';') {
            return Err(ParseError("bad streamed string chunk"));
        }
        let start = *pos + 1;
        let end = start + memchr::memchr(b'\r', &b[start..]).ok_or(ParseError("missing CRLF"))?;
        let len: usize = std::str::from_utf8(&b[start..end])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(ParseError("invalid chunk length"))?;
        *pos = end + 2;
        if len == 0 {
            return Ok(data.freeze());
        }
        if *pos + len + 2 > b.len() {
            return Err(ParseError("truncated"));
        }
        data.put_slice(&b[*pos..*pos + len]);
        *pos += len + 2;
    }
}

/// redis-cli style rendering, for logs.
impl fmt::Display for RedisFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |f: &mut fmt::Formatter<'_>, b: &[u8]| {
            const SHOWN: usize = 256;
            let shown = &b[..b.len().min(SHOWN)];
            write!(f, "{:?}", String::from_utf8_lossy(shown))?;
            if b.len() > SHOWN {
                write!(f, "...({} bytes)", b.len())?;
            }
            Ok(())
        };
        let list = |f: &mut fmt::Formatter<'_>, open: &str, items: &[RedisFrame]| {
            f.write_str(open)?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{item}")?;
            }
            f.write_str("]")
        };
        match self {
            RedisFrame::Simple(s) | RedisFrame::BigNumber(s) | RedisFrame::Double(s) => {
                f.write_str(&String::from_utf8_lossy(s))
            }
            RedisFrame::Error(s) | RedisFrame::BlobError(s) => {
                write!(f, "(error) {}", String::from_utf8_lossy(s))
            }
            RedisFrame::Integer(n) => write!(f, "(integer) {n}"),
            RedisFrame::Bulk(b) | RedisFrame::Verbatim(b) => text(f, b),
            RedisFrame::NullBulk | RedisFrame::NullArray | RedisFrame::Null => f.write_str("(nil)"),
            RedisFrame::Boolean(b) => write!(f, "({b})"),
            RedisFrame::Array(items) => list(f, "[", items),
            RedisFrame::Set(items) => list(f, "set[", items),
            RedisFrame::Push(items) => list(f, "push[", items),
            RedisFrame::Map(pairs) | RedisFrame::Attribute(pairs, _) => {
                f.write_str("{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")?;
                if let RedisFrame::Attribute(_, value) = self {
                    write!(f, " {value}")?;
                }
                Ok(())
            }
        }
    }
}
