//! Frames on their way to a socket: small ones copied into one buffer, large ones kept as
//! they are, all written with as few syscalls as possible and no copy of a large value.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Frames up to this size are copied into the buffer.
const COPY_LIMIT: usize = 16 * 1024;
/// A buffer grown past this is given back after the write.
const SHRINK_ABOVE: usize = 1024 * 1024;

#[derive(Default)]
pub struct Outbox {
    buf: BytesMut,
    /// Large frames, each with the offset in `buf` where it goes.
    large: Vec<(usize, Bytes)>,
}

impl Outbox {
    pub fn push(&mut self, bytes: Bytes) {
        if bytes.len() <= COPY_LIMIT {
            self.buf.extend_from_slice(&bytes);
        } else {
            self.large.push((self.buf.len(), bytes));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.large.is_empty()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.buf.len() + self.large.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// Writes everything queued, then flushes.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        let result = self.write_all(w).await;
        self.buf.clear();
        self.large.clear();
        if self.buf.capacity() > SHRINK_ABOVE {
            self.buf = BytesMut::new();
        }
        result
    }

    async fn write_all<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let mut written = 0;
        for (at, bytes) in &self.large {
            if *at > written {
                w.write_all(&self.buf[written..*at]).await?;
            }
            w.write_all(bytes).await?;
            written = *at;
        }
        if written < self.buf.len() {
            w.write_all(&self.buf[written..]).await?;
        }
        w.flush().await
    }
}
