//! Reading CQL bodies, only as far as a transform asks: the options of STARTUP, the query of
//! QUERY and PREPARE, the statement count of BATCH, the kind of a RESULT, the id of a
//! prepared statement, the code and message of an ERROR. Bodies compressed with the
//! connection's LZ4 or Snappy are decompressed first (a copy, made only here).
//!
//! Every read is bounds-checked: a short or lying body is a [`BodyError`], never a panic.

use std::borrow::Cow;

use shotover_crds::transform::QueryType;

use super::{Compression, HEADER_LEN, Header, flags};

/// Decompressed bodies larger than this are refused (a small frame must not expand into
/// gigabytes).
pub const MAX_DECOMPRESSED: usize = 256 * 1024 * 1024;
/// The most a byte of LZ4 or Snappy data can expand to (LZ4: 255, its longest match per
/// byte of length code; Snappy: 64 bytes from a 3-byte copy): a body claiming more is
/// refused before anything is allocated for it.
const LZ4_RATIO: usize = 255;
const SNAPPY_RATIO: usize = 22;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable CQL body: {0}")]
pub struct BodyError(pub &'static str);

/// The body of an envelope, decompressed when its header says so.
pub fn body<'a>(
    frame: &'a [u8],
    header: &Header,
    compression: Compression,
) -> Result<Cow<'a, [u8]>, BodyError> {
    let raw = frame
        .get(HEADER_LEN..HEADER_LEN + header.body_len)
        .ok_or(BodyError("body shorter than its header says"))?;
    if header.flags & flags::COMPRESSION == 0 {
        return Ok(Cow::Borrowed(raw));
    }
    match compression {
        Compression::None => Err(BodyError("compressed body but no compression negotiated")),
        Compression::Lz4 => {
            // Protocol v4: a 4-byte big-endian uncompressed length, then one LZ4 block.
            let (len, block) = raw
                .split_first_chunk::<4>()
                .ok_or(BodyError("LZ4 body shorter than its length prefix"))?;
            let len = u32::from_be_bytes(*len) as usize;
            if len > MAX_DECOMPRESSED {
                return Err(BodyError("LZ4 body claims more than 256 MiB"));
            }
            if len > block.len().saturating_mul(LZ4_RATIO).saturating_add(16) {
                return Err(BodyError("LZ4 body claims more than its data can hold"));
            }
            lz4_flex::block::decompress(block, len)
                .map(Cow::Owned)
                .map_err(|_| BodyError("invalid LZ4 data"))
        }
        Compression::Snappy => {
            let len =
                snap::raw::decompress_len(raw).map_err(|_| BodyError("invalid Snappy data"))?;
            if len > MAX_DECOMPRESSED {
                return Err(BodyError("Snappy body claims more than 256 MiB"));
            }
            if len > raw.len().saturating_mul(SNAPPY_RATIO).saturating_add(32) {
                return Err(BodyError("Snappy body claims more than its data can hold"));
            }
            snap::raw::Decoder::new()
                .decompress_vec(raw)
                .map(Cow::Owned)
                .map_err(|_| BodyError("invalid Snappy data"))
        }
    }
}

/// The uncompressed length a compressed body declares (LZ4's length prefix, Snappy's
/// varint), read without decompressing anything; `None` without compression or when the
/// body is too short to say.
pub fn declared_len(raw: &[u8], compression: Compression) -> Option<usize> {
    match compression {
        Compression::None => None,
        Compression::Lz4 => raw
            .first_chunk::<4>()
            .map(|len| u32::from_be_bytes(*len) as usize),
        Compression::Snappy => snap::raw::decompress_len(raw).ok(),
    }
}

/// `body` compressed the way [`body`] decompresses it.
pub fn compress(body: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => body.to_vec(),
        Compression::Lz4 => {
            let mut out = Vec::with_capacity(4 + body.len() / 2);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(&lz4_flex::block::compress(body));
            out
        }
        Compression::Snappy => snap::raw::Encoder::new()
            .compress_vec(body)
            .unwrap_or_else(|_| body.to_vec()),
    }
}

/// Where the message proper starts in a body: after the tracing id (a response with the
/// TRACING flag), the warnings (WARNING) and the custom payload (CUSTOM_PAYLOAD).
pub fn extras_len(header: &Header, body: &[u8]) -> Result<usize, BodyError> {
    let mut r = Reader::new(body);
    let response = header.direction == super::Direction::Response;
    if response && header.flags & flags::TRACING != 0 {
        r.take(16)?;
    }
    if response && header.flags & flags::WARNING != 0 {
        for _ in 0..r.short()? {
            r.string()?;
        }
    }
    if header.flags & flags::CUSTOM_PAYLOAD != 0 {
        for _ in 0..r.short()? {
            r.string()?;
            let len = r.int()?;
            if len > 0 {
                r.take(len as usize)?;
            }
        }
    }
    Ok(body.len() - r.rest.len())
}

