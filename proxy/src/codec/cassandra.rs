//! CQL framing: the envelope of protocol v3 and v4 (and of v5 before the connection switches
//! to checksummed segments), read from its 9-byte header without touching the body, and the
//! request decoder of a Cassandra source.
//!
//! ```text
//! version(1) flags(1) stream(2, signed) opcode(1) length(4, signed) body(length)
//! ```
//!
//! The high bit of `version` says the direction (0 request, 1 response). The decoder finds
//! where an envelope ends and refuses an envelope larger than the limit as soon as its header
//! is read, before buffering the body. Which versions a source serves, and the protocol error
//! a client gets for the others, is the source's decision: the decoder reads any version
//! whose header has this layout (3 to 5); [`RequestDecoder`] serves v3 to v5 and refuses
//! the others with the protocol error that makes drivers retry with a lower version. After a
//! v5 handshake, envelopes travel in [`segment`]s.
//!
//! Bodies are read only on demand, by [`body`].

pub mod body;
pub mod rows;
pub mod segment;

use bytes::{BufMut, Bytes, BytesMut};

use super::DecodeError;

pub const HEADER_LEN: usize = 9;

/// Header flag bits.
pub mod flags {
    pub const COMPRESSION: u8 = 0x01;
    pub const TRACING: u8 = 0x02;
    pub const CUSTOM_PAYLOAD: u8 = 0x04;
    pub const WARNING: u8 = 0x08;
    pub const USE_BETA: u8 = 0x10;
}

/// Error codes of an ERROR message (protocol spec, section 9).
pub mod error_code {
    pub const SERVER_ERROR: i32 = 0x0000;
    pub const PROTOCOL_ERROR: i32 = 0x000A;
    pub const OVERLOADED: i32 = 0x1001;
    pub const SYNTAX_ERROR: i32 = 0x2000;
    pub const UNAUTHORIZED: i32 = 0x2100;
    pub const INVALID: i32 = 0x2200;
}

/// Protocol versions a Cassandra source serves.
pub const SERVED_VERSIONS: std::ops::RangeInclusive<u8> = 3..=5;
/// The first version whose envelopes travel in segments after the handshake.
pub const SEGMENTS_FROM: u8 = 5;

/// Body compression, negotiated per connection by the COMPRESSION option of STARTUP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Snappy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Error,
    Startup,
    Ready,
    Authenticate,
    Options,
    Supported,
    Query,
    Result,
    Prepare,
    Execute,
    Register,
    Event,
    Batch,
    AuthChallenge,
    AuthResponse,
    AuthSuccess,
    Unknown(u8),
}

impl Opcode {
    pub fn from_byte(b: u8) -> Opcode {
        match b {
            0x00 => Opcode::Error,
            0x01 => Opcode::Startup,
            0x02 => Opcode::Ready,
            0x03 => Opcode::Authenticate,
            0x05 => Opcode::Options,
            0x06 => Opcode::Supported,
            0x07 => Opcode::Query,
            0x08 => Opcode::Result,
            0x09 => Opcode::Prepare,
            0x0A => Opcode::Execute,
            0x0B => Opcode::Register,
            0x0C => Opcode::Event,
            0x0D => Opcode::Batch,
            0x0E => Opcode::AuthChallenge,
            0x0F => Opcode::AuthResponse,
            0x10 => Opcode::AuthSuccess,
            other => Opcode::Unknown(other),
        }
    }

