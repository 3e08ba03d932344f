//! `CassandraPeersRewrite`: rewrites `native_port` in the `system.peers_v2` rows a node
//! returns to the proxy's port, so that a driver discovering the cluster's other nodes
//! connects to the proxies in front of them (a proxy per node, on the same port everywhere)
//! rather than to the nodes themselves.
//!
//! Only answers to QUERY requests that name `peers_v2` are read (drivers query the table
//! on their control connection with a plain QUERY); a Rows result whose metadata says
//! `system.peers_v2` has its `native_port` cells (4-byte ints) overwritten in place. A
//! compressed answer is decompressed for it and sent on uncompressed. Anything that cannot
//! be read is passed on unchanged.

use std::collections::HashSet;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use shotover_crds::transform::CassandraPeersRewriteConfig;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::cassandra::rows::{self, TYPE_INT};
use crate::codec::cassandra::{HEADER_LEN, Header, Opcode, body, flags};
use crate::message::{Message, MessageId, Messages};

pub struct CassandraPeersRewriteBuilder {
    port: u16,
}

impl CassandraPeersRewriteBuilder {
    pub fn new(config: &CassandraPeersRewriteConfig) -> Self {
        CassandraPeersRewriteBuilder { port: config.port }
    }
}

impl TransformBuilder for CassandraPeersRewriteBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(CassandraPeersRewrite {
            port: self.port,
            asked: HashSet::new(),
        })
    }
}

struct CassandraPeersRewrite {
    port: u16,
    /// Requests of this connection that read `peers_v2`, waiting for their answer.
    asked: HashSet<MessageId>,
}

fn reads_peers_v2(request: &Message) -> bool {
    if request
        .cql()
        .is_none_or(|m| m.header.opcode != Opcode::Query)
    {
        return false;
    }
    let Some(Ok(body)) = request.cql_body() else {
        return false;
    };
    body::query_text(&body).is_ok_and(|q| q.to_ascii_lowercase().contains("peers_v2"))
}

/// `response` with every `native_port` of `system.peers_v2` set to `port`; `None` when it
/// holds none or cannot be read.
pub fn rewrite(response: &Message, port: u16) -> Option<Message> {
    let meta = response.cql()?;
    if meta.header.opcode != Opcode::Result {
        return None;
    }
    let frame = response.raw_bytes()?;
    let whole = body::body(frame, &meta.header, meta.compression).ok()?;
    let extras = body::extras_len(&meta.header, &whole).ok()?;
    let found = match rows::find_column(&whole[extras..], "system", "peers_v2", "native_port") {
        Ok(found) => found?,
        Err(e) => {
            tracing::debug!(error = %e, "system.peers_v2 result not rewritten");
            return None;
        }
    };
    if found.type_id != TYPE_INT {
        return None;
    }
    let mut new_body = whole.into_owned();
    let value = i32::from(port).to_be_bytes();
    for (at, len) in found.cells {
        if len == 4 {
            new_body[extras + at..extras + at + 4].copy_from_slice(&value);
        }
    }
    let header = Header {
        flags: meta.header.flags & !flags::COMPRESSION,
        body_len: new_body.len(),
        ..meta.header
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + new_body.len());
    header.encode(&mut out);
    out.put_slice(&new_body);
    Some(Message::cql_response(
        response.request_id,
        out.freeze(),
        header,
        meta.compression,
    ))
}

#[async_trait]
impl Transform for CassandraPeersRewrite {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        for request in &state.requests {
            if reads_peers_v2(request) {
                self.asked.insert(request.id);
            }
        }
        let mut responses = state.call_next().await?;
        if self.asked.is_empty() {
            return Ok(responses);
        }
        for response in &mut responses {
            let Some(id) = response.request_id else {
                continue;
            };
            if self.asked.remove(&id)
                && let Some(rewritten) = rewrite(response, self.port)
            {
                *response = rewritten;
            }
        }
        Ok(responses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::cassandra::rows::tests::peers_rows;
    use crate::codec::cassandra::{Compression, Direction};

    fn response(body: &[u8], flags: u8, compression: Compression) -> Message {
        let header = Header {
            version: 4,
            direction: Direction::Response,
            flags,
            stream: 3,
            opcode: Opcode::Result,
            body_len: body.len(),
        };
        let mut out = BytesMut::new();
        header.encode(&mut out);
        out.put_slice(body);
        Message::cql_response(Some(1), out.freeze(), header, compression)
    }

    fn ports(message: &Message) -> Vec<i32> {
        let body = message.cql_body().expect("cql").expect("readable");
        let found = rows::find_column(&body, "system", "peers_v2", "native_port")
            .expect("readable")
            .expect("found");
        found
            .cells
            .iter()
            .filter(|(_, len)| *len == 4)
            .map(|(at, _)| i32::from_be_bytes(body[*at..*at + 4].try_into().expect("4")))
            .collect()
    }

    #[test]
    fn native_ports_are_rewritten_in_plain_and_compressed_answers() {
        let rows = peers_rows(true, &[Some(9042), None, Some(19042)]);
        let plain = response(&rows, 0, Compression::None);
        let rewritten = rewrite(&plain, 9043).expect("rewritten");
        assert_eq!(ports(&rewritten), vec![9043, 9043]);
        assert_eq!(rewritten.len(), plain.len());

        // A warning before the result, and LZ4 on the whole body.
        let mut with_warning = vec![0, 1, 0, 2, b'h', b'i'];
        with_warning.extend(&rows);
        let mut lz4 = (with_warning.len() as u32).to_be_bytes().to_vec();
        lz4.extend(lz4_flex::block::compress(&with_warning));
        let compressed = response(&lz4, flags::COMPRESSION | flags::WARNING, Compression::Lz4);
        let rewritten = rewrite(&compressed, 9043).expect("rewritten");
        let header = rewritten.cql().expect("cql").header;
        assert_eq!(header.flags, flags::WARNING, "sent on uncompressed");
        assert_eq!(header.stream, 3);
        assert_eq!(ports(&rewritten), vec![9043, 9043]);
    }

    #[test]
    fn other_answers_are_not_rewritten() {
        let void = response(&body::result_kind::VOID.to_be_bytes(), 0, Compression::None);
        assert!(rewrite(&void, 9043).is_none());
        let rows = peers_rows(true, &[Some(9042)]);
        let truncated = response(&rows[..rows.len() - 3], 0, Compression::None);
        assert!(rewrite(&truncated, 9043).is_none());
    }
}
