//! A message is the raw bytes of one request or response frame, parsed only on demand.
//!
//! Forwarding never parses and never re-encodes: the bytes read are the bytes written. A
//! transform that needs the value calls [`Message::frame`] (parsed once, cached); one that
//! changes it calls [`Message::frame_mut`], and only then is the frame encoded again.

use std::cell::OnceCell;

use bytes::Bytes;

use crate::codec::redis::command::Command;
use crate::codec::redis::frame::{ParseError, RedisFrame};

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

    /// Whether this response is an error reply (`-` or RESP3 `!`).
    pub fn is_error(&self) -> bool {
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