    /// The opcode's name in the protocol spec (`QUERY`, `AUTH_RESPONSE`...).
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Error => "ERROR",
            Opcode::Startup => "STARTUP",
            Opcode::Ready => "READY",
            Opcode::Authenticate => "AUTHENTICATE",
            Opcode::Options => "OPTIONS",
            Opcode::Supported => "SUPPORTED",
            Opcode::Query => "QUERY",
            Opcode::Result => "RESULT",
            Opcode::Prepare => "PREPARE",
            Opcode::Execute => "EXECUTE",
            Opcode::Register => "REGISTER",
            Opcode::Event => "EVENT",
            Opcode::Batch => "BATCH",
            Opcode::AuthChallenge => "AUTH_CHALLENGE",
            Opcode::AuthResponse => "AUTH_RESPONSE",
            Opcode::AuthSuccess => "AUTH_SUCCESS",
            Opcode::Unknown(_) => "UNKNOWN",
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            Opcode::Error => 0x00,
            Opcode::Startup => 0x01,
            Opcode::Ready => 0x02,
            Opcode::Authenticate => 0x03,
            Opcode::Options => 0x05,
            Opcode::Supported => 0x06,
            Opcode::Query => 0x07,
            Opcode::Result => 0x08,
            Opcode::Prepare => 0x09,
            Opcode::Execute => 0x0A,
            Opcode::Register => 0x0B,
            Opcode::Event => 0x0C,
            Opcode::Batch => 0x0D,
            Opcode::AuthChallenge => 0x0E,
            Opcode::AuthResponse => 0x0F,
            Opcode::AuthSuccess => 0x10,
            Opcode::Unknown(b) => b,
        }
    }
}

/// The 9-byte header of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version, without the direction bit.
    pub version: u8,
    pub direction: Direction,
    pub flags: u8,
    /// Stream id: a response carries its request's. Negative ids are server events.
    pub stream: i16,
    pub opcode: Opcode,
    pub body_len: usize,
}

impl Header {
    /// Reads the header at the start of `bytes` (at least [`HEADER_LEN`] long).
    pub fn parse(bytes: &[u8]) -> Result<Header, DecodeError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(DecodeError::Malformed(
                "CQL header shorter than 9 bytes".into(),
            ));
        };
        let version = h[0] & 0x7F;
        if !(3..=5).contains(&version) {
            return Err(DecodeError::Malformed(format!(
                "Invalid or unsupported protocol version ({version})"
            )));
        }
        let length = i32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        let body_len = usize::try_from(length)
            .map_err(|_| DecodeError::Malformed(format!("negative CQL body length {length}")))?;
        Ok(Header {
            version,
            direction: if h[0] & 0x80 == 0 {
                Direction::Request
            } else {
                Direction::Response
            },
            flags: h[1],
            stream: i16::from_be_bytes([h[2], h[3]]),
            opcode: Opcode::from_byte(h[4]),
            body_len,
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let direction = match self.direction {
            Direction::Request => 0,
            Direction::Response => 0x80,
        };
        out.put_u8(self.version | direction);
        out.put_u8(self.flags);
        out.put_i16(self.stream);
        out.put_u8(self.opcode.to_byte());
        out.put_i32(i32::try_from(self.body_len).unwrap_or(i32::MAX));
    }
}

/// Splits whole envelopes off a read buffer.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    max_frame: usize,
}

impl EnvelopeDecoder {
    pub fn new(max_frame: usize) -> Self {
        EnvelopeDecoder { max_frame }
    }

    /// Takes the next whole envelope (header and body) off the front of `buf`; `Ok(None)`
    /// means more bytes are needed. An envelope over the limit is refused from its header.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
        Ok(self.next(buf)?.map(|(frame, _)| frame))
    }

    /// [`EnvelopeDecoder::decode`], with the envelope's header.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<(Bytes, Header)>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = Header::parse(buf)?;
        let total = HEADER_LEN.saturating_add(header.body_len);
        if total > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                size: total,
                max: self.max_frame,
            });
        }
        if buf.len() < total {
            super::reserve_for(buf, total);
            return Ok(None);
        }
        Ok(Some((buf.split_to(total).freeze(), header)))
    }
}

