//! RESP framing for both directions.
//!
//! Requests are read the way the Redis server reads them: a frame starting with `*` is a
//! multibulk of bulk strings, anything else is an inline command line (what telnet and
//! `redis-cli` in raw mode send). Responses are any RESP2 or RESP3 value, including
//! attributes, pushes and streamed aggregates.
//!
//! The decoders only find where a frame ends; they are resumable, so a 64 MiB value or an
//! array of a million elements arriving over many reads is scanned once, and they enforce the
//! maximum frame size before buffering. Full parsing lives in [`frame`], used only when a
//! transform asks for it.

pub mod command;
pub mod frame;

use bytes::{Bytes, BytesMut};

use super::DecodeError;

/// Redis's own limit for an inline command line or a length line (PROTO_INLINE_MAX_SIZE).
pub const MAX_INLINE: usize = 64 * 1024;

/// One request read from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A complete frame: a multibulk or an inline command line, with its terminator.
    Frame(Bytes),
    /// Bytes the server ignores without replying (an empty line, `*0`); they were consumed.
    Ignored,
}

/// Splits requests off a client's read buffer.
#[derive(Debug)]
pub struct RequestDecoder {
    max_frame: usize,
    /// Where scanning resumes: the start of the next bulk header of the current multibulk.
    pos: usize,
    /// Bulk strings still to come in the current multibulk (0 = at a frame start).
    left: u64,
    /// How much of a partial inline line was already searched for its newline.
    inline_scanned: usize,
    /// Once a frame is bad, the stream cannot be read further: the same error comes back.
    failed: Option<DecodeError>,
}

impl RequestDecoder {
    pub fn new(max_frame: usize) -> Self {
        RequestDecoder {
            max_frame,
            pos: 0,
            left: 0,
            inline_scanned: 0,
            failed: None,
        }
    }

    /// Takes the next complete request off the front of `buf`; `Ok(None)` means more bytes
    /// are needed (the buffer is left untouched). After an error, every call returns it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.decode_next(buf);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn decode_next(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, DecodeError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if self.pos == 0 {
            if buf[0] != b'*' {
                return self.decode_inline(buf);
            }
            let Some((count, next)) = read_line_int(buf, 1, "multibulk length")? else {
                return Ok(None);
            };
            if count <= 0 {
                // Redis ignores `*0` and `*-1` requests without a reply.
                let _ = buf.split_to(next);
                return Ok(Some(Request::Ignored));
            }
            // Each bulk takes at least 4 bytes (`$0\r\n` is not complete without `\r\n`).
            let min = next.saturating_add((count as usize).saturating_mul(6));
            if min > self.max_frame {
                return Err(too_large(min, self.max_frame));
            }
            self.pos = next;
            self.left = count as u64;
        }
        while self.left > 0 {
            let pos = self.pos;
            if pos >= buf.len() {
                return Ok(None);
            }
            if buf[pos] != b'$' {
                let got = buf[pos] as char;
                self.reset();
                return Err(DecodeError::Malformed(format!(
                    "Protocol error: expected '$', got '{}'",
                    got.escape_default()
                )));
            }
            let Some((len, data)) = read_line_int(buf, pos + 1, "bulk length")? else {
                return Ok(None);
            };
            if len < 0 {
                self.reset();
                return Err(DecodeError::Malformed(
                    "Protocol error: invalid bulk length".into(),
                ));
            }
            let end = data.saturating_add(len as usize).saturating_add(2);
            if end > self.max_frame {
                self.reset();
                return Err(too_large(end, self.max_frame));
            }
            if end > buf.len() {
                super::reserve_for(buf, end);
                return Ok(None);
            }
            if &buf[end - 2..end] != b"\r\n" {
                self.reset();
                return Err(DecodeError::Malformed(
                    "Protocol error: bulk string not terminated by CRLF".into(),
                ));
            }
            self.pos = end;
            self.left -= 1;
        }
        let end = self.pos;
        self.reset();
        Ok(Some(Request::Frame(buf.split_to(end).freeze())))
    }

    fn decode_inline(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, DecodeError> {
        // A line arriving in pieces is searched once, not from its start at every piece.
        let from = self.inline_scanned.min(buf.len());
        let Some(nl) = memchr::memchr(b'\n', &buf[from..]).map(|i| from + i) else {
            if buf.len() > MAX_INLINE {
                return Err(DecodeError::Malformed(
                    "Protocol error: too big inline request".into(),
                ));
            }
            self.inline_scanned = buf.len();
            return Ok(None);
        };
        self.inline_scanned = 0;
        if nl > MAX_INLINE {
            return Err(DecodeError::Malformed(
                "Protocol error: too big inline request".into(),
            ));
        }
        let line = buf.split_to(nl + 1).freeze();
        match command::split_inline(&line) {
            Ok(args) if args.is_empty() => Ok(Some(Request::Ignored)),
            Ok(_) => Ok(Some(Request::Frame(line))),
            Err(msg) => Err(DecodeError::Malformed(msg.into())),
        }
    }

    fn reset(&mut self) {
        self.pos = 0;
        self.left = 0;
    }
}