/// The message proper of an envelope: [`body`] without what [`extras_len`] skips.
pub fn message<'a>(
    frame: &'a [u8],
    header: &Header,
    compression: Compression,
) -> Result<Cow<'a, [u8]>, BodyError> {
    let whole = body(frame, header, compression)?;
    let skip = extras_len(header, &whole)?;
    Ok(match whole {
        Cow::Borrowed(b) => Cow::Borrowed(&b[skip..]),
        Cow::Owned(mut v) => {
            v.drain(..skip);
            Cow::Owned(v)
        }
    })
}

/// A cursor over a body, reading the protocol's notations.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Reader { rest: body }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BodyError> {
        if self.rest.len() < n {
            return Err(BodyError("body ends early"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub fn byte(&mut self) -> Result<u8, BodyError> {
        Ok(self.take(1)?[0])
    }

    pub fn short(&mut self) -> Result<u16, BodyError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn int(&mut self) -> Result<i32, BodyError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `[string]`: a short length, then UTF-8.
    pub fn string(&mut self) -> Result<&'a str, BodyError> {
        let len = self.short()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| BodyError("string is not UTF-8"))
    }

    /// `[long string]`: an int length, then UTF-8.
    pub fn long_string(&mut self) -> Result<&'a str, BodyError> {
        let len = usize::try_from(self.int()?).map_err(|_| BodyError("negative length"))?;
        std::str::from_utf8(self.take(len)?).map_err(|_| BodyError("string is not UTF-8"))
    }

    /// `[bytes]`: an int length, then bytes; a negative length is null.
    pub fn bytes(&mut self) -> Result<Option<&'a [u8]>, BodyError> {
        let len = self.int()?;
        if len < 0 {
            return Ok(None);
        }
        self.take(len as usize).map(Some)
    }

    pub fn skip(&mut self, n: usize) -> Result<(), BodyError> {
        self.take(n).map(|_| ())
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// `[short bytes]`: a short length, then bytes.
    pub fn short_bytes(&mut self) -> Result<&'a [u8], BodyError> {
        let len = self.short()? as usize;
        self.take(len)
    }

    /// `[string map]`.
    pub fn string_map(&mut self) -> Result<Vec<(&'a str, &'a str)>, BodyError> {
        let n = self.short()?;
        (0..n)
            .map(|_| Ok((self.string()?, self.string()?)))
            .collect()
    }
}

/// The compression a STARTUP body asks for.
pub fn startup_compression(body: &[u8]) -> Result<Compression, BodyError> {
    let options = Reader::new(body).string_map()?;
    Ok(
        match options
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("COMPRESSION"))
            .map(|(_, v)| v.to_ascii_lowercase())
            .as_deref()
        {
            Some("lz4") => Compression::Lz4,
            Some("snappy") => Compression::Snappy,
            _ => Compression::None,
        },
    )
}

/// The query text of a QUERY or PREPARE body (it comes first in both).
pub fn query_text(body: &[u8]) -> Result<&str, BodyError> {
    Reader::new(body).long_string()
}

/// How many statements a BATCH body holds.
pub fn batch_len(body: &[u8]) -> Result<u16, BodyError> {
    let mut r = Reader::new(body);
    r.byte()?;
    r.short()
}

/// RESULT kinds (protocol spec, section 4.2.5).
pub mod result_kind {
    pub const VOID: i32 = 1;
    pub const ROWS: i32 = 2;
    pub const SET_KEYSPACE: i32 = 3;
    pub const PREPARED: i32 = 4;
    pub const SCHEMA_CHANGE: i32 = 5;
}

/// The id of a RESULT of kind Prepared, `None` for other results.
pub fn prepared_id(body: &[u8]) -> Result<Option<&[u8]>, BodyError> {
    let mut r = Reader::new(body);
    if r.int()? != result_kind::PREPARED {
        return Ok(None);
    }
    r.short_bytes().map(Some)
}

/// The id an EXECUTE body runs.
pub fn execute_id(body: &[u8]) -> Result<&[u8], BodyError> {
    Reader::new(body).short_bytes()
}

/// The code and message of an ERROR body.
pub fn error(body: &[u8]) -> Result<(i32, &str), BodyError> {
    let mut r = Reader::new(body);
    Ok((r.int()?, r.string()?))
}