/// The envelope `frame` encoded again from what was read of it: the header from `header`, the
/// body decompressed and compressed again when its flag says so (the bytes can differ from
/// those read, the body they carry cannot).
pub fn reencode(
    frame: &[u8],
    header: &Header,
    compression: Compression,
) -> Result<(Bytes, Header), body::BodyError> {
    let plain = body::body(frame, header, compression)?;
    let compressed = header.flags & flags::COMPRESSION != 0;
    let body = if compressed {
        std::borrow::Cow::Owned(body::compress(&plain, compression))
    } else {
        plain
    };
    let header = Header {
        body_len: body.len(),
        ..*header
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    header.encode(&mut out);
    out.put_slice(&body);
    Ok((out.freeze(), header))
}

/// One request read by a Cassandra source.
#[derive(Debug)]
pub struct Request {
    pub bytes: Bytes,
    pub header: Header,
    /// The compression negotiated on the connection so far.
    pub compression: Compression,
}

/// Splits requests off a client's read buffer: refuses versions other than v3 to v5 and
/// responses, and follows the compression the client's STARTUP negotiates. After a v5
/// STARTUP is answered with READY or AUTHENTICATE ([`RequestDecoder::answered`]), the
/// client's envelopes come in segments, and its answers must go in them too
/// ([`RequestDecoder::segments`]).
#[derive(Debug)]
pub struct RequestDecoder {
    frames: segment::FrameDecoder,
    /// The source's `max_frame_size_bytes`: bounds a compressed request once decompressed too.
    max_frame: usize,
    compression: Compression,
    /// The client's v5 STARTUP until it is answered.
    startup: segment::Handshake,
    /// Once a frame is bad, the stream cannot be read further: the same error comes back.
    failed: Option<DecodeError>,
}

impl RequestDecoder {
    pub fn new(max_frame: usize) -> Self {
        RequestDecoder {
            frames: segment::FrameDecoder::new(max_frame),
            max_frame,
            compression: Compression::None,
            startup: segment::Handshake::default(),
            failed: None,
        }
    }

    /// The codec of the client's segments, once it uses them: its answers go in segments.
    pub fn segments(&self) -> Option<segment::SegmentCodec> {
        self.frames.segments()
    }

    /// Notes an answer going to the client: READY or AUTHENTICATE to a v5 STARTUP switches
    /// the connection to segments (after this answer, which goes as it is).
    pub fn answered(&mut self, header: &Header) {
        if let Some(codec) = self.startup.answered(header) {
            self.frames.switch_to_segments(codec);
        }
    }

    /// Takes the next request off the front of `buf`; `Ok(None)` means more bytes are needed.
    /// After an error, every call returns it (the bad frame stays at the front of `buf`).
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
        if self.frames.segments().is_some() {
            let Some((bytes, header)) = self.frames.next(buf)? else {
                return Ok(None);
            };
            if header.version != SEGMENTS_FROM {
                return Err(DecodeError::Malformed(format!(
                    "a v{} envelope in a v{SEGMENTS_FROM} segment",
                    header.version
                )));
            }
            if header.direction != Direction::Request {
                return Err(DecodeError::Malformed(
                    "expected a request frame, got a response".into(),
                ));
            }
            // Segments carry the compression; their envelopes have none of their own.
            return Ok(Some(Request {
                bytes,
                header,
                compression: Compression::None,
            }));
        }
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let version = first & 0x7F;
        if !SERVED_VERSIONS.contains(&version) {
            return Err(DecodeError::Malformed(format!(
                "Invalid or unsupported protocol version ({version}); supported versions are (3/v3, 4/v4, 5/v5)"
            )));
        }
        if first & 0x80 != 0 {
            return Err(DecodeError::Malformed(
                "expected a request frame, got a response".into(),
            ));
        }
        let Some((bytes, header)) = self.frames.next(buf)? else {
            return Ok(None);
        };
        // A compressed request is bounded by the frame limit once decompressed too: a small
        // frame must not expand into what a large one may not carry.
        if header.flags & flags::COMPRESSION != 0
            && let Some(len) = bytes
                .get(HEADER_LEN..)
                .and_then(|raw| body::declared_len(raw, self.compression))
            && len > self.max_frame
        {
            // The refused frame goes back to the front of `buf`, where `error_reply` reads
            // its stream (rare: one copy, then the connection closes).
            let mut restored = BytesMut::with_capacity(bytes.len() + buf.len());
            restored.extend_from_slice(&bytes);
            restored.extend_from_slice(buf);
            *buf = restored;
            return Err(DecodeError::Malformed(format!(
                "Request is too big: its body decompresses to {len} bytes, over the maximum allowed length {} (the proxy's max_frame_size_bytes)",
                self.max_frame
            )));
        }
        if header.opcode == Opcode::Startup {
            // STARTUP itself is never compressed; what it asks for applies from the next frame
            // (in v5, to the segments that follow its answer).
            self.compression = body::body(&bytes, &header, Compression::None)
                .and_then(|b| body::startup_compression(&b))
                .map_err(|e| DecodeError::Malformed(format!("STARTUP: {e}")))?;
            self.startup.sent(&header, self.compression);
        }
        Ok(Some(Request {
            bytes,
            header,
            compression: self.compression,
        }))
    }

    /// The ERROR a client gets for a frame that could not be read (it is at the front of
    /// `buf`): on that frame's stream, in its version when we serve it, else in v4. After a
    /// v5 handshake, in a segment, on stream 0 (a bad segment names no stream).
    pub fn error_reply(&self, buf: &[u8], error: &DecodeError) -> Bytes {
        let (version, stream) = match self.segments() {
            Some(_) => (SEGMENTS_FROM, 0),
            None => (
                buf.first()
                    .map(|b| b & 0x7F)
                    .filter(|v| SERVED_VERSIONS.contains(v))
                    .unwrap_or(4),
                buf.get(2..4)
                    .map_or(0, |s| i16::from_be_bytes([s[0], s[1]])),
            ),
        };
        let message = match error {
            DecodeError::FrameTooLarge { size, max } => format!(
                "Request is too big: length {size} exceeds maximum allowed length {max} (the proxy's max_frame_size_bytes)"
            ),
            DecodeError::Malformed(m) => m.clone(),
        };
        let reply = error_response(version, stream, error_code::PROTOCOL_ERROR, &message);
        match self.segments() {
            Some(codec) => codec.encode_one(&reply),
            None => reply,
        }
    }
}

