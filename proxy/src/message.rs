//! A message is the raw bytes of one request or response frame, parsed only on demand.
//!
//! Forwarding never parses and never re-encodes: the bytes read are the bytes written. A
//! transform that needs the value calls [`Message::frame`] (parsed once, cached); one that
//! changes it calls [`Message::frame_mut`], and only then is the frame encoded again.
//!
//! A message knows its protocol ([`Wire`]). The RESP helpers (`frame`, `command`) are for
//! Redis messages; a CQL message carries its 9-byte header, read when it was framed, and its
//! body is read on demand through [`Message::cql_body`].

use std::borrow::Cow;
use std::cell::OnceCell;

use bytes::Bytes;

use crate::codec::cassandra::body::BodyError;
use crate::codec::cassandra::{self as cql, Compression, Header, Opcode};
use crate::codec::redis::command::Command;
use crate::codec::redis::frame::{ParseError, RedisFrame};

/// The protocol of a message, and for CQL what its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Redis,
    Cql(CqlMeta),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqlMeta {
    pub header: Header,
    /// The compression negotiated on the connection when the frame was read.
    pub compression: Compression,
}

/// Where a reply to a request goes: what the connection handler keeps for requests in
/// flight, so that it can answer them even when the chain fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTo {
    Redis,
    Cql { version: u8, stream: i16 },
}

/// Which error a transform answers with; each protocol renders it its own way (Redis: an
/// `-ERR` line; CQL: an ERROR with the matching code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The proxy or the upstream failed (CQL Server error).
    Server,
    /// Refused for load (CQL Overloaded: drivers try another node).
    Overloaded,
}

/// Identifies a request within its client connection; a response carries the id of the
/// request it answers.
pub type MessageId = u64;

pub type Messages = Vec<Message>;

#[derive(Debug, Clone)]
pub struct Message {
    /// This message's id (unique within the connection).
    pub id: MessageId,
    /// For a response: the request it answers. `None` for a frame nobody asked for (a
    /// pub/sub message, a RESP3 push, MONITOR output, an extra subscribe confirmation).
    pub request_id: Option<MessageId>,
    bytes: Bytes,
    frame: Option<RedisFrame>,
    modified: bool,
    is_request: bool,
    command: OnceCell<Command>,
    wire: Wire,
    /// The message proper of a compressed CQL body, decompressed once for every transform
    /// that reads it.
    cql_plain: OnceCell<Result<Bytes, BodyError>>,
}

impl Message {
    /// A request read from a client.
    pub fn request(id: MessageId, bytes: Bytes) -> Message {
        Message {
            id,
            request_id: None,
            bytes,
            frame: None,
            modified: false,
            is_request: true,
            command: OnceCell::new(),
            wire: Wire::Redis,
            cql_plain: OnceCell::new(),
        }
    }

    /// A CQL request read from a client.
    pub fn cql_request(id: MessageId, request: cql::Request) -> Message {
        Message {
            wire: Wire::Cql(CqlMeta {
                header: request.header,
                compression: request.compression,
            }),
            ..Message::request(id, request.bytes)
        }
    }

    /// A CQL response (or event) read from an upstream.
    pub fn cql_response(
        request_id: Option<MessageId>,
        bytes: Bytes,
        header: Header,
        compression: Compression,
    ) -> Message {
        Message {
            wire: Wire::Cql(CqlMeta {
                header,
                compression,
            }),
            ..Message::response(request_id, bytes)
        }
    }

    /// A response read from an upstream (or made by a transform).
    pub fn response(request_id: Option<MessageId>, bytes: Bytes) -> Message {
        Message {
            id: 0,
            request_id,
            bytes,
            frame: None,
            modified: false,
            is_request: false,
            command: OnceCell::new(),
            wire: Wire::Redis,
            cql_plain: OnceCell::new(),
        }
    }

    /// A response built from a frame.
    pub fn response_frame(request_id: Option<MessageId>, frame: RedisFrame) -> Message {
        Message::response(request_id, frame.to_bytes())
    }

    /// An error reply to `request`. `text` is the error line without the leading `-`, starting
    /// with an error code such as `ERR`.
    pub fn error_reply(request_id: MessageId, text: &str) -> Message {
        let clean: String = text
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        Message::response(Some(request_id), Bytes::from(format!("-{clean}\r\n")))
    }