/// The first keyword of a CQL statement, upper-cased, skipping whitespace and comments
/// (`SELECT`, `INSERT`, `BEGIN` for a batch...). Empty when there is none.
pub fn statement_keyword(query: &str) -> String {
    let mut rest = query;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("--").or_else(|| rest.strip_prefix("//")) {
            rest = after.split_once('\n').map_or("", |(_, tail)| tail);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, tail)| tail);
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .take(16)
        .collect::<String>()
        .to_ascii_uppercase()
}

/// What a statement does, from its first keyword. Statements we do not know count as
/// writes, so that a deny-list of writes errs on the side of refusing.
pub fn statement_type(keyword: &str) -> QueryType {
    match keyword {
        "SELECT" | "USE" | "LIST" | "DESCRIBE" | "DESC" => QueryType::Read,
        "CREATE" | "ALTER" | "DROP" | "GRANT" | "REVOKE" => QueryType::SchemaChange,
        _ => QueryType::Write,
    }
}

/// A one-line description of a frame, for DebugPrinter: version, stream, opcode and what
/// the body says (the query, the result kind, the error).
pub fn describe(header: &Header, body: Result<&[u8], &BodyError>) -> String {
    use super::Opcode;
    let head = format!(
        "v{} stream {} {}",
        header.version,
        header.stream,
        header.opcode.name()
    );
    let body = match body {
        Ok(b) => b,
        Err(e) => return format!("{head} <{e}>"),
    };
    let detail = match header.opcode {
        Opcode::Query | Opcode::Prepare => query_text(body).map(|q| {
            let q: String = q.chars().take(200).collect();
            format!("{q:?}")
        }),
        Opcode::Execute => execute_id(body).map(|id| {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            format!("id {hex}")
        }),
        Opcode::Batch => batch_len(body).map(|n| format!("{n} statements")),
        Opcode::Result => Reader::new(body).int().map(|kind| {
            match kind {
                result_kind::VOID => "Void",
                result_kind::ROWS => "Rows",
                result_kind::SET_KEYSPACE => "SetKeyspace",
                result_kind::PREPARED => "Prepared",
                result_kind::SCHEMA_CHANGE => "SchemaChange",
                _ => "unknown kind",
            }
            .to_string()
        }),
        Opcode::Error => error(body).map(|(code, message)| format!("0x{code:04X} {message:?}")),
        _ => Ok(format!("{} body bytes", body.len())),
    };
    match detail {
        Ok(detail) => format!("{head} {detail}"),
        Err(e) => format!("{head} <{e}>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::cassandra::{Direction, Opcode};
    use bytes::{BufMut, BytesMut};

    fn frame(flags: u8, body: &[u8]) -> (Vec<u8>, Header) {
        let header = Header {
            version: 4,
            direction: Direction::Request,
            flags,
            stream: 1,
            opcode: Opcode::Query,
            body_len: body.len(),
        };
        let mut out = BytesMut::new();
        header.encode(&mut out);
        out.put_slice(body);
        (out.to_vec(), header)
    }

    fn long_string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as i32).to_be_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn lz4_and_snappy_bodies_decompress_to_the_query() {
        let plain = long_string("SELECT * FROM ks.t WHERE k = 1");
        let mut lz4 = (plain.len() as u32).to_be_bytes().to_vec();
        lz4.extend(lz4_flex::block::compress(&plain));
        let snappy = snap::raw::Encoder::new()
            .compress_vec(&plain)
            .expect("snappy");
        for (compression, compressed) in [(Compression::Lz4, lz4), (Compression::Snappy, snappy)] {
            let (bytes, header) = frame(flags::COMPRESSION, &compressed);
            let body = body(&bytes, &header, compression).expect("decompresses");
            assert_eq!(
                query_text(&body).expect("query"),
                "SELECT * FROM ks.t WHERE k = 1"
            );
        }
    }

    #[test]
    fn compressed_bodies_are_bounded_by_what_their_data_can_hold() {
        // The most compressible bodies still decompress...
        for compression in [Compression::Lz4, Compression::Snappy] {
            let plain = vec![0u8; 1_000_000];
            let (bytes, header) = frame(flags::COMPRESSION, &compress(&plain, compression));
            assert_eq!(
                body(&bytes, &header, compression).expect("valid").len(),
                1_000_000
            );
        }
        // ...and a few bytes claiming 200 MB are refused before any allocation.
        let mut lz4 = 200_000_000u32.to_be_bytes().to_vec();
        lz4.extend([0x1F, 0x00, 0x01, 0x00]);
        let (bytes, header) = frame(flags::COMPRESSION, &lz4);
        assert_eq!(
            body(&bytes, &header, Compression::Lz4),
            Err(BodyError("LZ4 body claims more than its data can hold"))
        );
        let mut snappy = Vec::new();
        let mut n = 200_000_000u32;
        while n >= 0x80 {
            snappy.push((n as u8) | 0x80);
            n >>= 7;
        }
        snappy.push(n as u8);
        snappy.extend([0x00, 0x41]);
        let (bytes, header) = frame(flags::COMPRESSION, &snappy);
        assert_eq!(
            body(&bytes, &header, Compression::Snappy),
            Err(BodyError("Snappy body claims more than its data can hold"))
        );
    }

    #[test]
    fn bad_compressed_bodies_are_errors_not_panics() {
        let (bytes, header) = frame(flags::COMPRESSION, &[0xFF, 0xFF, 0xFF, 0xFF, 1, 2]);
        assert_eq!(
            body(&bytes, &header, Compression::Lz4),
            Err(BodyError("LZ4 body claims more than 256 MiB"))
        );
        let (bytes, header) = frame(flags::COMPRESSION, &[0, 0, 0, 9, 0xF0]);
        assert_eq!(
            body(&bytes, &header, Compression::Lz4),
            Err(BodyError("invalid LZ4 data"))
        );
        assert_eq!(
            body(&bytes, &header, Compression::None),
            Err(BodyError("compressed body but no compression negotiated"))
        );
        assert_eq!(
            query_text(&[0, 0, 0, 50, b'x']),
            Err(BodyError("body ends early"))
        );
        assert_eq!(
            query_text(&[0xFF, 0, 0, 1]),
            Err(BodyError("negative length"))
        );
    }

    #[test]
    fn startup_options_name_the_compression() {
        let mut body = vec![0, 2];
        for s in ["CQL_VERSION", "3.0.0", "COMPRESSION", "lz4"] {
            body.extend((s.len() as u16).to_be_bytes());
            body.extend(s.as_bytes());
        }
        assert_eq!(startup_compression(&body), Ok(Compression::Lz4));
        assert_eq!(startup_compression(&[0, 0]), Ok(Compression::None));
    }

    #[test]
    fn statements_are_classified_by_their_first_keyword() {
        let cases = [
            ("select * from t", "SELECT", QueryType::Read),
            (
                "  -- note\n/* x */ INSERT INTO t (k) VALUES (1)",
                "INSERT",
                QueryType::Write,
            ),
            (
                "UPDATE t SET v = 1 WHERE k = 1 IF v = 0",
                "UPDATE",
                QueryType::Write,
            ),
            (
                "BEGIN BATCH INSERT ...; APPLY BATCH",
                "BEGIN",
                QueryType::Write,
            ),
            (
                "CREATE KEYSPACE k WITH ...",
                "CREATE",
                QueryType::SchemaChange,
            ),
            ("drop table t", "DROP", QueryType::SchemaChange),
            ("USE ks", "USE", QueryType::Read),
            ("", "", QueryType::Write),
        ];
        for (query, keyword, kind) in cases {
            assert_eq!(statement_keyword(query), keyword, "{query}");
            assert_eq!(statement_type(keyword), kind, "{query}");
        }
    }

    #[test]
    fn tracing_ids_warnings_and_custom_payloads_are_skipped() {
        let mut body = vec![7u8; 16];
        body.extend([0, 1, 0, 2, b'h', b'i']);
        body.extend([0, 1, 0, 1, b'k', 0, 0, 0, 2, 9, 9]);
        body.extend(result_kind::ROWS.to_be_bytes());
        let header = Header {
            version: 4,
            direction: Direction::Response,
            flags: flags::TRACING | flags::WARNING | flags::CUSTOM_PAYLOAD,
            stream: 1,
            opcode: Opcode::Result,
            body_len: body.len(),
        };
        let mut bytes = BytesMut::new();
        header.encode(&mut bytes);
        bytes.put_slice(&body);
        let message = message(&bytes, &header, Compression::None).expect("readable");
        assert_eq!(&message[..], &result_kind::ROWS.to_be_bytes());
        let short = Header {
            body_len: 3,
            ..header
        };
        assert_eq!(
            extras_len(&short, &body[..3]),
            Err(BodyError("body ends early"))
        );
    }

    #[test]
    fn prepared_results_and_errors_are_read() {
        let mut prepared = result_kind::PREPARED.to_be_bytes().to_vec();
        prepared.extend([0, 3, 0xAA, 0xBB, 0xCC, 0, 0]);
        assert_eq!(prepared_id(&prepared), Ok(Some(&[0xAA, 0xBB, 0xCC][..])));
        assert_eq!(prepared_id(&result_kind::VOID.to_be_bytes()), Ok(None));
        let mut error = 0x2000i32.to_be_bytes().to_vec();
        error.extend([0, 4]);
        error.extend(b"oops");
        assert_eq!(super::error(&error), Ok((0x2000, "oops")));
        assert_eq!(batch_len(&[0, 0, 7]), Ok(7));
    }
}