/// An ERROR response to `stream`, in protocol `version`: `[int code][string message]`.
pub fn error_response(version: u8, stream: i16, code: i32, message: &str) -> Bytes {
    let message = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
    let body_len = 4 + 2 + message.len();
    let mut out = BytesMut::with_capacity(HEADER_LEN + body_len);
    Header {
        version,
        direction: Direction::Response,
        flags: 0,
        stream,
        opcode: Opcode::Error,
        body_len,
    }
    .encode(&mut out);
    out.put_i32(code);
    out.put_u16(message.len() as u16);
    out.put_slice(message);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(version: u8, stream: i16, opcode: Opcode, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        Header {
            version,
            direction: Direction::Request,
            flags: 0,
            stream,
            opcode,
            body_len: body.len(),
        }
        .encode(&mut out);
        out.put_slice(body);
        out.to_vec()
    }

    #[test]
    fn a_compressed_request_that_decompresses_past_the_frame_limit_is_refused_on_its_stream() {
        for compression in [Compression::Lz4, Compression::Snappy] {
            let option = match compression {
                Compression::Lz4 => "lz4",
                _ => "snappy",
            };
            // STARTUP with {CQL_VERSION: 3.0.0, COMPRESSION: option}.
            let mut startup = vec![0, 2];
            for s in ["CQL_VERSION", "3.0.0", "COMPRESSION", option] {
                startup.extend_from_slice(&(s.len() as u16).to_be_bytes());
                startup.extend_from_slice(s.as_bytes());
            }
            // 8 KiB of zeros compress to a few bytes, under a 4 KiB frame limit.
            let body = body::compress(&[0u8; 8192], compression);
            assert!(body.len() < 1024, "{}", body.len());
            let mut query = envelope(4, 9, Opcode::Query, &body);
            query[1] = flags::COMPRESSION;
            let mut buf = BytesMut::from(&envelope(4, 0, Opcode::Startup, &startup)[..]);
            buf.extend_from_slice(&query);
            let mut decoder = RequestDecoder::new(4096);
            decoder.decode(&mut buf).expect("STARTUP").expect("a frame");
            let error = decoder.decode(&mut buf).expect_err("refused");
            assert_eq!(
                error.to_string(),
                "Request is too big: its body decompresses to 8192 bytes, over the maximum allowed length 4096 (the proxy's max_frame_size_bytes)"
            );
            assert_eq!(&buf[..], &query[..], "the refused frame stays at the front");
            let reply = decoder.error_reply(&buf, &error);
            let header = Header::parse(&reply).expect("an envelope");
            assert_eq!((header.stream, header.opcode), (9, Opcode::Error));
        }
    }

    #[test]
    fn a_re_encoded_envelope_carries_the_same_body_under_each_compression() {
        let plain = b"\x00\x00\x00\x1eSELECT * FROM ks.t WHERE k = 1\x00\x01".repeat(20);
        for compression in [Compression::None, Compression::Lz4, Compression::Snappy] {
            let (flags, sent) = match compression {
                Compression::None => (0, plain.clone()),
                c => (flags::COMPRESSION, body::compress(&plain, c)),
            };
            let mut frame = BytesMut::new();
            let header = Header {
                version: 4,
                direction: Direction::Request,
                flags,
                stream: 3,
                opcode: Opcode::Query,
                body_len: sent.len(),
            };
            header.encode(&mut frame);
            frame.put_slice(&sent);
            let (again, new_header) = reencode(&frame, &header, compression).expect("re-encodes");
            assert_eq!(new_header, Header::parse(&again).expect("header"));
            assert_eq!(
                (new_header.flags, new_header.stream, new_header.opcode),
                (flags, 3, Opcode::Query)
            );
            assert_eq!(again.len(), HEADER_LEN + new_header.body_len);
            assert_eq!(
                body::body(&again, &new_header, compression)
                    .expect("body")
                    .as_ref(),
                &plain[..],
                "{compression:?}"
            );
        }
        // A body that does not decompress is an error, not a panic.
        let header = Header {
            version: 4,
            direction: Direction::Request,
            flags: flags::COMPRESSION,
            stream: 1,
            opcode: Opcode::Query,
            body_len: 3,
        };
        let mut frame = BytesMut::new();
        header.encode(&mut frame);
        frame.put_slice(b"xyz");
        assert!(reencode(&frame, &header, Compression::Lz4).is_err());
    }

    #[test]
    fn an_envelope_split_at_every_byte_decodes_once_complete() {
        let frame = envelope(4, 7, Opcode::Query, b"\x00\x00\x00\x08SELECT 1\x00\x01");
        for split in 0..frame.len() {
            let mut decoder = EnvelopeDecoder::new(1024);
            let mut buf = BytesMut::from(&frame[..split]);
            assert_eq!(decoder.decode(&mut buf), Ok(None), "split at {split}");
            assert_eq!(buf.len(), split, "the buffer is left alone");
            buf.extend_from_slice(&frame[split..]);
            assert_eq!(
                decoder.decode(&mut buf).expect("complete").as_deref(),
                Some(&frame[..])
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn pipelined_envelopes_come_out_in_order_with_their_headers() {
        let mut bytes = envelope(4, 1, Opcode::Options, b"");
        bytes.extend(envelope(4, 2, Opcode::Prepare, b"\x00\x00\x00\x01x"));
        bytes.extend(envelope(3, -1, Opcode::Register, b"ab"));
        let mut buf = BytesMut::from(&bytes[..]);
        let mut decoder = EnvelopeDecoder::new(1024);
        let mut headers = Vec::new();
        while let Some(frame) = decoder.decode(&mut buf).expect("valid") {
            headers.push(Header::parse(&frame).expect("header"));
        }
        let seen: Vec<(u8, i16, Opcode, usize)> = headers
            .iter()
            .map(|h| (h.version, h.stream, h.opcode, h.body_len))
            .collect();
        assert_eq!(
            seen,
            vec![
                (4, 1, Opcode::Options, 0),
                (4, 2, Opcode::Prepare, 5),
                (3, -1, Opcode::Register, 2)
            ]
        );
        assert!(headers.iter().all(|h| h.direction == Direction::Request));
    }

    #[test]
    fn an_oversized_envelope_is_refused_from_its_header() {
        let mut header = BytesMut::new();
        Header {
            version: 4,
            direction: Direction::Request,
            flags: 0,
            stream: 0,
            opcode: Opcode::Query,
            body_len: 10_000_000,
        }
        .encode(&mut header);
        let mut decoder = EnvelopeDecoder::new(1024 * 1024);
        assert_eq!(
            decoder.decode(&mut header),
            Err(DecodeError::FrameTooLarge {
                size: 10_000_009,
                max: 1024 * 1024
            })
        );
    }

    #[test]
    fn malformed_headers_are_reported() {
        let mut negative = BytesMut::from(&[0x04, 0, 0, 1, 0x07, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert!(matches!(
            EnvelopeDecoder::new(1024).decode(&mut negative),
            Err(DecodeError::Malformed(m)) if m.contains("negative")
        ));
        let mut version = BytesMut::from(&[0x06, 0, 0, 1, 0x05, 0, 0, 0, 0][..]);
        assert!(matches!(
            EnvelopeDecoder::new(1024).decode(&mut version),
            Err(DecodeError::Malformed(m)) if m.contains("unsupported protocol version (6)")
        ));
    }

    fn startup(version: u8, stream: i16, compression: Option<&str>) -> Vec<u8> {
        let mut body = Vec::new();
        let mut pairs = vec![("CQL_VERSION", "3.0.0")];
        if let Some(c) = compression {
            pairs.push(("COMPRESSION", c));
        }
        body.extend((pairs.len() as u16).to_be_bytes());
        for (k, v) in pairs {
            for s in [k, v] {
                body.extend((s.len() as u16).to_be_bytes());
                body.extend(s.as_bytes());
            }
        }
        envelope(version, stream, Opcode::Startup, &body)
    }

    #[test]
    fn the_request_decoder_follows_the_compression_startup_negotiates() {
        let mut bytes = envelope(4, 1, Opcode::Options, b"");
        bytes.extend(startup(4, 2, Some("lz4")));
        bytes.extend(envelope(4, 3, Opcode::Query, b"\x00\x00\x00\x00"));
        let mut buf = BytesMut::from(&bytes[..]);
        let mut decoder = RequestDecoder::new(1024);
        let mut seen = Vec::new();
        while let Some(r) = decoder.decode(&mut buf).expect("valid") {
            seen.push((r.header.stream, r.header.opcode, r.compression));
        }
        assert_eq!(
            seen,
            vec![
                (1, Opcode::Options, Compression::None),
                (2, Opcode::Startup, Compression::Lz4),
                (3, Opcode::Query, Compression::Lz4),
            ]
        );
    }

    #[test]
    fn unserved_versions_get_the_error_that_makes_drivers_downgrade() {
        let mut bytes = startup(5, 7, None);
        bytes[0] = 6;
        let mut buf = BytesMut::from(&bytes[..]);
        let mut decoder = RequestDecoder::new(1024);
        let error = decoder.decode(&mut buf).expect_err("v6 is not served");
        assert_eq!(
            error,
            DecodeError::Malformed(
                "Invalid or unsupported protocol version (6); supported versions are (3/v3, 4/v4, 5/v5)"
                    .into()
            )
        );
        let reply = decoder.error_reply(&buf, &error);
        let header = Header::parse(&reply).expect("header");
        assert_eq!(
            (header.version, header.stream, header.opcode),
            (4, 7, Opcode::Error)
        );
        let body = &reply[HEADER_LEN..];
        assert_eq!(&body[..4], &error_code::PROTOCOL_ERROR.to_be_bytes());

        let mut response = BytesMut::from(&[0x84, 0, 0, 1, 0x02, 0, 0, 0, 0][..]);
        assert!(matches!(
            RequestDecoder::new(1024).decode(&mut response),
            Err(DecodeError::Malformed(m)) if m.contains("got a response")
        ));
    }

    fn answer(stream: i16, opcode: Opcode) -> Header {
        Header {
            version: 5,
            direction: Direction::Response,
            flags: 0,
            stream,
            opcode,
            body_len: 0,
        }
    }

    #[test]
    fn a_v5_connection_switches_to_segments_once_startup_is_answered() {
        let mut decoder = RequestDecoder::new(1 << 20);
        let mut buf = BytesMut::from(&startup(5, 1, Some("lz4"))[..]);
        let first = decoder.decode(&mut buf).expect("valid").expect("whole");
        assert_eq!(first.compression, Compression::Lz4);
        assert_eq!(decoder.segments(), None, "not before the answer");
        // Another stream's answer changes nothing; READY to the STARTUP switches.
        decoder.answered(&answer(9, Opcode::Ready));
        assert_eq!(decoder.segments(), None);
        decoder.answered(&answer(1, Opcode::Ready));
        let codec = segment::SegmentCodec::new(Compression::Lz4);
        assert_eq!(decoder.segments(), Some(codec));
        let query = envelope(5, 2, Opcode::Query, &[0; 600]);
        let mut buf = BytesMut::new();
        codec.encode([&query[..], &query[..]], &mut buf);
        for _ in 0..2 {
            let r = decoder.decode(&mut buf).expect("valid").expect("whole");
            assert_eq!(&r.bytes[..], &query[..]);
            assert_eq!(r.compression, Compression::None, "segments carry it");
        }
        assert!(decoder.decode(&mut buf).expect("valid").is_none());
        // A v4 envelope inside a segment is a protocol error.
        let mut buf = BytesMut::new();
        codec.encode([&envelope(4, 3, Opcode::Query, b"")[..]], &mut buf);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(DecodeError::Malformed(m)) if m.contains("v4 envelope in a v5 segment")
        ));
    }

    #[test]
    fn a_refused_v5_startup_and_v4_stay_in_envelopes() {
        let mut decoder = RequestDecoder::new(1 << 20);
        let mut buf = BytesMut::from(&startup(5, 1, None)[..]);
        decoder.decode(&mut buf).expect("valid").expect("whole");
        decoder.answered(&answer(1, Opcode::Error));
        decoder.answered(&answer(1, Opcode::Ready));
        assert_eq!(decoder.segments(), None, "the STARTUP was refused");
        let mut decoder = RequestDecoder::new(1 << 20);
        let mut buf = BytesMut::from(&startup(4, 1, None)[..]);
        decoder.decode(&mut buf).expect("valid").expect("whole");
        decoder.answered(&Header {
            version: 4,
            ..answer(1, Opcode::Ready)
        });
        assert_eq!(decoder.segments(), None, "v4 has no segments");
    }

    #[test]
    fn a_declared_body_reserves_little_before_its_bytes_arrive() {
        let mut bytes = envelope(4, 1, Opcode::Query, b"");
        bytes[5..9].copy_from_slice(&200_000_000i32.to_be_bytes());
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(
            EnvelopeDecoder::new(512 * 1024 * 1024)
                .decode(&mut buf)
                .expect("valid so far")
                .is_none()
        );
        assert!(
            buf.capacity() <= 2 * crate::codec::RESERVE_AHEAD,
            "{}",
            buf.capacity()
        );
    }

    #[test]
    fn an_oversized_request_is_answered_on_its_stream() {
        let bytes = envelope(3, 9, Opcode::Query, &[0; 2000]);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut decoder = RequestDecoder::new(1024);
        let error = decoder.decode(&mut buf).expect_err("too large");
        let reply = decoder.error_reply(&buf, &error);
        let header = Header::parse(&reply).expect("header");
        assert_eq!((header.version, header.stream), (3, 9));
        let text = String::from_utf8_lossy(&reply[HEADER_LEN + 6..]).to_string();
        assert!(
            text.contains("length 2009 exceeds maximum allowed length 1024"),
            "{text}"
        );
    }

    #[test]
    fn error_responses_carry_code_message_and_stream() {
        let bytes = error_response(4, 42, error_code::OVERLOADED, "too many requests");
        let header = Header::parse(&bytes).expect("header");
        assert_eq!(header.direction, Direction::Response);
        assert_eq!(
            (header.version, header.stream, header.opcode),
            (4, 42, Opcode::Error)
        );
        assert_eq!(header.body_len, bytes.len() - HEADER_LEN);
        let body = &bytes[HEADER_LEN..];
        assert_eq!(
            i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            0x1001
        );
        assert_eq!(
            u16::from_be_bytes([body[4], body[5]]) as usize,
            "too many requests".len()
        );
        assert_eq!(&body[6..], b"too many requests");
    }
}
