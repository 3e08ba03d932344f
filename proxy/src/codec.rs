//! Wire codecs: finding frame boundaries without copying, and parsing frames on demand.

pub mod cassandra;
pub mod redis;

/// Why a frame could not be read. The connection that sent it gets a protocol-correct error
/// and is closed; every other connection goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of at least {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: usize, max: usize },
    #[error("{0}")]
    Malformed(String),
}