/// Splits responses (any RESP2/RESP3 value) off an upstream's read buffer.
#[derive(Debug)]
pub struct ResponseDecoder {
    max_frame: usize,
    /// Where scanning resumes: the start of the next element header.
    pos: usize,
    /// Elements left in each open aggregate; `STREAMED` for a `*?` aggregate ended by `.`.
    stack: Vec<u64>,
    /// Where the search for the end of the line at `pos` resumes (0: at its start): a long
    /// line arriving in pieces is searched once.
    line_scanned: usize,
    /// Where the next chunk of a streamed string at `pos` starts (0: its first chunk).
    chunk_at: usize,
}

const STREAMED: u64 = u64::MAX;

impl ResponseDecoder {
    pub fn new(max_frame: usize) -> Self {
        ResponseDecoder {
            max_frame,
            pos: 0,
            stack: Vec::new(),
            line_scanned: 0,
            chunk_at: 0,
        }
    }

    /// Takes the next complete response off the front of `buf`; `Ok(None)` means more bytes
    /// are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
        loop {
            let pos = self.pos;
            if pos >= buf.len() {
                return Ok(None);
            }
            if pos > self.max_frame {
                return Err(too_large(pos, self.max_frame));
            }
            let kind = buf[pos];
            let search = self.line_scanned.max(pos + 1);
            let Some(line_end) = find_crlf_from(buf, pos + 1, search, self.max_frame)? else {
                // Resume at the last byte: it may be the `\r` of the `\r\n`.
                self.line_scanned = buf.len().saturating_sub(1).max(pos + 1);
                return Ok(None);
            };
            self.line_scanned = 0;
            let line = &buf[pos + 1..line_end];
            let next = line_end + 2;
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => self.pos = next,
                b'$' | b'!' | b'=' if line == b"?" => {
                    let from = self.chunk_at.max(next);
                    match self.scan_streamed_string(buf, from)? {
                        Ok(end) => {
                            self.chunk_at = 0;
                            self.pos = end;
                        }
                        Err(reached) => {
                            self.chunk_at = reached;
                            return Ok(None);
                        }
                    }
                }
                b'$' | b'!' | b'=' => {
                    let len = parse_int(line, "bulk length")?;
                    if len >= 0 {
                        let end = next.saturating_add(len as usize).saturating_add(2);
                        if end > self.max_frame {
                            return Err(too_large(end, self.max_frame));
                        }
                        if end > buf.len() {
                            super::reserve_for(buf, end);
                            return Ok(None);
                        }
                        self.pos = end;
                    } else {
                        self.pos = next;
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    self.pos = next;
                    let count = if line == b"?" {
                        STREAMED
                    } else {
                        let n = parse_int(line, "aggregate length")?;
                        match kind {
                            // An attribute is followed by the value it annotates, even
                            // when it has no pairs.
                            b'|' if n >= 0 => (n as u64).saturating_mul(2).saturating_add(1),
                            _ if n <= 0 => 0,
                            b'%' => (n as u64).saturating_mul(2),
                            _ => n as u64,
                        }
                    };
                    if count > 0 {
                        if count != STREAMED
                            && next.saturating_add(count.saturating_mul(3) as usize)
                                > self.max_frame
                        {
                            return Err(too_large(next + count as usize * 3, self.max_frame));
                        }
                        // No cap on the nesting: Redis sends what a script returned,
                        // however deep, and the client must get it. Each level took at
                        // least 4 bytes of the frame, whose size is bounded.
                        self.stack.push(count);
                        continue;
                    }
                }
                b'.' => {
                    self.pos = next;
                    if self.stack.last() != Some(&STREAMED) {
                        return Err(DecodeError::Malformed(
                            "unexpected end of streamed aggregate".into(),
                        ));
                    }
                    self.stack.pop();
                }
                other => {
                    return Err(DecodeError::Malformed(format!(
                        "unknown RESP type byte 0x{other:02x}"
                    )));
                }
            }
            // One element finished: close every aggregate it completes.
            loop {
                match self.stack.last_mut() {
                    None => {
                        let end = self.pos;
                        self.pos = 0;
                        return Ok(Some(buf.split_to(end).freeze()));
                    }
                    Some(left) if *left == STREAMED => break,
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.stack.pop();
                    }
                }
            }
        }
    }

    /// `$?` then `;len` chunks until `;0`, from the chunk at `pos`: `Ok(end)` of the whole
    /// string, or `Err(at)` where the first chunk not in `buf` yet starts.
    fn scan_streamed_string(
        &self,
        buf: &BytesMut,
        mut pos: usize,
    ) -> Result<Result<usize, usize>, DecodeError> {
        loop {
            if pos >= buf.len() {
                return Ok(Err(pos));
            }
            if buf[pos] != b';' {
                return Err(DecodeError::Malformed(
                    "expected ';' in streamed string".into(),
                ));
            }
            let Some((len, data)) = read_line_int(buf, pos + 1, "chunk length")? else {
                return Ok(Err(pos));
            };
            if len == 0 {
                return Ok(Ok(data));
            }
            let end = data.saturating_add(len.max(0) as usize).saturating_add(2);
            if end > self.max_frame {
                return Err(too_large(end, self.max_frame));
            }
            if end > buf.len() {
                return Ok(Err(pos));
            }
            pos = end;
        }
    }
}