    /// An error reply of `kind` to a request addressed by `to`. `text` is the message alone
    /// (Redis gets `-ERR text`).
    pub fn error(request_id: MessageId, to: ReplyTo, kind: ErrorKind, text: &str) -> Message {
        match to {
            ReplyTo::Redis => Message::error_reply(request_id, &format!("ERR {text}")),
            ReplyTo::Cql { version, stream } => {
                let code = match kind {
                    ErrorKind::Server => cql::error_code::SERVER_ERROR,
                    ErrorKind::Overloaded => cql::error_code::OVERLOADED,
                };
                let bytes = cql::error_response(version, stream, code, text);
                let header = Header {
                    version,
                    direction: cql::Direction::Response,
                    flags: 0,
                    stream,
                    opcode: Opcode::Error,
                    body_len: bytes.len() - cql::HEADER_LEN,
                };
                Message::cql_response(Some(request_id), bytes, header, Compression::None)
            }
        }
    }

    /// An error reply of `kind` to this request, in its protocol.
    pub fn error_to(&self, kind: ErrorKind, text: &str) -> Message {
        Message::error(self.id, self.reply_to(), kind, text)
    }

    /// How a reply to this request is addressed.
    pub fn reply_to(&self) -> ReplyTo {
        match &self.wire {
            Wire::Redis => ReplyTo::Redis,
            Wire::Cql(meta) => ReplyTo::Cql {
                version: meta.header.version,
                stream: meta.header.stream,
            },
        }
    }

    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    /// The header and compression of a CQL message.
    pub fn cql(&self) -> Option<&CqlMeta> {
        match &self.wire {
            Wire::Cql(meta) => Some(meta),
            Wire::Redis => None,
        }
    }

    /// The body of a CQL message, decompressed if needed, from where the message proper
    /// starts (after any tracing id, warnings and custom payload). `None` for Redis.
    pub fn cql_body(&self) -> Option<Result<Cow<'_, [u8]>, BodyError>> {
        let meta = self.cql()?;
        if meta.header.flags & cql::flags::COMPRESSION == 0 {
            return Some(cql::body::message(
                &self.bytes,
                &meta.header,
                meta.compression,
            ));
        }
        // Decompressed once, whichever transforms read it.
        let plain = self.cql_plain.get_or_init(|| {
            cql::body::message(&self.bytes, &meta.header, meta.compression)
                .map(|b| Bytes::from(b.into_owned()))
        });
        Some(match plain {
            Ok(b) => Ok(Cow::Borrowed(&b[..])),
            Err(e) => Err(e.clone()),
        })
    }

    /// Replaces the envelope of a CQL message with `bytes`, whose header is `header`.
    pub fn set_cql_envelope(&mut self, bytes: Bytes, header: Header) {
        if let Wire::Cql(meta) = &mut self.wire {
            meta.header = header;
            self.bytes = bytes;
            self.cql_plain = OnceCell::new();
        }
    }

    /// The frame as it will be written.
    pub fn bytes(&mut self) -> &Bytes {
        if self.modified {
            if let Some(frame) = &self.frame {
                self.bytes = frame.to_bytes();
            }
            self.modified = false;
        }
        &self.bytes
    }

    /// The raw bytes as read, when the message was not modified (cheap: no encoding).
    pub fn raw_bytes(&self) -> Option<&Bytes> {
        (!self.modified).then_some(&self.bytes)
    }

    pub fn into_bytes(mut self) -> Bytes {
        self.bytes();
        self.bytes
    }

    /// The parsed frame (parsed on first use).
    pub fn frame(&mut self) -> Result<&RedisFrame, ParseError> {
        if self.frame.is_none() {
            let parsed = if self.is_request {
                RedisFrame::parse_request(&self.bytes)?
            } else {
                RedisFrame::parse(&self.bytes)?
            };
            self.frame = Some(parsed);
        }
        self.frame.as_ref().ok_or(ParseError("unreachable"))
    }

    /// The parsed frame, for changing it: the message is encoded again when written.
    pub fn frame_mut(&mut self) -> Result<&mut RedisFrame, ParseError> {
        self.frame()?;
        self.modified = true;
        self.command = OnceCell::new();
        self.frame.as_mut().ok_or(ParseError("unreachable"))
    }

    /// The command of a request (read cheaply from the bytes, cached).
    pub fn command(&mut self) -> &Command {
        if self.modified {
            self.bytes();
        }
        self.command.get_or_init(|| Command::of(&self.bytes))
    }

    /// Whether this response is an error reply (`-` or RESP3 `!`; a CQL ERROR).
    pub fn is_error(&self) -> bool {
        if let Wire::Cql(meta) = &self.wire {
            return meta.header.opcode == Opcode::Error;
        }
        match &self.frame {
            Some(f) if self.modified => f.is_error(),
            _ => matches!(self.bytes.first(), Some(b'-' | b'!')),
        }
    }

    /// Size in bytes of the frame as read.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}
