//! Wire codecs: finding frame boundaries without copying, and parsing frames on demand.

pub mod cassandra;
pub mod redis;

/// Most bytes a decoder reserves ahead for a frame whose length its peer declared: the rest
/// of the buffer grows as the bytes arrive (doubling), so a header that lies about a large
/// frame costs no memory it did not send.
pub const RESERVE_AHEAD: usize = 1 << 20;

/// Reserves room in `buf` for a frame ending at `end`, at most [`RESERVE_AHEAD`] ahead.
pub fn reserve_for(buf: &mut bytes::BytesMut, end: usize) {
    buf.reserve(end.saturating_sub(buf.len()).min(RESERVE_AHEAD));
}

/// Why a frame could not be read. The connection that sent it gets a protocol-correct error
/// and is closed; every other connection goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of at least {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: usize, max: usize },
    #[error("{0}")]
    Malformed(String),
}