fn too_large(size: usize, max: usize) -> DecodeError {
    DecodeError::FrameTooLarge { size, max }
}

/// Finds the `\r\n` ending the line that starts at `from`; `Ok(None)` if it is not in `buf`
/// yet. A line longer than `limit` is refused: requests use Redis's inline limit, responses
/// the frame limit (MONITOR lines and Lua status replies can be long).
fn find_crlf(buf: &[u8], from: usize, limit: usize) -> Result<Option<usize>, DecodeError> {
    find_crlf_from(buf, from, from, limit)
}

/// [`find_crlf`] for the line starting at `from`, searching from `search` (the bytes before
/// it are known to hold no `\r`).
fn find_crlf_from(
    buf: &[u8],
    from: usize,
    search: usize,
    limit: usize,
) -> Result<Option<usize>, DecodeError> {
    let end = buf.len().min(from.saturating_add(limit));
    let window = &buf[search.min(end)..end];
    match memchr::memchr(b'\r', window).map(|i| search + i) {
        Some(at) if at + 1 < buf.len() => {
            if buf[at + 1] == b'\n' {
                Ok(Some(at))
            } else {
                Err(DecodeError::Malformed(
                    "Protocol error: expected CRLF".into(),
                ))
            }
        }
        Some(_) => Ok(None),
        None if buf.len() >= from.saturating_add(limit) => Err(DecodeError::Malformed(
            "Protocol error: line too long".into(),
        )),
        None => Ok(None),
    }
}

/// Reads the integer line starting at `from`; returns it and the offset after its `\r\n`.
fn read_line_int(buf: &[u8], from: usize, what: &str) -> Result<Option<(i64, usize)>, DecodeError> {
    let Some(end) = find_crlf(buf, from, MAX_INLINE)? else {
        return Ok(None);
    };
    Ok(Some((parse_int(&buf[from..end], what)?, end + 2)))
}

fn parse_int(digits: &[u8], what: &str) -> Result<i64, DecodeError> {
    let bad = || DecodeError::Malformed(format!("Protocol error: invalid {what}"));
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(bad());
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Ok(if neg { -n } else { n })
}

#[cfg(test)]
mod tests;
